"""Inject Propulsion into a model, freeze the rest, merge, unmerge and unload.

Mirrors peft's vocabulary: ``get_propulsion_model``, ``merge_and_unload``, ``unload``,
``print_trainable_parameters``. Every call is atomic: all checks run before the first module or
tensor changes, so an error leaves the model as it was.

Shared modules and weights: a module registered at several paths is wrapped once and the same
wrapper sits at every path (one ``z``). A weight held by two different modules (a tied embedding
and LM head) gets one ``z`` per module; the wrapped model computes that exactly, but one tensor
cannot hold two different scalings, so merging into a shared weight is refused. Only sharing
through registered parameters and buffers is seen: a weight read directly by code elsewhere
(``F.linear(h, self.emb.weight)``) is not, and such a model must not be merged.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from propulsion.config import PropulsionConfig
from propulsion.errors import PropulsionError, TargetError
from propulsion.layer import ADAPTER_PARAMETER, PropulsionLayer
from propulsion.sharing import all_paths, holders, tensor_index
from propulsion.targets import WRAPPED_BASES, select_targets, wrapper_for

__all__ = [
    "adapter_state",
    "get_propulsion_model",
    "is_propulsion_model",
    "merge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "propulsion_config",
    "propulsion_layers",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
]

_STATE_ATTR = "_propulsion_state"


@dataclass
class _PropulsionState:
    """Book-keeping stored on the wrapped model (a plain attribute, not in the state dict)."""

    config: PropulsionConfig
    wrapped: list[str]  # first module path of every wrapper
    saved: list[str]  # module paths trained in full (modules_to_save)
    requires_grad_before: dict[str, bool]  # parameter name -> flag before wrapping
    # wrapper path -> copy of its base layer's bias taken at wrapping (train_bias only): what
    # unload() puts back so that it returns the untouched base model
    original_biases: dict[str, torch.Tensor] = field(default_factory=dict)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def get_propulsion_model(model: nn.Module, config: PropulsionConfig | None = None) -> nn.Module:
    """Wrap ``model`` in place with Propulsion layers and freeze everything not trained.

    Trainable afterwards: every ``propulsion_z``; the biases of wrapped layers when
    ``config.train_bias``; every parameter of ``config.modules_to_save``.

    Args:
        model: any ``nn.Module``; modules are replaced in place.
        config: what to wrap; ``PropulsionConfig()`` when None.

    Returns:
        The same ``model`` object, wrapped.

    Raises:
        TargetError: the targets match nothing or unsupported modules, the model is already
            wrapped, or the configuration would train nothing. The model is left unchanged.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> net = get_propulsion_model(net, PropulsionConfig(degree=3))
        >>> trainable_parameters(net)
        (5, 28)
    """
    config = config if config is not None else PropulsionConfig()
    if not isinstance(config, PropulsionConfig):
        raise TypeError(f"config must be a PropulsionConfig, got {type(config).__name__}")
    chosen, saved = select_targets(model, config, hasattr(model, _STATE_ATTR))
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    wrappers = {}
    for path in chosen:  # build every wrapper first: any error leaves the model untouched
        base = model.get_submodule(path)
        wrapper_type = wrapper_for(base)
        assert wrapper_type is not None
        try:
            wrappers[path] = wrapper_type(base, config.degree, config.init_value)
        except PropulsionError as exc:
            raise TargetError(f"cannot wrap {path!r}: {exc}") from exc
    originals: dict[str, torch.Tensor] = {}
    for path, wrapper in wrappers.items():
        for alias in chosen[path]:  # a module registered twice gets one wrapper at both paths
            _set_submodule(model, alias, wrapper)
        WRAPPED_BASES[wrapper.base_layer] = weakref.ref(wrapper)
    for param in model.parameters():
        param.requires_grad_(False)
    for path, wrapper in wrappers.items():
        wrapper.propulsion_z.requires_grad_(True)
        bias = getattr(wrapper.base_layer, "bias", None)
        if config.train_bias and isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
            originals[path] = bias.detach().clone()
    for path in saved:
        for param in model.get_submodule(path).parameters():
            param.requires_grad_(True)
    setattr(model, _STATE_ATTR, _PropulsionState(config, list(chosen), saved, before, originals))
    return model


def is_propulsion_model(model: nn.Module) -> bool:
    return hasattr(model, _STATE_ATTR)


def _state(model: nn.Module, action: str) -> _PropulsionState:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise PropulsionError(
            f"cannot {action}: the model has no Propulsion layers (wrap it with "
            "get_propulsion_model or load_adapter first)"
        )
    return state


def propulsion_config(model: nn.Module) -> PropulsionConfig:
    """The configuration a wrapped model was built with."""
    return _state(model, "read the config").config


def propulsion_layers(model: nn.Module) -> dict[str, PropulsionLayer]:
    """Module path -> wrapper, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PropulsionLayer)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: every z, wrapped biases when trained, and the
    parameters of ``modules_to_save``; keyed by parameter name in the wrapped model (a tensor
    shared by several names is listed once, under its first name)."""
    state = _state(model, "collect the adapter")
    config = state.config
    out: dict[str, torch.Tensor] = {}
    for path, layer in propulsion_layers(model).items():
        out[f"{path}.{ADAPTER_PARAMETER}"] = layer.propulsion_z
        bias = getattr(layer.base_layer, "bias", None)
        if config.train_bias and isinstance(bias, nn.Parameter):
            out[f"{path}.base_layer.bias"] = bias
    for path in state.saved:
        for name, param in model.get_submodule(path).named_parameters():
            out[f"{path}.{name}"] = param
    seen: set[int] = set()
    unique: dict[str, torch.Tensor] = {}
    for name, tensor in out.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


def _check_merge(model: nn.Module, layers: dict[str, PropulsionLayer]) -> None:
    """Every reason a merge of ``layers`` could fail or change the outputs, raised before any
    tensor changes: non-finite folds (in the weights' own dtype), nested wrappers, and weights
    that other modules also hold (tied weights)."""
    index = tensor_index(model)
    for path, layer in layers.items():
        try:
            layer.check_mergeable()
        except PropulsionError as exc:
            raise PropulsionError(f"{exc} (layer {path!r})") from exc
        for param, _ in layer.fold_targets():
            others = holders(index, param, layer.base_layer)
            if others:
                raise PropulsionError(
                    f"cannot merge the Propulsion layer {path!r}: its base tensor is also held "
                    f"by {others[:3]} (tied or shared weights). One tensor cannot carry the "
                    "scaling of one layer without changing the others, so nothing was merged; "
                    "keep the model unmerged (the wrappers compute it exactly), or untie the "
                    "weights before wrapping (give each module its own copy)"
                )


def merge_adapter(model: nn.Module) -> None:
    """Fold ``z**k`` into every wrapped layer in place (outputs unchanged, wrappers kept).

    Raises:
        PropulsionError: a fold would write non-finite values in the weights' dtype, a wrapped
            weight is shared with another module (tied embedding and LM head), or every layer
            is merged already. Nothing is changed then.
    """
    _state(model, "merge")
    layers = {p: layer for p, layer in propulsion_layers(model).items() if not layer.merged}
    if not layers:
        raise PropulsionError("every Propulsion layer is already merged")
    _check_merge(model, layers)  # every check before the first merge: a failure changes nothing
    for layer in layers.values():
        layer._merge_checked()


def unmerge_adapter(model: nn.Module) -> None:
    """Undo :func:`merge_adapter`."""
    _state(model, "unmerge")
    layers = {path: layer for path, layer in propulsion_layers(model).items() if layer.merged}
    if not layers:
        raise PropulsionError("no Propulsion layer is merged; nothing to unmerge")
    _check_recoverable(layers, "unmerge")  # every check before the first change
    for layer in layers.values():
        layer.unmerge()


def _check_recoverable(layers: dict[str, PropulsionLayer], action: str) -> None:
    for path, layer in layers.items():
        lost = layer.lost_at_merge() if layer.merged else None
        if lost:
            raise PropulsionError(f"cannot {action}: in the merged layer {path!r}, {lost}; "
                                  "reload the base model instead")


def _remove_wrappers(model: nn.Module, merge: bool) -> nn.Module:
    state = _state(model, "merge and unload" if merge else "unload")
    layers = propulsion_layers(model)
    if merge:  # every check before the first change
        _check_merge(model, {p: layer for p, layer in layers.items() if not layer.merged})
    if not merge:
        _check_recoverable(layers, "unload")
    modules = all_paths(model)
    places = {id(layer): [p for p, m in modules.items() if m is layer] for layer in layers.values()}
    with torch.no_grad():  # inner modules first: a hand-nested wrapper unloads completely
        for path, layer in reversed(layers.items()):
            if merge and not layer.merged:
                layer._merge_checked()
            elif not merge and layer.merged:
                layer.unmerge()
            bias = getattr(layer.base_layer, "bias", None)
            if not merge and path in state.original_biases and isinstance(bias, torch.Tensor):
                bias.copy_(state.original_biases[path])
            for alias in places[id(layer)]:
                _set_submodule(model, alias, layer.base_layer)
            WRAPPED_BASES.pop(layer.base_layer, None)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad_before.get(name, param.requires_grad))
    delattr(model, _STATE_ATTR)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every ``z**k`` into its base layer and return the model made of plain layers.

    Outputs are identical up to the rounding of the base dtype; trained biases keep their
    trained values (folded). Requires-grad flags go back to what they were before wrapping.

    Raises:
        PropulsionError: as :func:`merge_adapter`; the model is left wrapped and unchanged.
    """
    return _remove_wrappers(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove the wrappers without merging and return the untouched base model.

    Base weights are never changed by training; biases trained with ``train_bias`` are put back
    to the values they had when the model was wrapped (a copy is kept for that). Parameters of
    ``modules_to_save`` were trained in place and keep their trained values. A merged layer is
    unmerged first (exact up to rounding of the base dtype).
    """
    return _remove_wrappers(model, merge=False)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (total includes the adapter's own)."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: T || all params: A || trainable%: P`` like peft."""
    trainable, total = trainable_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

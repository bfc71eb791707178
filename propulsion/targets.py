"""Which modules a Propulsion configuration wraps in a model, and which it trains in full.

Target patterns are matched against every path of the model, a module registered at several
paths under each of them; each distinct module gets one wrapper. A module that is already the
base layer of a live wrapper (in this model or another) is never wrapped again.
"""

from __future__ import annotations

import re
import warnings
import weakref

from torch import nn

from propulsion.config import PropulsionConfig
from propulsion.errors import TargetError
from propulsion.layer import WRAPPERS, PropulsionLayer
from propulsion.sharing import all_paths

__all__ = ["WRAPPED_BASES", "live_wrapper", "select_targets", "wrapper_for"]

# Base layer -> its live wrapper, so that a module already wrapped is never wrapped again (two
# z on one layer), even when reached from another root model.
WRAPPED_BASES: weakref.WeakKeyDictionary[nn.Module, weakref.ref[PropulsionLayer]] = (
    weakref.WeakKeyDictionary()
)


def live_wrapper(module: nn.Module) -> PropulsionLayer | None:
    ref = WRAPPED_BASES.get(module)
    wrapper = ref() if ref is not None else None
    return wrapper if wrapper is not None and wrapper.base_layer is module else None


def _matches_suffix(path: str, suffix: str) -> bool:
    return path == suffix or path.endswith("." + suffix)


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def wrapper_for(module: nn.Module) -> type[PropulsionLayer] | None:
    for base, wrapper in WRAPPERS.items():
        if isinstance(module, base):
            return wrapper
    return None


def _resolve_suffixes(modules: dict[str, nn.Module], suffixes: tuple[str, ...], what: str) -> list[str]:
    found: list[str] = []
    for suffix in suffixes:
        hits = [p for p in modules if _matches_suffix(p, suffix)]
        if not hits:
            raise TargetError(
                f"{what} entry {suffix!r} matches no module of the model; module names end in "
                f"e.g. {_examples(modules)}"
            )
        found += [h for h in hits if h not in found]
    return found


def _examples(modules: dict[str, nn.Module], n: int = 6) -> str:
    wrappable = [p for p, m in modules.items() if wrapper_for(m) is not None] or list(modules)
    tails = sorted({p.rsplit(".", 1)[-1] for p in wrappable} - {str(i) for i in range(len(modules))})
    return ", ".join(repr(t) for t in tails[:n]) + (", ..." if len(tails) > n else "")


def select_targets(
    model: nn.Module, config: PropulsionConfig, already_wrapped: bool = False
) -> tuple[dict[str, list[str]], list[str]]:
    """What ``config`` wraps in ``model``, or a TargetError saying why not.

    Returns:
        ``{first path: every path}`` of each distinct module to wrap (a module registered at
        several paths gets one wrapper placed at all of them), and the first path of each
        module trained in full (``modules_to_save``).
    """
    modules = all_paths(model)  # a module registered twice appears under both paths
    if isinstance(model, PropulsionLayer):
        raise TargetError(
            f"the model is itself a Propulsion layer ({type(model).__name__}); wrapping inside "
            "it would put two z on one layer. Wrap the plain model, or call unload() on the "
            "wrapped model that holds this layer first"
        )
    if already_wrapped or any(isinstance(m, PropulsionLayer) for m in modules.values()):
        raise TargetError(
            "the model already holds Propulsion layers; call unload() or merge_and_unload() "
            "before wrapping it again"
        )
    for path, module in [("", model), *modules.items()]:
        if live_wrapper(module) is not None:
            what = f"module {path!r}" if path else "the model"
            raise TargetError(
                f"{what} is already the base layer of a Propulsion wrapper in another model; "
                "wrapping it again would put two z on one layer. Unload that model first"
            )
    saved = _resolve_suffixes(modules, config.modules_to_save, "modules_to_save")
    excluded = _resolve_suffixes(modules, config.exclude_modules, "exclude_modules")
    attention_owned = [p for p, m in modules.items() if isinstance(m, nn.MultiheadAttention)]

    kinds: list[type[nn.Module]] = []
    if config.include_embeddings:
        kinds.append(nn.Embedding)
    if config.include_layernorm:
        kinds.append(nn.LayerNorm)
    explicit: list[str] = []
    targets = config.target_modules
    if targets is None:
        kinds.append(nn.Linear)
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        explicit = [p for p in modules if pattern.fullmatch(p)]
        if not explicit:
            raise TargetError(
                f"target_modules regex {targets!r} matches no module path; paths look like "
                f"{next(iter(modules), '')!r}"
            )
    else:
        explicit = _resolve_suffixes(modules, targets, "target_modules")
    for path in explicit:
        if wrapper_for(modules[path]) is None:
            raise TargetError(
                f"target {path!r} is a {type(modules[path]).__name__}; Propulsion wraps "
                f"{', '.join(t.__name__ for t in WRAPPERS)} only"
            )
        if _inside(path, attention_owned):
            raise TargetError(
                f"target {path!r} belongs to an nn.MultiheadAttention, which reads its "
                "projection weights directly instead of calling the module; wrapping it would "
                "have no effect"
            )
    implicit = [
        p for p, m in modules.items()
        if isinstance(m, tuple(kinds)) and not (nn.Linear in kinds and _inside(p, attention_owned))
    ]
    skipped = [p for p in modules if p in attention_owned]
    if skipped and targets is None:
        warnings.warn(
            f"skipping the projections inside nn.MultiheadAttention modules {skipped}: they are "
            "not called as modules, so Propulsion cannot scale them",
            stacklevel=3,
        )
    chosen = [p for p in modules if p in set(explicit) | set(implicit)]
    chosen = [p for p in chosen if not _inside(p, saved) and not _inside(p, excluded)]
    # A wrapper inside another wrapped module would be scaled twice: keep the outer one only.
    chosen = [p for p in chosen if not _inside(p.rsplit(".", 1)[0], [c for c in chosen if c != p])]
    if not chosen and not saved:
        raise TargetError(
            "the configuration would train nothing: no module is wrapped and modules_to_save is "
            "empty (check target_modules, exclude_modules and modules_to_save)"
        )
    return _one_per_module(modules, chosen, saved, excluded), _first_paths(modules, saved)


def _one_per_module(
    modules: dict[str, nn.Module], chosen: list[str], saved: list[str], excluded: list[str]
) -> dict[str, list[str]]:
    """Group the chosen paths by module: one wrapper per module, placed at all of its paths."""
    chosen_ids = {id(modules[p]) for p in chosen}
    groups: dict[int, list[str]] = {}
    for path, module in modules.items():
        if id(module) in chosen_ids:
            groups.setdefault(id(module), []).append(path)
    for paths in groups.values():
        left_out = [p for p in paths if _inside(p, saved) or _inside(p, excluded)]
        if left_out:
            raise TargetError(
                f"module {paths[0]!r} is also registered at {left_out[0]!r}, which "
                "exclude_modules or modules_to_save leaves out; one module cannot be scaled at "
                "one path and not at another. Select or leave out all of its paths "
                f"({', '.join(repr(p) for p in paths)})"
            )
    return {paths[0]: paths for paths in groups.values()}


def _first_paths(modules: dict[str, nn.Module], paths: list[str]) -> list[str]:
    """``paths`` with every module kept once, under the first of its paths."""
    first: dict[int, str] = {}
    wanted = set(paths)
    for path in modules:
        if path in wanted:
            first.setdefault(id(modules[path]), path)
    return list(first.values())

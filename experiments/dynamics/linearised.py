"""The linearised model (first-order Taylor expansion in the trained parameters) and a callback
that trains it beside the real model: the "kernel behaviour" test of Malladi et al. (2023).

For the selected parameters theta (the method's trainable set) with initial values theta_0,

    f_lin(x; theta) = f(x; theta_0) + J(x; theta_0) (theta - theta_0),   J = d f / d theta,

computed as one forward-mode pass ``torch.func.jvp`` of ``functional_call(model, ...)`` at theta_0
along the tangent ``theta - theta_0`` (no vmap, no Jacobian is built). Gradients of a loss on
f_lin flow to theta through the tangent, so ``d f_lin / d theta = J(x; theta_0)`` at every theta:
training f_lin with gradient descent is kernel regression with the initial NTK. If training
stays in the kernel regime, the real and linearised models stay close (Malladi et al. 2023,
"A kernel-based view of language model fine-tuning", section 4).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> lin = LinearisedModel(net, params="all")
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> bool(torch.allclose(lin(x), net(x)))  # equal at theta = theta_0
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from experiments.dynamics.tracking import ProbeSet, eval_mode, forward_numerics, logits_of, model_inputs
from experiments.records import accuracy
from experiments.training.callbacks import Callback, TrainState
from ntk import select_parameters
from ntk._params import ParamSelector

__all__ = ["LinearisedModel", "LinearisedTracker"]


class LinearisedModel(nn.Module):
    """``f_lin(x; theta) = f(x; theta_0) + J(x; theta_0) (theta - theta_0)`` over a parameter set.

    Attributes:
        names: the selected parameter names of the wrapped model, in its parameter order.
        theta: ``nn.ParameterList``, the trainable copies of the selected parameters (start at theta_0).

    The wrapped model is held by reference, not as a submodule (its parameters are not this
    module's). theta_0 is a detached copy taken at construction (buffers ``theta0_i``); the other
    parameters and the buffers are copied too (``copy_frozen=True``), so later changes of the
    live model never move f_lin. The base model is evaluated in eval mode (dropout off; its own
    flags are restored after each call) with the math attention backend (fused kernels have no
    forward-mode derivative). Keep the wrapper on the model's device.

    Cost: one jvp, about 2-3 forwards of the batch; its backward about one more backward.
    """

    def __init__(self, model: nn.Module, params: ParamSelector = "trainable", *, copy_frozen: bool = True):
        super().__init__()
        selected = select_parameters(model, params)
        self.names: tuple[str, ...] = tuple(selected)
        object.__setattr__(self, "base", model)  # a reference, not a registered submodule
        self.theta = nn.ParameterList(nn.Parameter(t.detach().clone()) for t in selected.values())
        for i, t in enumerate(selected.values()):
            self.register_buffer(f"theta0_{i}", t.detach().clone())
        frozen: dict[str, torch.Tensor] = {}
        if copy_frozen:
            frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in selected}
            frozen.update({n: b.detach().clone() for n, b in model.named_buffers()})
        self._frozen = frozen

    def theta0(self) -> tuple[torch.Tensor, ...]:
        """The expansion point, one tensor per selected parameter."""
        return tuple(self.get_buffer(f"theta0_{i}") for i in range(len(self.names)))

    def named_theta(self) -> dict[str, torch.Tensor]:
        """``{name in the base model: current theta}`` (live ``nn.Parameter`` objects)."""
        return dict(zip(self.names, self.theta, strict=True))

    def delta_norm(self) -> float:
        """``||theta - theta_0||_2`` over all selected tensors, in float64."""
        return _distance(tuple(self.theta), self.theta0())

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits ``(N, C)`` for the base model's inputs (a ``labels`` keyword is dropped).

        Returns the ``.logits`` of a transformers output, or the output tensor itself.
        """
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        theta0 = self.theta0()
        tangents = tuple(p - p0 for p, p0 in zip(self.theta, theta0, strict=True))
        base: nn.Module = self.base  # type: ignore[assignment]

        def f(*primals: torch.Tensor) -> torch.Tensor:
            values = {**self._frozen, **dict(zip(self.names, primals, strict=True))}
            return logits_of(functional_call(base, values, args, kwargs))

        with eval_mode(base), forward_numerics():
            primal_out, tangent_out = jvp(f, theta0, tangents)[:2]
        return primal_out + tangent_out


def _distance(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    pairs = zip(a, b, strict=True)
    return math.sqrt(sum(float(((x.detach().double() - y.detach().double()) ** 2).sum()) for x, y in pairs))


class LinearisedTracker(Callback):
    """Trains a :class:`LinearisedModel` in lock-step with the real model; logs the gap.

    At every optimiser step of the real model, the linearised model takes one step on the same
    batch with cross-entropy loss, an optimiser of the same class with the same per-group
    hyper-parameters as ``state.optimizer`` (read from its param groups: lr, betas, momentum,
    weight decay, ...), the same learning rate at that step (the scheduler's value the real step
    used) and the same gradient clipping (``state.config.clip_norm``). The linearised model is
    run in float32/float64 without autocast and without dropout; if the real model trains with
    dropout or mixed precision, the gap includes their effect.

    Every ``every`` steps (and at the start and the last step) one row ``kind="linearised"``:
    on the probe set (``probe_size`` validation examples chosen by ``probe_seed``),
    ``gap_rel = ||F_real - F_lin||_F / ||F_real||_F``, ``gap_max = max |F_real - F_lin|`` over
    the logits ``(n_probe, C)``, ``accuracy_real``, ``accuracy_lin``, ``loss_real``, ``loss_lin``
    (mean cross-entropy), ``delta_real = ||theta_real - theta_0||``, ``delta_lin`` and
    ``param_gap = ||theta_real - theta_lin|| / ||theta_real - theta_0||`` (NaN at step 0).
    """

    def __init__(self, every: int = 10, *, probe_size: int = 64, probe_seed: int = 0,
                 params: ParamSelector = "trainable", copy_frozen: bool = True):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer number of steps, got {every!r}")
        self.every = every
        self.probe = ProbeSet(probe_size, probe_seed)
        self.params = params
        self.copy_frozen = copy_frozen
        self.lin: LinearisedModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._lrs: tuple[int, list[float]] | None = None  # (scheduler epoch, lr per group) last seen
        self._last_logged = -1
        self._pending: dict[str, Any] | None = None
        self._group_index: list[int] = []  # real param group of each linearised group

    # -- set-up ---------------------------------------------------------------------------------
    def _build(self, state: TrainState) -> None:
        lin = LinearisedModel(state.model, self.params, copy_frozen=self.copy_frozen)
        live = dict(state.model.named_parameters())
        group_of = {id(p): i for i, g in enumerate(state.optimizer.param_groups) for p in g["params"]}
        groups: list[dict[str, Any]] = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": []}
            for g in state.optimizer.param_groups
        ]
        for name, p in lin.named_theta().items():
            i = group_of.get(id(live[name]))
            if i is None:
                raise ValueError(
                    f"parameter {name!r} is selected for the linearised model but the real "
                    "optimiser does not train it; select the method's trainable parameters"
                )
            groups[i]["params"].append(p)
        self._group_index = [i for i, g in enumerate(groups) if g["params"]]
        self.optimizer = type(state.optimizer)([groups[i] for i in self._group_index])  # type: ignore[call-arg]
        self.lin = lin
        self.probe.choose(state.data)

    def on_start(self, state: TrainState) -> None:
        if self._pending is not None:
            self._build(state)
            self._restore(self._pending)
            self._pending = None
            return
        if state.step != 0:
            raise RuntimeError(
                f"LinearisedTracker started at step {state.step} without its saved state: theta_0 "
                "must be the parameters at step 0; resume with the checkpoint's callback state"
            )
        self._build(state)
        self._lrs = (state.scheduler.last_epoch, [g["lr"] for g in state.optimizer.param_groups])
        self._evaluate(state)

    # -- per step -------------------------------------------------------------------------------
    def _lrs_used(self, state: TrainState) -> list[float]:
        """The learning rates (per group) the real optimiser used for step ``state.step``."""
        epoch = state.scheduler.last_epoch
        now = [g["lr"] for g in state.optimizer.param_groups]
        if epoch == state.step - 1:  # the scheduler has not stepped yet
            used = now
        elif epoch == state.step and self._lrs is not None and self._lrs[0] == epoch - 1:
            used = self._lrs[1]
        else:
            raise RuntimeError(
                f"cannot tell the learning rate of step {state.step}: scheduler epoch {epoch}, last "
                f"seen {None if self._lrs is None else self._lrs[0]}; on_batch_end must run once per step"
            )
        self._lrs = (epoch, now)
        return used

    def on_batch_end(self, state: TrainState, batch: dict[str, torch.Tensor], loss: float) -> None:
        if self.lin is None or self.optimizer is None:
            raise RuntimeError("LinearisedTracker.on_batch_end called before on_start")
        lrs = self._lrs_used(state)
        for g, i in zip(self.optimizer.param_groups, self._group_index, strict=True):
            g["lr"] = lrs[i]
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.lin(**model_inputs(batch))
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        lin_loss = F.cross_entropy(logits, batch["labels"])
        lin_loss.backward()
        clip = getattr(state.config, "clip_norm", None)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.lin.parameters(), clip)
        self.optimizer.step()
        if state.step % self.every == 0 or state.step == state.config.steps:
            self._evaluate(state)

    def on_end(self, state: TrainState) -> None:
        if self.lin is not None and self._last_logged != state.step:
            self._evaluate(state)

    # -- measurement ----------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, state: TrainState) -> None:
        assert self.lin is not None
        x, labels = self.probe.inputs(state.data, state.device)
        with eval_mode(state.model):
            real = logits_of(state.model(**x))
        lin = self.lin(**x)
        diff = (real.double() - lin.double())
        live = select_parameters(state.model, list(self.lin.names))
        theta_real = tuple(live.values())
        theta0 = self.lin.theta0()
        delta_real = _distance(theta_real, theta0)
        gap = _distance(theta_real, tuple(self.lin.theta))
        state.log(
            "linearised",
            gap_rel=float(diff.norm() / real.double().norm().clamp_min(1e-300)),
            gap_max=float(diff.abs().max()),
            accuracy_real=accuracy(real.argmax(-1), labels),
            accuracy_lin=accuracy(lin.argmax(-1), labels),
            loss_real=float(F.cross_entropy(real.double(), labels)),
            loss_lin=float(F.cross_entropy(lin.double(), labels)),
            delta_real=delta_real,
            delta_lin=self.lin.delta_norm(),
            param_gap=gap / delta_real if delta_real > 0 else math.nan,
            n_probe=len(labels),
        )
        self._last_logged = state.step

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.lin is None or self.optimizer is None:
            return {}
        return {
            "names": list(self.lin.names),
            "theta0": [t.detach().cpu().clone() for t in self.lin.theta0()],
            "theta": [p.detach().cpu().clone() for p in self.lin.theta],
            "optimizer": self.optimizer.state_dict(),
            "lr_epoch": None if self._lrs is None else self._lrs[0],
            "lrs": None if self._lrs is None else list(self._lrs[1]),
            "last_logged": self._last_logged,
            "probe": None if self.probe.indices is None else list(self.probe.indices),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        missing = {"names", "theta0", "theta", "optimizer"} - set(state)
        if missing:
            raise ValueError(f"LinearisedTracker state lacks {sorted(missing)}; was it saved by this class?")
        self._pending = dict(state)

    def _restore(self, saved: dict[str, Any]) -> None:
        assert self.lin is not None and self.optimizer is not None
        if list(saved["names"]) != list(self.lin.names):
            raise ValueError("the saved linearised model has other parameters than this model's selection: "
                             f"{list(saved['names'])[:3]}... vs {list(self.lin.names)[:3]}...")
        if saved.get("probe") is not None and list(saved["probe"]) != list(self.probe.indices or []):
            raise ValueError("the probe set differs from the saved run's (other data, probe_size or "
                             "probe_seed)")
        with torch.no_grad():
            for i, (t0, t) in enumerate(zip(saved["theta0"], saved["theta"], strict=True)):
                self.lin.get_buffer(f"theta0_{i}").copy_(t0)
                self.lin.theta[i].copy_(t)
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("lr_epoch") is not None:
            self._lrs = (int(saved["lr_epoch"]), [float(v) for v in saved["lrs"]])
        self._last_logged = int(saved.get("last_logged", -1))


"""Kernel snapshots along training: how far the NTK and the Jacobian move from their initial values.

:class:`KernelTracker` is a training callback. On a fixed probe set (``probe_size`` validation
examples chosen by ``probe_seed``) it computes, at step 0 and at chosen steps, the empirical NTK
of the method's trained parameter set on the *live* model (``ntk.kernels``; the parameter dict
is rebuilt from ``model.named_parameters()`` at every snapshot, never reused from step 0: a copy
taken before training would make the "after training" kernel silently equal the initial one,
see ``docs/theory/claims.md``) and logs one row ``kind="kernel"``:

- ``kernel_distance = 1 - <K_t, K_0>_F / (||K_t||_F ||K_0||_F)`` (Fort et al. 2020) and
  ``scale_ratio = ||K_t||_F / ||K_0||_F`` (Propulsion's ``(k z**(k-1))**2`` factor moves it);
- with ``compare_full``: ``alignment_full``, ``cka_full`` between ``K_t`` and the full fine-tuning
  kernel (all parameters) at the same live parameters, and that kernel's own distance to its
  initial value (``kernel_distance_full``); expensive on a real model;
- ``kta``: kernel-target alignment of ``K_t`` with the probe labels (centred one-hot);
- ``jacobian_drift = ||J_t - J_0||_F / ||J_0||_F``, J the ``(n_probe, C, P)`` Jacobian of the
  logits over the trained parameters (see :func:`jacobian`, :func:`jacobian_projections`).

For a Propulsion model it also logs per wrapped layer the distribution of ``z``, ``z**k`` and the
kernel factor ``(k z**(k-1))**2`` (min, quantiles, max, mean) as ``kind="z"`` rows.

The kernel output defaults to ``"trace"`` (``(n, n)``, the sum over logits of ``K[a, b, c, c]``):
C times cheaper to contract than ``"full"`` and enough for distances and alignments; pass
``output="full"`` for the ``(n, n, C, C)`` kernel. Kernels accumulate in float64 (ntk) while the
model stays in its own dtype. Kernels are saved under ``out_dir/kernels/`` (safetensors, with a
``manifest.json``), so figures never recompute them.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn
from torch.func import functional_call, jvp, vmap

import ntk
from experiments.data.encoding import EncodedSplits
from experiments.records import read_json, verify_file, write_bytes, write_json
from experiments.training.callbacks import Callback, TrainState
from ntk import metrics
from ntk._params import ParamSelector
from ntk._problem import default_output_fn
from ntk.reference import reference_jacobians
from propulsion.model import propulsion_layers

__all__ = [
    "JACOBIAN_MODES", "KernelTracker", "KernelTrackerConfig", "ProbeSet",
    "jacobian", "jacobian_projections", "z_statistics",
]

JACOBIAN_MODES = ("auto", "exact", "estimate", "off")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# --------------------------------------------------------------------------------------------
# Shared helpers (also used by experiments.dynamics.linearised)
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block; every submodule's own ``training`` flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


@contextlib.contextmanager
def forward_numerics() -> Iterator[None]:
    """TF32 off and the math backend of ``scaled_dot_product_attention`` (fused kernels have no
    forward-mode derivative); the caller's settings are restored."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def logits_of(out: Any) -> torch.Tensor:
    """``out.logits`` for a transformers output, else the output tensor itself."""
    return default_output_fn(out)


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch without its ``labels`` (what the model and the kernels take)."""
    return {k: v for k, v in batch.items() if k != "labels"}


@dataclass
class ProbeSet:
    """``size`` examples of a split, chosen once by ``seed`` (sorted indices); all if fewer."""

    size: int = 64
    seed: int = 0
    split: str = "validation"
    indices: list[int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"probe_size must be a positive integer, got {self.size!r}")
        if self.split not in ("train", "validation", "test"):
            raise ValueError(f"probe split must be train, validation or test, got {self.split!r}")

    def choose(self, data: EncodedSplits) -> list[int]:
        n = len(getattr(data, self.split))
        if n == 0:
            raise ValueError(f"the {self.split} split is empty: no probe examples to choose from")
        g = torch.Generator().manual_seed(self.seed)
        self.indices = sorted(torch.randperm(n, generator=g)[: min(self.size, n)].tolist())
        return self.indices

    def inputs(self, data: EncodedSplits, device: torch.device | str | None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(model inputs, labels)`` of the probe examples, trimmed to the longest one."""
        indices = self.indices if self.indices is not None else self.choose(data)
        batch = getattr(data, self.split).batch(indices, device=device)
        return model_inputs(batch), batch["labels"]


# --------------------------------------------------------------------------------------------
# Jacobians
# --------------------------------------------------------------------------------------------
def jacobian(model: nn.Module, x: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """``J[a, c, p] = d f_c(x_a) / d theta_p`` over the named parameters at their live values.

    The reference loop :func:`ntk.reference.reference_jacobians` (one forward and C backward
    passes per example, eval mode), parameters flattened and concatenated in ``names`` order.
    Returns ``(N, C, P)`` in the parameters' dtype.
    """
    live = dict(model.named_parameters())
    with eval_mode(model):
        parts = reference_jacobians(model, dict(x), names, logits_of)
    return torch.cat([parts[k] for k in names], dim=2).to(live[names[0]].dtype)


def _rademacher(shapes: list[tuple[torch.Size, torch.dtype, torch.device]], seed: int, s: int
                ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + s)
    return tuple((torch.randint(0, 2, shape, generator=g) * 2 - 1).to(device=dev, dtype=dt)
                 for shape, dt, dev in shapes)


def jacobian_projections(model: nn.Module, x: Mapping[str, torch.Tensor], names: list[str], probes: int,
                         seed: int, chunk: int = 8) -> torch.Tensor:
    """Random projections ``P[a, c, s] = J[a, c, :] . v_s`` with Rademacher ``v_s`` in {-1, +1}^P.

    Each ``v_s`` is regenerated from ``(seed, s)``, so projections of two checkpoints use the
    same directions. Since ``E[v v^T] = I``, ``E_s ||(J_t - J_0) v_s||^2 = ||J_t - J_0||_F^2``:
    the mean over ``s`` is an unbiased estimate. One jvp of the probe batch per ``s``, ``chunk``
    of them at a time under ``vmap`` over the tangents (the inputs are not vmapped). Memory:
    about ``chunk`` forwards' activations. Returns ``(N, C, probes)`` in float64.
    """
    live = dict(model.named_parameters())
    primals = tuple(live[k].detach() for k in names)
    shapes = [(p.shape, p.dtype, p.device) for p in primals]

    def f(*theta: torch.Tensor) -> torch.Tensor:
        return logits_of(functional_call(model, dict(zip(names, theta, strict=True)), (), dict(x)))

    def directional(*v: torch.Tensor) -> torch.Tensor:
        return jvp(f, primals, v)[1]

    cols = []
    with eval_mode(model), forward_numerics(), torch.no_grad():
        for first in range(0, probes, chunk):
            vs = [_rademacher(shapes, seed, s) for s in range(first, min(first + chunk, probes))]
            stacked = tuple(torch.stack([v[i] for v in vs]) for i in range(len(primals)))
            cols.append(vmap(directional)(*stacked).double())  # (chunk, N, C)
    return torch.cat(cols).permute(1, 2, 0)


# --------------------------------------------------------------------------------------------
# Propulsion z
# --------------------------------------------------------------------------------------------
def z_statistics(model: nn.Module) -> list[dict[str, Any]]:
    """Per Propulsion layer and quantity (``z``, ``z**k``, ``kernel_factor = (k z**(k-1))**2``):
    numel, min, q05, q25, median, q75, q95, max, mean (float64). Empty for other models."""
    rows = []
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    for path, layer in propulsion_layers(model).items():
        z = layer.propulsion_z.detach().double().cpu()
        k = layer.degree
        for quantity, v in (("z", z), ("z**k", z ** k), ("kernel_factor", (k * z ** (k - 1)) ** 2)):
            qs = torch.quantile(v, q).tolist()
            rows.append({"layer": path, "degree": k, "quantity": quantity, "numel": v.numel(),
                         "min": float(v.min()), "q05": qs[0], "q25": qs[1], "median": qs[2],
                         "q75": qs[3], "q95": qs[4], "max": float(v.max()), "mean": float(v.mean())})
    return rows


# --------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelTrackerConfig:
    """What :class:`KernelTracker` measures and when.

    steps: snapshot steps (besides step 0, taken at ``on_start``, and the run's last step).
    every: also snapshot every ``every`` steps (0: never).
    probe_size, probe_seed: the probe set (validation examples).
    params: the trained set whose kernel is tracked (default the model's trainable parameters
        at step 0; the names are fixed then and the values read live at every snapshot).
    output: kernel layout, "trace" (default, ``(n, n)``), "full", "diagonal" or "sum_logits".
    compare_full: also compute the full fine-tuning kernel (all parameters) at every snapshot.
    jacobian: "exact" (store J_0, ``(n, C, P)``), "estimate" (``jacobian_probes`` Rademacher
        projections, ``jacobian_chunk`` jvps at a time under vmap: memory about that many
        forwards of the probe batch), "auto" (exact when ``2 n C P`` entries fit
        ``jacobian_max_bytes``) or "off".
    save_kernels: write every snapshot's kernels (the initial file is always written: resume
        needs it).
    memory_budget: bytes for the kernel computation (None: ntk's default share of free memory).
    """

    steps: tuple[int, ...] = ()
    every: int = 0
    probe_size: int = 64
    probe_seed: int = 0
    params: ParamSelector = "trainable"
    output: str = "trace"
    compare_full: bool = False
    jacobian: str = "auto"
    jacobian_probes: int = 16
    jacobian_seed: int = 0
    jacobian_chunk: int = 8
    jacobian_max_bytes: int = 2 ** 30
    save_kernels: bool = True
    memory_budget: float | None = None

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
            raise ValueError(f"steps must be integers >= 0, got {self.steps!r}")
        object.__setattr__(self, "steps", tuple(sorted(set(steps))))
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"every must be an integer >= 0 (0: off), got {self.every!r}")
        ProbeSet(self.probe_size, self.probe_seed)  # validates
        if self.output not in ntk.OUTPUTS:
            raise ValueError(f"output must be one of {list(ntk.OUTPUTS)}, got {self.output!r}")
        if self.jacobian not in JACOBIAN_MODES:
            raise ValueError(f"jacobian must be one of {JACOBIAN_MODES}, got {self.jacobian!r}")
        if min(self.jacobian_probes, self.jacobian_max_bytes, self.jacobian_chunk) < 1:
            raise ValueError("jacobian_probes, jacobian_max_bytes and jacobian_chunk must be positive, got "
                             f"{self.jacobian_probes}, {self.jacobian_max_bytes}, {self.jacobian_chunk}")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """Write the tensors atomically; returns the file's sha256."""
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_bytes(path, save(clean, metadata=meta))


class KernelTracker(Callback):
    """Kernel snapshots on a fixed probe set; see the module docstring for the rows it logs."""

    INITIAL = "kernels/initial.safetensors"

    def __init__(self, config: KernelTrackerConfig | None = None, **overrides: Any):
        self.config = replace(config or KernelTrackerConfig(), **overrides)
        self.probe = ProbeSet(self.config.probe_size, self.config.probe_seed)
        self.names: list[str] = []
        self.jacobian_mode = "off"
        self.initial: dict[str, torch.Tensor] = {}
        self.done: list[int] = []
        self._pending: dict[str, Any] | None = None
        self.initial_sha256: str | None = None

    # -- hooks ----------------------------------------------------------------------------------
    def on_start(self, state: TrainState) -> None:
        self.probe.choose(state.data)
        if self._pending is not None:
            self._restore(state, self._pending)
            self._pending = None
            return
        if state.step != 0:
            raise RuntimeError(
                f"KernelTracker started at step {state.step} without its saved state: the initial kernel "
                "is the one at step 0; resume with the checkpoint's callback state")
        self.names = list(ntk.select_parameters(state.model, self.config.params))
        self.jacobian_mode = self._choose_jacobian(state)
        self._snapshot(state, initial=True)

    def on_batch_end(self, state: TrainState, batch: dict[str, torch.Tensor], loss: float) -> None:
        s, cfg = state.step, self.config
        if s in cfg.steps or (cfg.every and s % cfg.every == 0) or s == state.config.steps:
            self._snapshot(state)

    def on_end(self, state: TrainState) -> None:
        if not self.names or state.step in self.done:
            return
        live = ntk.select_parameters(state.model, self.names)
        if not all(bool(torch.isfinite(t).all()) for t in live.values()):
            warnings.warn(f"KernelTracker: no final snapshot at step {state.step}: the parameters are "
                          "not finite", stacklevel=2)
            return
        self._snapshot(state)

    # -- measurement ----------------------------------------------------------------------------
    def _choose_jacobian(self, state: TrainState) -> str:
        cfg = self.config
        if cfg.jacobian in ("off", "estimate"):
            return cfg.jacobian
        live = ntk.select_parameters(state.model, self.names)
        p = sum(t.numel() for t in live.values())
        n, c = len(self.probe.indices or []), state.data.num_labels
        size = next(iter(live.values())).element_size()
        need = 2 * n * c * p * size
        if need <= cfg.jacobian_max_bytes:
            return "exact"
        if cfg.jacobian == "exact":
            raise ntk.KernelTooLargeError(
                f"exact Jacobian drift needs J_0 and J_t, 2 x {n} probe examples x {c} outputs x {p:,} "
                f"parameters x {size} bytes = {need / 2**20:,.1f} MiB > jacobian_max_bytes="
                f"{cfg.jacobian_max_bytes / 2**20:,.1f} MiB; use jacobian='estimate' (unbiased random "
                "projections), fewer probe examples, or raise jacobian_max_bytes"
            )
        return "estimate"

    def _jacobian_features(self, model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.jacobian_mode == "exact":
            return jacobian(model, x, self.names).detach().cpu()
        if self.jacobian_mode == "estimate":
            cfg = self.config
            return jacobian_projections(model, x, self.names, cfg.jacobian_probes, cfg.jacobian_seed,
                                        chunk=cfg.jacobian_chunk).cpu()
        return None

    def _kernels(self, model: nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sets: dict[str, ParamSelector] = {"trained": self.names}
        if self.config.compare_full:
            sets["full"] = "all"
        kw: dict[str, Any] = {"output": self.config.output, "memory_budget": self.config.memory_budget}
        try:
            ks = ntk.kernels(model, x, params=sets, **kw)
        except ntk.StructuredError:  # a parameter the structured engine cannot attribute
            ks = {k: ntk.empirical_ntk(model, x, params=v, **kw) for k, v in sets.items()}
        return {k: v.detach().cpu() for k, v in ks.items() if isinstance(v, torch.Tensor)}

    def _drift(self, feats: torch.Tensor | None) -> tuple[float, float]:
        """``(drift, standard error)``; see :func:`jacobian_projections` for the estimate."""
        if feats is None:
            return math.nan, math.nan
        f0 = self.initial["jacobian"].double()
        d = feats.double() - f0
        if self.jacobian_mode == "exact":
            return float(d.norm() / f0.norm()), 0.0
        per_probe = (d ** 2).sum(dim=(0, 1))  # (S,): unbiased estimates of ||J_t - J_0||_F^2
        num = float(per_probe.mean())
        se_num = float(per_probe.std() / math.sqrt(len(per_probe))) if len(per_probe) > 1 else math.nan
        den = self._j0_norm2()
        drift = math.sqrt(max(num, 0.0) / den)
        return drift, (se_num / (2 * math.sqrt(num * den)) if num > 0 else math.nan)

    def _j0_norm2(self) -> float:
        """``||J_0||_F^2``: exactly the trace of the initial kernel unless output is sum_logits."""
        k0 = self.initial["trained"].double()
        if self.config.output == "full":
            return float(torch.diagonal(torch.diagonal(k0, dim1=0, dim2=1), dim1=0, dim2=1).sum())
        if self.config.output in ("trace", "diagonal"):
            return float(torch.diagonal(k0, dim1=0, dim2=1).sum())
        return float((self.initial["jacobian"].double() ** 2).sum(dim=(0, 1)).mean())

    def _snapshot(self, state: TrainState, initial: bool = False) -> None:
        start = time.perf_counter()
        x, labels = self.probe.inputs(state.data, state.device)
        ks = self._kernels(state.model, x)
        feats = self._jacobian_features(state.model, x)
        if initial:
            self.initial = dict(ks)
            if feats is not None:
                self.initial["jacobian"] = feats
            self._save_initial(state, labels)
        k0 = self.initial["trained"]
        kt = ks["trained"]
        drift, drift_se = self._drift(feats)
        row: dict[str, Any] = {
            "output": self.config.output, "n_probe": len(labels), "n_params": self._numel(state.model),
            "kernel_distance": metrics.kernel_distance(kt, k0),
            "scale_ratio": float(kt.norm() / k0.norm()),
            "kta": _kta(kt, labels.cpu(), state.data.num_labels),
            "alignment_full": math.nan, "cka_full": math.nan, "kernel_distance_full": math.nan,
            "kta_full": math.nan,
            "jacobian_drift": drift, "jacobian_drift_se": drift_se, "jacobian_mode": self.jacobian_mode,
        }
        if "full" in ks:
            row.update(alignment_full=metrics.alignment(kt, ks["full"]),
                       cka_full=metrics.cka(kt, ks["full"], sym_tol=1e-4),
                       kernel_distance_full=metrics.kernel_distance(ks["full"], self.initial["full"]),
                       kta_full=_kta(ks["full"], labels.cpu(), state.data.num_labels))
        row["seconds"] = time.perf_counter() - start
        if self.config.save_kernels:
            self._save_step(state, ks)
        state.log("kernel", **row)
        for z_row in z_statistics(state.model):
            state.log("z", **z_row)
        self.done.append(state.step)

    def _numel(self, model: nn.Module) -> int:
        return sum(t.numel() for t in ntk.select_parameters(model, self.names).values())

    # -- files ----------------------------------------------------------------------------------
    def _save_initial(self, state: TrainState, labels: torch.Tensor) -> None:
        tensors = {**self.initial, "probe_indices": torch.tensor(self.probe.indices),
                   "probe_labels": labels.cpu()}
        meta = {"names": json.dumps(self.names), "jacobian_mode": self.jacobian_mode,
                "output": self.config.output, "jacobian_probes": str(self.config.jacobian_probes),
                "jacobian_seed": str(self.config.jacobian_seed)}
        self.initial_sha256 = _save_tensors(Path(state.out_dir) / self.INITIAL, tensors, meta)

    def _save_step(self, state: TrainState, ks: dict[str, torch.Tensor]) -> None:
        folder = Path(state.out_dir) / "kernels"
        name = f"step_{state.step:07d}.safetensors"
        digest = _save_tensors(folder / name, ks, {"step": str(state.step), "output": self.config.output})
        manifest_path = folder / "manifest.json"
        manifest = read_json(manifest_path, require_checksum=False) if manifest_path.exists() else {}
        cfg = {k: v for k, v in asdict(self.config).items() if k != "params"}
        manifest.update(config=cfg, params=self.names, probe_split=self.probe.split,
                        probe_indices=self.probe.indices, initial=Path(self.INITIAL).name)
        snaps = {int(k): v for k, v in manifest.get("snapshots", {}).items()}
        snaps[state.step] = {"file": name, "sha256": digest,
                             "kernels": {k: list(v.shape) for k, v in ks.items()}}
        manifest["snapshots"] = {str(k): snaps[k] for k in sorted(snaps)}
        write_json(manifest, manifest_path)

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.names:
            return {}
        return {"names": list(self.names), "probe": list(self.probe.indices or []),
                "jacobian_mode": self.jacobian_mode, "done": list(self.done), "initial_file": self.INITIAL,
                "initial_sha256": self.initial_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        missing = {"names", "probe", "jacobian_mode", "done", "initial_file"} - set(state)
        if missing:
            raise ValueError(f"KernelTracker state lacks {sorted(missing)}; was it saved by this class?")
        self._pending = dict(state)

    def _restore(self, state: TrainState, saved: dict[str, Any]) -> None:
        if list(saved["probe"]) != self.probe.indices:
            raise ValueError("the probe set differs from the saved run's (other data, probe_size or "
                             "probe_seed)")
        path = Path(state.out_dir) / saved["initial_file"]
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the initial kernel and Jacobian of the resumed "
                                    "run are stored there; restore the run folder or start afresh")
        verify_file(path, saved.get("initial_sha256"), "delete the run folder to start it afresh")
        tensors = load_file(str(path))
        self.initial_sha256 = saved["initial_sha256"]
        self.names = list(saved["names"])
        ntk.select_parameters(state.model, self.names)  # raises if the model lacks them
        self.jacobian_mode = str(saved["jacobian_mode"])
        self.done = [int(s) for s in saved["done"]]
        self.initial = {k: v for k, v in tensors.items() if not k.startswith("probe_")}


def _kta(k: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """Kernel-target alignment; NaN when every probe label is the same class (undefined)."""
    if labels.unique().numel() < 2:
        return math.nan
    if k.dim() == 2:
        return metrics.kernel_target_alignment(k, labels, num_labels)
    return metrics.kernel_target_alignment(k, labels)

"""What every experiment of the suite shares: its config, its results folder, its verdicts.

* :class:`ExperimentConfig` - frozen dataclass (seed, device, kernel dtype); an experiment's
  ``Config`` subclasses it and holds its sizes and its verdict thresholds as fields.
* :class:`Store` - the results folder of one experiment, ``root/name/``: ``config.json``,
  ``units/<unit>.parquet`` (tables) or ``units/<unit>.safetensors`` (arrays), each followed by a
  ``units/<unit>.done`` marker, and ``provenance.json``. Every file is written to a temporary
  file in its folder and moved into place, so an interrupted unit is simply not done.
* :class:`Verdict` and :func:`decide` - a verdict is derived from a number and two stated rules,
  never written by hand.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import operator
import os
import platform
import re
import subprocess
import tempfile
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd

__all__ = [
    # configs
    "ExperimentConfig", "resolve_device",
    # results
    "Store", "ResultsMismatchError", "MissingResultError", "atomic_path",
    # verdicts
    "Verdict", "VERDICTS", "Rule", "decide", "rule_text", "make_verdict", "make_interval_verdict",
]

C = TypeVar("C", bound="ExperimentConfig")
_DEVICES = ("cpu", "cuda", "auto")
_DTYPES = ("float64", "float32")


def resolve_device(device: str) -> str:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when present) to a torch device string.

    Raises:
        ValueError: unknown name, or ``"cuda"`` asked on a machine without CUDA.
    """
    import torch

    if device not in _DEVICES:
        raise ValueError(f"device must be one of {', '.join(_DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked but CUDA is not available on this machine "
                         f"(torch {torch.__version__}); use --device cpu or --device auto")
    return device


THRESHOLD_MARKERS = ("support", "refute")


def is_threshold(field_name: str) -> bool:
    """Verdict thresholds are the config fields whose name contains "support" or "refute"."""
    return any(marker in field_name for marker in THRESHOLD_MARKERS)


@dataclass(frozen=True)
class ExperimentConfig:
    """Fields every experiment has; subclasses add theirs (sizes, thresholds), all with help text."""

    seed: int = field(default=0, metadata={"help": "seed of every random choice (weights, data, order)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, or auto (cuda when present)"})
    kernel_dtype: str = field(default="float64", metadata={"help": "dtype kernels accumulate in"})

    def __post_init__(self) -> None:
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {', '.join(_DEVICES)}, got {self.device!r}")
        if self.kernel_dtype not in _DTYPES:
            raise ValueError(f"kernel_dtype must be one of {', '.join(_DTYPES)}, got {self.kernel_dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    # -- views -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Field name -> value (tuples as lists), in field order; JSON-serialisable."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity(self) -> dict[str, Any]:
        """What the results depend on: :meth:`to_dict` without ``device`` and the verdict
        thresholds (fields whose name contains "support" or "refute")."""
        return {k: v for k, v in self.to_dict().items() if k != "device" and not is_threshold(k)}

    def config_hash(self, name: str = "") -> str:
        """sha256 of the JSON of :meth:`identity` (keys sorted) and the experiment ``name``.

        ``device`` is left out: it says where to compute, not what, so a run may resume on
        another device (the device of each run is in ``provenance.json``). Verdict thresholds
        are left out: they judge results without changing them, so changing one re-decides the
        verdicts from the saved numbers and recomputes nothing.
        """
        text = json.dumps({"experiment": name, "config": self.identity()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def resolve_device(self) -> str:
        """The torch device string of :attr:`device` (raises when CUDA is asked and absent)."""
        return resolve_device(self.device)

    @property
    def torch_kernel_dtype(self):  # -> torch.dtype
        import torch

        return getattr(torch, self.kernel_dtype)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    def replace(self: C, **overrides: Any) -> C:
        """A copy with ``overrides``; string values are parsed to the field's type (for ``--set``).

        Raises:
            ValueError: an unknown field (the message lists the known ones) or a value that does
                not parse or validate.
        """
        return dataclasses.replace(self, **_coerce(type(self), overrides))

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Inverse of :meth:`to_dict` (lists back to tuples); unknown keys raise ValueError."""
        return cls(**_coerce(cls, dict(values)))


def parse_assignments(pairs: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=x,y"]`` -> ``{"a": "1", "b": "x,y"}`` (the CLI's ``--set``)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{cls.__qualname__} has no field(s) {unknown}; fields: {', '.join(names)}")
    return {k: _convert(k, v, hints[k]) for k, v in values.items()}


def _convert(name: str, value: Any, kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if args and type(None) in args and origin is not tuple:  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        item_kind = args[0] if args else str
        return tuple(_convert(name, v.strip() if isinstance(v, str) else v, item_kind) for v in items
                     if not (isinstance(v, str) and v.strip() == ""))
    if not isinstance(value, str) or kind is str:
        return value
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        kind_name = getattr(kind, "__name__", kind)
        raise ValueError(f"field {name}: cannot read {value!r} as {kind_name}") from None


# -------------------------------------------------------------------------------- results ----
class ResultsMismatchError(ValueError):
    """A results folder holds results of another configuration."""


class MissingResultError(FileNotFoundError):
    """A unit of results that a figure or a verdict needs has not been computed."""


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path in ``target``'s folder; moved onto ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


_UNIT_PART = re.compile(r"^[A-Za-z0-9_=+,-][A-Za-z0-9_.=+,-]*$")


def _check_unit(unit: str) -> str:
    parts = unit.split("/")
    if not unit or not all(_UNIT_PART.match(p) for p in parts):
        raise ValueError(f"bad unit name {unit!r}: use '/'-separated parts of letters, digits and _.=+,- "
                         "(not starting with '.')")
    return unit


class Store:
    """The results folder ``root/name`` of one experiment under one configuration.

    Opening writes ``config.json`` (atomically) or checks that the one there has the same
    :meth:`ExperimentConfig.config_hash`; a unit is done once its ``.done`` marker exists, which
    is written only after its data file is in place.

    Raises:
        ResultsMismatchError: ``root/name`` holds results of another configuration.
    """

    def __init__(self, root: str | Path, name: str, config: ExperimentConfig) -> None:
        self.root, self.name, self.config = Path(root), name, config
        self.dir = self.root / name
        self.units_dir = self.dir / "units"
        self.hash = config.config_hash(name)
        self._opened = time.perf_counter()
        path = self.dir / "config.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("config_hash") != self.hash and not self._same_identity(stored):
                raise ResultsMismatchError(
                    f"{self.dir} holds results of another configuration (config hash "
                    f"{str(stored.get('config_hash'))[:12]}..., this run {self.hash[:12]}...); "
                    "give another --out folder, or delete that folder to recompute"
                )
        if not path.exists() or json.loads(path.read_text()).get("config") != config.to_dict():
            # new, or the same computation judged by other thresholds (or run on another device)
            _write_json(path, {"experiment": name, "config_hash": self.hash,
                               "config_class": type(config).__qualname__, "config": config.to_dict()})
        self.reused: list[str] = self.units()
        self.computed: list[str] = []

    def _same_identity(self, stored: dict[str, Any]) -> bool:
        """A config.json written before thresholds left the hash: same identity, other hash."""
        values = stored.get("config")
        if not isinstance(values, dict):
            return False
        old = {k: v for k, v in values.items() if k != "device" and not is_threshold(k)}
        return old == self.config.identity()

    @classmethod
    def open_existing(cls, root: str | Path, name: str, config_cls: type[ExperimentConfig]) -> Store:
        """The store in ``root/name`` with the configuration recorded there (for figures, reports)."""
        path = Path(root) / name / "config.json"
        if not path.is_file():
            raise MissingResultError(f"no results of {name} in {Path(root)} ({path} is missing); "
                                     f"run `propulsion-ntk run {name} --out {root}` first")
        return cls(root, name, config_cls.from_dict(json.loads(path.read_text())["config"]))

    # -- units -----------------------------------------------------------------------------------
    def _marker(self, unit: str) -> Path:
        return self.units_dir / f"{_check_unit(unit)}.done"

    def done(self, unit: str) -> bool:
        return self._marker(unit).is_file()

    def units(self, prefix: str = "") -> list[str]:
        """Names of the done units starting with ``prefix``, sorted."""
        if not self.units_dir.is_dir():
            return []
        names = (p.relative_to(self.units_dir).as_posix()[: -len(".done")]
                 for p in self.units_dir.rglob("*.done") if not p.name.startswith("."))
        return sorted(n for n in names if n.startswith(prefix))

    def _finish(self, unit: str, kind: str, data: Path) -> None:
        _write_json(self._marker(unit), {"kind": kind, "file": data.name})
        if unit not in self.computed:
            self.computed.append(unit)

    def _data(self, unit: str, kind: str, suffix: str) -> Path:
        marker = self._marker(unit)
        if not marker.is_file():
            raise MissingResultError(
                f"unit {unit!r} of {self.name} is not in {self.dir} (not computed, or interrupted); "
                f"run `propulsion-ntk run {self.name} --out {self.root}` to compute it"
            )
        stored = json.loads(marker.read_text())["kind"]
        if stored != kind:
            raise ValueError(f"unit {unit!r} of {self.name} holds {stored}, not {kind}")
        return marker.with_suffix(suffix)

    def save_table(self, unit: str, frame: pd.DataFrame) -> None:
        """Write ``frame`` to ``units/<unit>.parquet`` atomically, then mark the unit done."""
        if "unit" in frame.columns:
            raise ValueError("a saved table may not have a column named 'unit' (Store.table adds it)")
        path = self._marker(unit).with_suffix(".parquet")
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
        self._finish(unit, "table", path)

    def load_table(self, unit: str) -> pd.DataFrame:
        return pd.read_parquet(self._data(unit, "table", ".parquet"))

    def save_arrays(self, unit: str, **arrays: Any) -> None:
        """Write named arrays to ``units/<unit>.safetensors`` atomically, then mark the unit done."""
        from safetensors.numpy import save_file

        if not arrays:
            raise ValueError(f"save_arrays({unit!r}) got no arrays")
        data = {k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}
        path = self._marker(unit).with_suffix(".safetensors")
        with atomic_path(path) as tmp:
            save_file(data, str(tmp))
        self._finish(unit, "arrays", path)

    def load_arrays(self, unit: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return dict(load_file(str(self._data(unit, "arrays", ".safetensors"))))

    def table(self, prefix: str = "") -> pd.DataFrame:
        """All tables under ``prefix`` concatenated, with a ``unit`` column; empty if none."""
        frames = []
        for unit in self.units(prefix):
            if json.loads(self._marker(unit).read_text())["kind"] == "table":
                frames.append(self.load_table(unit).assign(unit=unit))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"unit": []})

    def require(self, *units: str) -> None:
        """Raise :class:`MissingResultError` naming every unit in ``units`` that is not done."""
        missing = [u for u in units if not self.done(u)]
        if missing:
            raise MissingResultError(
                f"{self.name}: units {missing} are missing in {self.dir}; "
                f"run `propulsion-ntk run {self.name} --out {self.root}` to compute them"
            )

    # -- provenance ------------------------------------------------------------------------------
    def provenance(self, **extra: Any) -> Path:
        """Write ``provenance.json``: commit, versions, device, date, wall time, units reused/computed."""
        import torch

        device = resolve_device(self.config.device)
        peak: dict[str, float] = {}
        if device == "cuda":
            name = torch.cuda.get_device_name()
            peak["cuda_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            name = platform.processor() or platform.machine()
        try:
            import resource

            peak["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        except ImportError:  # pragma: no cover - not on Windows
            pass
        payload = {
            "experiment": self.name, "config_hash": self.hash, "config": self.config.to_dict(),
            **_git_state(), "versions": _versions(), "device": device, "device_name": name,
            "torch_threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(time.perf_counter() - self._opened, 3), **peak,
            "units_reused": self.reused, "units_computed": self.computed, **extra,
        }
        path = self.dir / "provenance.json"
        _write_json(path, payload)
        return path


def _git_state() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, check=True, timeout=10).stdout.strip())
        return {"git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": None}


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for dist in ("propulsion-ntk", "torch", "transformers", "peft", "numpy", "pandas"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# -------------------------------------------------------------------------------- verdicts ---
VERDICTS = ("supported", "not supported", "inconclusive")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
}
Rule = tuple[str, float]


@dataclass(frozen=True)
class Verdict:
    """One claim checked by one measurement; :attr:`verdict` follows from :attr:`value` and the rule."""

    claim: str  # key, e.g. "ntk_approximation", "parameter_count"
    statement: str  # the claim as the paper makes it
    measurement: str  # what number, on what setup
    value: float
    threshold: str  # the rule, with its numbers
    verdict: Literal["supported", "not supported", "inconclusive"]
    figure: str | None  # file stem of the figure in the figures folder
    experiment: str
    # the interval the verdict was decided on (None for exact quantities such as counts)
    low: float | None = None
    high: float | None = None
    n: int | None = None  # independent units (seeds) behind the interval
    decided_by: str | None = None  # the bound that decided, in words

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    @property
    def value_text(self) -> str:
        """``0.93`` or, with an interval, ``0.93 [0.91, 0.95] (95%, n = 5)``."""
        if self.low is None or self.high is None:
            return f"{self.value:.4g}"
        if math.isnan(self.low) or math.isnan(self.high):
            return f"{self.value:.4g} (no interval, n = {self.n})"
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}] (95%, n = {self.n})"


def _check_rule(rule: Rule, name: str) -> None:
    if not (isinstance(rule, tuple) and len(rule) == 2 and rule[0] in _OPS):
        raise ValueError(f"{name} must be (op, number) with op in {list(_OPS)}, got {rule!r}")


def decide(value: float, *, support_if: Rule, refute_if: Rule) -> Literal["supported", "not supported",
                                                                         "inconclusive"]:
    """``"supported"`` if ``value`` meets ``support_if``, ``"not supported"`` if it meets
    ``refute_if``, else (or when ``value`` is NaN) ``"inconclusive"``.

    Example:
        >>> decide(0.95, support_if=(">=", 0.9), refute_if=("<", 0.7))
        'supported'
        >>> decide(0.8, support_if=(">=", 0.9), refute_if=("<", 0.7))
        'inconclusive'

    Raises:
        ValueError: a malformed rule, or a value that meets both rules (overlapping rules).
    """
    _check_rule(support_if, "support_if")
    _check_rule(refute_if, "refute_if")
    value = float(value)
    if math.isnan(value):
        return "inconclusive"
    support = _OPS[support_if[0]](value, support_if[1])
    refute = _OPS[refute_if[0]](value, refute_if[1])
    if support and refute:
        raise ValueError(f"rules overlap at {value}: support_if {support_if} and refute_if {refute_if}")
    return "supported" if support else "not supported" if refute else "inconclusive"


def rule_text(what: str, support_if: Rule, refute_if: Rule) -> str:
    """``"supported if X >= 0.9; not supported if X < 0.7; else inconclusive"``."""
    return (f"supported if {what} {support_if[0]} {support_if[1]:g}; "
            f"not supported if {what} {refute_if[0]} {refute_if[1]:g}; else inconclusive")


def make_verdict(*, claim: str, statement: str, measurement: str, value: float, what: str,
                 support_if: Rule, refute_if: Rule, figure: str | None, experiment: str) -> Verdict:
    """A :class:`Verdict` whose threshold text and verdict both come from the two rules."""
    return Verdict(claim=claim, statement=statement, measurement=measurement, value=float(value),
                   threshold=rule_text(what, support_if, refute_if),
                   verdict=decide(value, support_if=support_if, refute_if=refute_if),
                   figure=figure, experiment=experiment)


def make_interval_verdict(*, claim: str, statement: str, measurement: str, interval: Any, what: str,
                          support_if: Rule, refute_if: Rule, figure: str | None, experiment: str) -> Verdict:
    """A :class:`Verdict` decided on ``interval`` (a :class:`experiments.suite.stats.Interval`):
    supported only if the whole interval meets ``support_if``, not supported only if it meets
    ``refute_if`` as a whole (:func:`experiments.suite.stats.decide_interval`)."""
    from experiments.suite.stats import decide_interval

    verdict, why = decide_interval(interval, support_if=support_if, refute_if=refute_if)
    return Verdict(claim=claim, statement=statement, measurement=measurement, value=float(interval.estimate),
                   threshold=rule_text(what, support_if, refute_if) + " (decided on the 95% interval)",
                   verdict=verdict, figure=figure, experiment=experiment, low=float(interval.low),
                   high=float(interval.high), n=int(interval.n), decided_by=why)

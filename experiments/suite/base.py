"""What every experiment of the suite shares: its config, its results folder, its verdicts.

* :class:`ExperimentConfig` - frozen dataclass (seed, device, kernel dtype); an experiment's
  ``Config`` subclasses it and holds its sizes and its verdict thresholds as fields.
* :class:`Store` - the results folder of one experiment, ``root/name/``: ``config.json``,
  ``units/<unit>.parquet`` (tables) or ``units/<unit>.safetensors`` (arrays), each followed by a
  ``units/<unit>.done`` marker holding its sha256, and ``provenance.json``. Every file is
  written to a temporary file in its folder and moved into place, so an interrupted unit is
  simply not done; every file is checked against its sha256 when read, so a damaged one is
  refused by name.
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
import re
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd

from experiments.records import (
    JSON_CHECKSUM,
    atomic_path,
    code_commit,
    provenance,
    read_json,
    verify_file,
    write_bytes,
    write_json,
)

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


MODEL_NAMES = {"minilm": "MiniLM", "smollm2": "SmolLM2-135M"}
"""Display names of the language-model families the experiments load."""


def model_label(family: str, variant: str | None = None) -> str:
    """``"MiniLM, pre-trained"`` (or ``"MiniLM"`` without a variant): what a summary row names
    so that rows of one claim differ."""
    name = MODEL_NAMES.get(family, family)
    if variant is None:
        return name
    weights = "pre-trained" if variant == "pretrained" else f"{variant} weights"
    return f"{name}, {weights}"


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
        for f in dataclasses.fields(self):  # a list of what to run may not be empty
            value = getattr(self, f.name)
            if isinstance(value, tuple) and not value and not f.metadata.get("may_be_empty"):
                example = ",".join(str(v) for v in f.default) if isinstance(f.default, tuple) else "..."
                raise ValueError(f"{type(self).__qualname__}.{f.name} needs at least one value, got none; "
                                 f"give some, e.g. --set {f.name}={example}")

    # -- views -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Field name -> value (tuples as lists), in field order; JSON-serialisable."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity(self) -> dict[str, Any]:
        """What the results depend on: :meth:`to_dict` without ``device`` and the verdict
        thresholds (fields whose name contains "support" or "refute")."""
        return {k: v for k, v in self.to_dict().items() if k != "device" and not is_threshold(k)}

    def unit_identity(self, unit: str) -> dict[str, Any]:
        """What the results of the one unit ``unit`` depend on: :meth:`identity` unless an
        experiment narrows it (e1: a MiniLM unit does not depend on the SmolLM2 fields). Only
        :meth:`Store.adopt` uses it, to carry a unit over to a configuration that differs
        elsewhere; a narrowing must leave out only fields the unit's computation never reads."""
        return self.identity()

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
    """``["a=1", "b=x,y"]`` -> ``{"a": "1", "b": "x,y"}`` (the CLI's ``--set``, every flag).

    Raises:
        ValueError: an item without ``key=``, or a key given twice (which value was meant?).
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        if key.strip() in out:
            raise ValueError(f"--set gives {key.strip()} twice ({out[key.strip()]!r} and {value.strip()!r}); "
                             "give it once (lists as one comma-separated value)")
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
        variadic = len(args) == 2 and args[1] is Ellipsis
        kinds = args[:1] if variadic else args
        if isinstance(value, str) and any(typing.get_origin(k) is tuple for k in kinds):
            value = _nested_json(name, value)  # e.g. lr_grids=[[1, [1e-3, 3e-3]], [15, [3e-4]]]
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")] if value.strip() else []
            if "" in items:
                raise ValueError(f"field {name}: {value!r} has an empty item; give comma-separated values "
                                 "without empty ones")
        else:
            items = list(value)
        if variadic or not args:
            return tuple(_convert(name, v, args[0] if args else str) for v in items)
        if len(items) != len(args):
            raise ValueError(f"field {name}: expected {len(args)} items, got {len(items)} in {value!r}")
        return tuple(_convert(name, v, k) for v, k in zip(items, args, strict=True))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # JSON's 1 is the float 1.0 (same config hash)
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


def _nested_json(name: str, text: str) -> Any:
    """A nested field given on the command line: a JSON list of lists."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list):
        raise ValueError(f"field {name} holds lists within a list: give it as JSON, e.g. "
                         f"--set '{name}=[[1, [0.001, 0.003]], [15, [0.0003]]]', got {text!r}")
    return value


# -------------------------------------------------------------------------------- results ----
class ResultsMismatchError(ValueError):
    """A results folder holds results of another configuration or of another experiment."""


class MissingResultError(FileNotFoundError):
    """A unit of results that a figure or a verdict needs has not been computed."""


_UNIT_PART = re.compile(r"^[A-Za-z0-9_=+,-][A-Za-z0-9_.=+,-]*$")


def _check_unit(unit: str) -> str:
    parts = unit.split("/")
    if not unit or not all(_UNIT_PART.match(p) for p in parts):
        raise ValueError(f"bad unit name {unit!r}: use '/'-separated parts of letters, digits and _.=+,- "
                         "(not starting with '.')")
    return unit


class Store:
    """The results folder ``root/name`` of one experiment under one configuration.

    Opening writes ``config.json`` or checks that the one there has the same
    :meth:`ExperimentConfig.config_hash`. A unit is done once its ``.done`` marker exists; the
    marker is written only after its data file is in place and records that file's sha256.
    Every JSON file carries the sha256 of its content (:func:`experiments.records.write_json`),
    and every read checks it: a damaged file is refused with its name, never read as numbers.

    Raises:
        ResultsMismatchError: ``root/name`` holds results of another configuration or experiment.
        DamagedFileError: ``config.json`` is truncated, edited or damaged.
    """

    def __init__(self, root: str | Path, name: str, config: ExperimentConfig) -> None:
        self.root, self.name, self.config = Path(root), name, config
        self.dir = self.root / name
        self.units_dir = self.dir / "units"
        self.hash = config.config_hash(name)
        self._opened = time.perf_counter()
        path = self.dir / "config.json"
        stored = _read_config(path, name) if path.exists() else None
        if stored is not None and stored.get("config_hash") != self.hash:
            raise ResultsMismatchError(
                f"{self.dir} holds results of another configuration (config hash "
                f"{str(stored.get('config_hash'))[:12]}..., this run {self.hash[:12]}...); "
                "give another --out folder, or delete that folder to recompute"
            )
        if stored is None or stored.get("config") != config.to_dict():
            # new, or the same computation judged by other thresholds (or run on another device)
            write_json({"experiment": name, "config_hash": self.hash,
                        "config_class": type(config).__qualname__, "config": config.to_dict()}, path)
        self.reused: list[str] = self.units()
        self.computed: list[str] = []
        # the code this process runs: asked at opening, so a checkout moved during a long run does
        # not lend its commit to results computed by the code loaded before (~15 ms of git)
        self._code: tuple[str | None, bool | None] = code_commit()

    @classmethod
    def open_existing(cls, root: str | Path, name: str, config_cls: type[ExperimentConfig]) -> Store:
        """The store in ``root/name`` with the configuration recorded there (for figures, reports)."""
        path = Path(root) / name / "config.json"
        if not path.is_file():
            raise MissingResultError(f"no results of {name} in {Path(root)} ({path} is missing); "
                                     f"run `propulsion-ntk run {name} --out {root}` first")
        stored = _read_config(path, name)
        try:
            config = config_cls.from_dict(stored["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ResultsMismatchError(
                f"{path} does not hold a configuration of {name} ({exc}); delete {path.parent} and run "
                f"`propulsion-ntk run {name} --out {root}`") from exc
        return cls(root, name, config)

    # -- units -----------------------------------------------------------------------------------
    def _marker(self, unit: str) -> Path:
        return self.units_dir / f"{_check_unit(unit)}.done"

    def _redo(self, unit: str) -> str:
        return (f"delete {self._marker(unit).with_suffix('.*')} to recompute that unit with "
                f"`propulsion-ntk run {self.name} --out {self.root}`")

    def done(self, unit: str) -> bool:
        return self._marker(unit).is_file()

    def units(self, prefix: str = "") -> list[str]:
        """Names of the done units starting with ``prefix``, sorted."""
        if not self.units_dir.is_dir():
            return []
        names = (p.relative_to(self.units_dir).as_posix()[: -len(".done")]
                 for p in self.units_dir.rglob("*.done") if not p.name.startswith("."))
        return sorted(n for n in names if n.startswith(prefix))

    def _finish(self, unit: str, kind: str, data: Path, sha256: str) -> None:
        commit, dirty = self._code
        write_json({"kind": kind, "file": data.name, "sha256": sha256, "git_commit": commit,
                    "git_dirty": dirty}, self._marker(unit))
        if unit not in self.computed:
            self.computed.append(unit)

    def _kind(self, unit: str) -> dict[str, Any]:
        return read_json(self._marker(unit), remedy=self._redo(unit))

    def _data(self, unit: str, kind: str, suffix: str) -> Path:
        """The data file of a done unit, after checking it against the sha256 in its marker."""
        marker = self._marker(unit)
        if not marker.is_file():
            raise MissingResultError(
                f"unit {unit!r} of {self.name} is not in {self.dir} (not computed, or interrupted); "
                f"run `propulsion-ntk run {self.name} --out {self.root}` to compute it"
            )
        stored = self._kind(unit)
        if stored.get("kind") != kind:
            raise ValueError(f"unit {unit!r} of {self.name} holds {stored.get('kind')}, not {kind}")
        return verify_file(marker.with_suffix(suffix), stored.get("sha256"), self._redo(unit))

    def save_table(self, unit: str, frame: pd.DataFrame) -> None:
        """Write ``frame`` to ``units/<unit>.parquet`` atomically, then mark the unit done."""
        if "unit" in frame.columns:
            raise ValueError("a saved table may not have a column named 'unit' (Store.table adds it)")
        path = self._marker(unit).with_suffix(".parquet")
        self._finish(unit, "table", path, write_bytes(path, frame.to_parquet(index=False)))

    def load_table(self, unit: str) -> pd.DataFrame:
        return pd.read_parquet(self._data(unit, "table", ".parquet"))

    def save_arrays(self, unit: str, **arrays: Any) -> None:
        """Write named arrays to ``units/<unit>.safetensors`` atomically, then mark the unit done."""
        from safetensors.numpy import save

        if not arrays:
            raise ValueError(f"save_arrays({unit!r}) got no arrays")
        data = {k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}
        path = self._marker(unit).with_suffix(".safetensors")
        self._finish(unit, "arrays", path, write_bytes(path, save(data)))

    def load_arrays(self, unit: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load

        return dict(load(self._data(unit, "arrays", ".safetensors").read_bytes()))

    def table(self, prefix: str = "") -> pd.DataFrame:
        """All tables under ``prefix`` concatenated, with a ``unit`` column; empty if none."""
        frames = []
        for unit in self.units(prefix):
            if self._kind(unit).get("kind") == "table":
                frames.append(self.load_table(unit).assign(unit=unit))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"unit": []})

    def unit_commits(self) -> dict[str, int]:
        """How many done units each code version computed: ``{"<commit>": n}``, ``"<commit>+dirty"``
        for code with uncommitted changes, ``"unrecorded"`` for units stored before markers kept
        their commit. A study resumed over several sessions lists each session's commit."""
        counts: dict[str, int] = {}
        for unit in self.units():
            stored = self._kind(unit)
            commit = stored.get("git_commit")
            key = "unrecorded" if commit is None else commit + ("+dirty" if stored.get("git_dirty") else "")
            counts[key] = counts.get(key, 0) + 1
        return counts

    def adopt(self, source: Store) -> tuple[list[str], dict[str, list[str]]]:
        """Copy into this store the done units of ``source`` (this experiment's results under
        another configuration) that this store lacks and whose results depend on nothing that
        differs: :meth:`ExperimentConfig.unit_identity` equal under both configurations.

        Each data file is checked against its recorded sha256 before it is copied (atomically);
        the copied marker keeps the commit that computed the unit and adds ``adopted_from``
        (the source's config hash and folder). A unit is never half-adopted: its data file is
        in place before its marker.

        Returns:
            ``(adopted, refused)``: the units copied, and unit -> the config fields that differ
            for it (those units must be computed under this configuration).

        Raises:
            ValueError: ``source`` is another experiment, or this very folder.
            DamagedFileError: a source unit's data file does not match its checksum.
        """
        if source.name != self.name:
            raise ValueError(f"cannot adopt units of {source.name} into {self.name}")
        if source.dir.resolve() == self.dir.resolve():
            raise ValueError(f"{source.dir} is this store's own folder; adopt from another folder")
        adopted: list[str] = []
        refused: dict[str, list[str]] = {}
        for unit in source.units():
            if self.done(unit):
                continue
            mine, theirs = self.config.unit_identity(unit), source.config.unit_identity(unit)
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if differ:
                refused[unit] = differ
                continue
            marker = {k: v for k, v in source._kind(unit).items() if k != JSON_CHECKSUM}
            suffix = {"table": ".parquet", "arrays": ".safetensors"}.get(str(marker.get("kind")))
            if suffix is None:
                raise ValueError(f"unit {unit!r} of {source.dir} holds an unknown kind "
                                 f"{marker.get('kind')!r}")
            data = source._data(unit, str(marker["kind"]), suffix).read_bytes()
            path = self._marker(unit).with_suffix(suffix)
            if write_bytes(path, data) != marker.get("sha256"):  # pragma: no cover - checked just above
                raise RuntimeError(f"internal: the copy of {unit!r} does not match its checksum")
            marker["adopted_from"] = {"config_hash": source.hash, "folder": str(source.dir)}
            write_json(marker, self._marker(unit))
            adopted.append(unit)
        return adopted, refused

    def adopted_units(self) -> list[str]:
        """The done units copied in by :meth:`adopt` (their markers say from where)."""
        return [u for u in self.units() if "adopted_from" in self._kind(u)]

    def require(self, *units: str) -> None:
        """Raise :class:`MissingResultError` naming every unit in ``units`` that is not done."""
        missing = [u for u in units if not self.done(u)]
        if missing:
            listed = missing if len(missing) <= 6 else [*missing[:3], f"... {len(missing) - 3} more"]
            raise MissingResultError(
                f"{self.name}: {len(missing)} of {len(units)} units are missing in {self.dir} "
                f"({', '.join(listed)}); "
                f"run `propulsion-ntk run {self.name} --out {self.root}` to compute them"
            )

    # -- provenance ------------------------------------------------------------------------------
    def provenance(self, **extra: Any) -> Path:
        """Write ``provenance.json``: commit, versions, device, date, wall time, units reused/computed
        and the commit that computed each done unit (:meth:`unit_commits`)."""
        import torch

        device = resolve_device(self.config.device)
        peak: dict[str, float] = {}
        if device == "cuda":
            peak["cuda_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        try:
            import resource

            peak["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        except ImportError:  # pragma: no cover - not on Windows
            pass
        payload = {
            "experiment": self.name, "config_hash": self.hash, "config": self.config.to_dict(),
            **provenance(device), "git_commit": self._code[0], "git_dirty": self._code[1],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(time.perf_counter() - self._opened, 3), **peak,
            "units_reused": self.reused, "units_computed": self.computed,
            "unit_commits": self.unit_commits(), "units_adopted": self.adopted_units(), **extra,
        }
        path = self.dir / "provenance.json"
        write_json(payload, path)
        return path

    def read_provenance(self) -> dict[str, Any]:
        """``provenance.json`` (checksum verified); empty when the run has not finished yet."""
        path = self.dir / "provenance.json"
        redo = f"delete {path} and run `propulsion-ntk run {self.name} --out {self.root}` to rewrite it"
        return read_json(path, remedy=redo) if path.is_file() else {}


def _read_config(path: Path, name: str) -> dict[str, Any]:
    """``config.json`` of experiment ``name``, verified; another experiment's is refused."""
    stored = read_json(path, remedy=f"delete {path.parent} to recompute its results")
    if stored.get("experiment") != name:
        raise ResultsMismatchError(
            f"{path.parent} holds results of experiment {stored.get('experiment')!r}, not {name!r}; "
            f"give the folder that holds one subfolder per experiment, or another --out folder")
    return stored


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
        """``0.93`` or, with an interval, ``0.93 [0.91, 0.95] (95%, n = 5)``; an interval of
        zero width (every seed gave the same value) is said so instead."""
        if self.low is None or self.high is None:
            return f"{self.value:.4g}"
        if math.isnan(self.low) or math.isnan(self.high):
            return f"{self.value:.4g} (no interval, n = {self.n})"
        if self.low == self.high == self.value:  # e.g. fixed pre-trained weights
            return f"{self.value:.4g} (the same value in all n = {self.n} seeds: no interval)"
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
                          support_if: Rule, refute_if: Rule, figure: str | None, experiment: str,
                          gate: str | None = None) -> Verdict:
    """A :class:`Verdict` decided on ``interval`` (a :class:`experiments.suite.stats.Interval`):
    supported only if the whole interval meets ``support_if``, not supported only if it meets
    ``refute_if`` as a whole (:func:`experiments.suite.stats.decide_interval`). ``gate``: why the
    measurement is not judged at all (e.g. the runs compared did not learn); the verdict is then
    inconclusive and that reason, not the interval, is named as what decided."""
    from experiments.suite.stats import decide_interval

    if gate is not None:
        verdict, why = "inconclusive", f"the gate: {gate}"
    else:
        verdict, why = decide_interval(interval, support_if=support_if, refute_if=refute_if)
    return Verdict(claim=claim, statement=statement, measurement=measurement, value=float(interval.estimate),
                   threshold=rule_text(what, support_if, refute_if) + " (decided on the 95% interval)",
                   verdict=verdict, figure=figure, experiment=experiment, low=float(interval.low),
                   high=float(interval.high), n=int(interval.n), decided_by=why)

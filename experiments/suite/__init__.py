"""The experiment suite: one module per claim-testing experiment, run resumably, drawn, reported.

Every module ``experiments/suite/eN_*.py`` has ``NAME``, ``TITLE``, ``CLAIMS``, ``Config`` (a
subclass of :class:`~experiments.suite.base.ExperimentConfig` with its thresholds), ``PRESETS``
(``tiny``, ``quick``, ``full``), ``main(config, store, *, progress=False)``,
``figures(store, fig_dir)`` and ``verdicts(store, config)``; the modules present are found and
registered in :data:`EXPERIMENTS` in order of their number.

    from experiments.suite import run_experiment, draw_figures, write_report
    run_experiment("e7", "quick", out="runs/suite")
    draw_figures("runs/suite", "figures")
    write_report("runs/suite", "runs/suite/claims.md")
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from experiments.processes import folder_lock
from experiments.suite.base import ExperimentConfig, MissingResultError, Store

__all__ = ["EXPERIMENTS", "PRESET_NAMES", "get_experiment", "run_experiment", "adopt_results", "draw_figures",
           "write_report", "open_results", "present_experiments", "sweep_unit", "fill_command"]

PRESET_NAMES = ("tiny", "quick", "study", "full")
_REQUIRED = ("NAME", "TITLE", "CLAIMS", "Config", "PRESETS", "main", "figures", "verdicts")
_MODULE = re.compile(r"^e(\d+)_\w+$")


def _discover() -> dict[str, ModuleType]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        match = _MODULE.match(info.name)
        if match:
            found.append((int(match.group(1)), info.name))
    registry: dict[str, ModuleType] = {}
    for _, module_name in sorted(found):
        module = importlib.import_module(f"{__name__}.{module_name}")
        missing = [a for a in _REQUIRED if not hasattr(module, a)]
        if missing:
            raise ImportError(f"experiment module {module.__name__} lacks {missing}")
        if not issubclass(module.Config, ExperimentConfig) or set(module.PRESETS) != set(PRESET_NAMES):
            raise ImportError(f"{module.__name__}: Config must subclass ExperimentConfig and PRESETS "
                              f"have exactly the keys {PRESET_NAMES}")
        registry[module.NAME] = module
    return registry


EXPERIMENTS: dict[str, ModuleType] = _discover()


def get_experiment(name: str) -> ModuleType:
    """The module of experiment ``name``: its full NAME or its number prefix (``"e2"``).

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if name in EXPERIMENTS:
        return EXPERIMENTS[name]
    matches = [m for key, m in EXPERIMENTS.items() if key.split("_", 1)[0] == name]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} "
                     "(or their short names e1, e2, ...), or 'all'")


def run_experiment(name: str, preset: str = "quick", *, out: str | Path = "runs/suite",
                   seed: int | None = None, device: str | None = None,
                   overrides: dict[str, Any] | None = None, progress: bool = False) -> Store:
    """Run (or resume) one experiment with a preset and overrides; returns its :class:`Store`.

    Units already done in ``out/NAME`` are reused, the rest computed; ``provenance.json`` is
    written at the end. ``store.reused`` and ``store.computed`` list the units.

    Raises:
        ValueError: unknown experiment, preset or override field; device ``cuda`` without CUDA.
        ResultsMismatchError: ``out/NAME`` holds results of another configuration.
    """
    module = get_experiment(name)
    if preset not in module.PRESETS:
        raise ValueError(f"unknown preset {preset!r} for {module.NAME}; "
                         f"choose one of {', '.join(module.PRESETS)}")
    config = module.PRESETS[preset]
    changes: dict[str, Any] = dict(overrides or {})
    if seed is not None:
        changes["seed"] = seed
    if device is not None:
        changes["device"] = device
    config = config.replace(**changes)
    config.resolve_device()  # a missing CUDA fails here, before any file is written
    with folder_lock(Path(out) / module.NAME):  # one writer per results folder
        store = Store(out, module.NAME, config)
        module.main(config, store, progress=progress)
        store.provenance(preset=preset)
    return store


def adopt_results(name: str, preset: str = "quick", *, source: str | Path, out: str | Path = "runs/suite",
                  seed: int | None = None, overrides: dict[str, Any] | None = None
                  ) -> tuple[Store, list[str], dict[str, list[str]]]:
    """Carry the units of ``source/NAME`` (results under another configuration) over to
    ``out/NAME`` under the preset's configuration (with ``seed`` and ``overrides``), where
    their results do not depend on what changed (:meth:`Store.adopt`). What was refused is
    computed by the next ``run``. Returns ``(store, adopted, refused)``.

    Typical use, after a preset changed a field that only some units read (e1's SmolLM2 N):
    move the old folder aside, adopt from it, then run again to compute the rest.
    """
    module = get_experiment(name)
    if preset not in module.PRESETS:
        raise ValueError(f"unknown preset {preset!r} for {module.NAME}; "
                         f"choose one of {', '.join(module.PRESETS)}")
    changes: dict[str, Any] = dict(overrides or {})
    if seed is not None:
        changes["seed"] = seed
    config = module.PRESETS[preset].replace(**changes)
    origin = Store.open_existing(source, module.NAME, module.Config)
    with folder_lock(Path(out) / module.NAME):
        store = Store(out, module.NAME, config)
        adopted, refused = store.adopt(origin)
    return store, adopted, refused


def present_experiments(results_dir: str | Path) -> list[ModuleType]:
    """The experiment modules with results (a ``NAME/config.json``) in ``results_dir``, in order.

    Raises:
        ValueError: ``results_dir`` is a file or the folder of one experiment (the message says which).
        MissingResultError: no experiment results in ``results_dir``.
    """
    root = Path(results_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a results folder; give the folder that `propulsion-ntk run` "
                         "wrote (one subfolder per experiment)")
    if (root / "config.json").is_file():
        raise ValueError(f"{root} is the results folder of one experiment; give its parent folder "
                         f"{root.parent} (the one holding a subfolder per experiment)")
    present = [m for key, m in EXPERIMENTS.items() if (root / key / "config.json").is_file()]
    if not present:
        raise MissingResultError(f"no experiment results in {root} (no {{name}}/config.json); run "
                                 f"`propulsion-ntk run all --preset quick --out {root}` first")
    return present


def open_results(results_dir: str | Path, name: str) -> Store:
    """The :class:`Store` of experiment ``name`` in ``results_dir``, with its recorded config."""
    module = get_experiment(name)
    return Store.open_existing(results_dir, module.NAME, module.Config)


def draw_figures(results_dir: str | Path = "runs/suite", fig_dir: str | Path = "figures", *,
                 incomplete: list[str] | None = None) -> list[Path]:
    """Redraw every figure of every experiment with results in ``results_dir``, from saved units only.

    ``incomplete``: when a list is given, an experiment whose results lack a unit is skipped and
    the reason (naming the missing units and the command that computes them) appended to it,
    so that the figures of a study still running are drawn for what has finished.

    Raises:
        MissingResultError: no results at all, or (without ``incomplete``) an experiment's
            results lack a unit (named).
    """
    paths: list[Path] = []
    for module in present_experiments(results_dir):
        try:
            paths += module.figures(open_results(results_dir, module.NAME), Path(fig_dir))
        except MissingResultError as err:
            if incomplete is None:
                raise
            incomplete.append(str(err))
    return paths


def write_report(results_dir: str | Path = "runs/suite", out_path: str | Path = "runs/suite/claims.md",
                 *, fig_dir: str | Path = "figures") -> Path:
    """Write the claims report (Markdown at ``out_path``, HTML beside it); returns the Markdown path."""
    from experiments.suite.report import write_report as _write

    return _write(results_dir, out_path, fig_dir=fig_dir)


SWEEP_KEYS = ("experiment", "preset", "device")  # what a sweep unit says besides config overrides


def sweep_unit(unit: dict[str, Any], workdir: Path) -> Any:
    """One unit of ``propulsion-ntk run NAME --sweep ...``: run the experiment with the unit's
    overrides into ``workdir`` (resumable there) and return its verdicts as a table, one row per
    verdict, with the overrides as columns. ``unit`` holds ``experiment``, ``preset``,
    ``device`` and the swept config fields (see :func:`experiments.distributed.sweep.run_sweep`)."""
    import pandas as pd

    overrides = {k: v for k, v in unit.items() if k not in SWEEP_KEYS}
    store = run_experiment(unit["experiment"], unit["preset"], out=workdir, device=unit.get("device"),
                           overrides={k: v if isinstance(v, str) else _text(v) for k, v in overrides.items()})
    module = get_experiment(unit["experiment"])
    rows = [{**overrides, "experiment": module.NAME, "claim": v.claim, "verdict": v.verdict,
             "value": v.value, "measurement": v.measurement, "results": str(store.dir)}
            for v in module.verdicts(store, store.config)]
    return pd.DataFrame(rows)


def fill_command(name: str, results_dir: str | Path, config: ExperimentConfig | None = None,
                 preset: str = "quick") -> str:
    """The ``propulsion-ntk run`` line that computes the missing units of experiment ``name``.

    With ``config`` (the one recorded in its folder) the line has the preset closest to it and
    a ``--set`` for every other field that differs, so it resumes that very configuration;
    without, it runs ``preset``.
    """
    module = get_experiment(name)
    line = f"propulsion-ntk run {module.NAME.split('_', 1)[0]} --out {results_dir}"
    if config is None:
        return f"{line} --preset {preset}"
    recorded = config.to_dict()

    def differences(p: str) -> list[str]:
        base = module.PRESETS[p].to_dict()
        return [k for k in recorded if k != "device" and recorded[k] != base.get(k)]

    best = min(module.PRESETS, key=lambda p: (len(differences(p)), p != preset))
    sets = " ".join(f"{k}={_text(recorded[k])}" for k in differences(best))
    return f"{line} --preset {best}" + (f" --set {sets}" if sets else "")


def preset_of(name: str, config: ExperimentConfig) -> str | None:
    """The preset of experiment ``name`` that ``config`` is (device aside), or None."""
    module = get_experiment(name)
    return next((p for p, c in module.PRESETS.items() if c.identity() == config.identity()), None)


def _text(value: Any) -> str:
    """A swept value as the text ``--set`` takes (lists as comma-separated items, lists of
    lists as JSON, quoted for the shell)."""
    if isinstance(value, list | tuple):
        if any(isinstance(v, list | tuple) for v in value):
            return "'" + json.dumps(value) + "'"
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)

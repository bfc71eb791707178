"""Results that cannot rot: checksummed stores, one writer per folder, exact flags, sentences.

Every stored file a later step reads is checked against its sha256: a flipped bit is refused
with the file named, never read back as other numbers. Repeated ``--set`` / ``--sweep`` flags
all count; empty lists are refused; a second writer is refused; bad command lines end in one
sentence and exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from experiments import cli
from experiments.data.encoding import EncodedSplit, EncodedSplits
from experiments.records import DamagedFileError
from experiments.suite import e7_parameter_counts as e7
from experiments.suite import run_experiment
from experiments.suite.base import ResultsMismatchError, Store
from experiments.training.checkpoint import load_checkpoint, save_checkpoint
from experiments.training.config import TrainConfig
from experiments.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ suite stores
@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path, e7.NAME, e7.PRESETS["tiny"])
    s.save_table("t", pd.DataFrame({"quantity": ["kernel"] * 3, "value": [0.25, 0.5, 0.75]}))
    s.save_arrays("a", k=np.arange(12.0).reshape(3, 4))
    return s


def test_a_flipped_letter_in_a_unit_table_is_refused_by_name(store):
    """The issue's case: 'kernel' -> 'kernem' in a unit table must not be reused."""
    path = store.units_dir / "t.parquet"
    _flip(path, path.read_bytes().index(b"kernel") + 5)  # l (0x6c) -> m (0x6d)
    with pytest.raises(DamagedFileError, match=rf"{path} is damaged.*delete .*t\.\*.*propulsion-ntk run"):
        store.load_table("t")
    with pytest.raises(DamagedFileError, match=r"t\.parquet"):
        store.table()


@pytest.mark.parametrize("unit, suffix", [("t", ".parquet"), ("a", ".safetensors")])
def test_no_single_bit_flip_of_a_unit_reads_back(store, unit, suffix):
    """One flip every third byte (bit = byte index mod 8) over the whole file: all are refused."""
    path = store.units_dir / f"{unit}{suffix}"
    clean = path.read_bytes()
    load = store.load_table if suffix == ".parquet" else store.load_arrays
    for offset in range(0, len(clean), 3):
        _flip(path, offset, offset % 8)
        with pytest.raises(DamagedFileError):
            load(unit)
        path.write_bytes(clean)
    assert load(unit) is not None


def test_an_edited_marker_or_config_is_refused(store, tmp_path):
    marker = store.units_dir / "t.done"
    marker.write_text(marker.read_text().replace('"table"', '"arrays"'))
    with pytest.raises(DamagedFileError, match=f"{marker} does not match its checksum"):
        store.load_table("t")
    config = tmp_path / e7.NAME / "config.json"
    text = config.read_text()
    assert '"refute_max_percent": 0.3' in text  # a threshold: outside the config hash
    config.write_text(text.replace('"refute_max_percent": 0.3', '"refute_max_percent": 0.9'))
    with pytest.raises(DamagedFileError, match=f"{config} does not match its checksum"):
        Store.open_existing(tmp_path, e7.NAME, e7.Config)


def test_truncated_config_names_the_file(store, tmp_path):
    config = tmp_path / e7.NAME / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(DamagedFileError, match=f"cannot read {config} .*truncated or damaged"):
        Store.open_existing(tmp_path, e7.NAME, e7.Config)


def test_results_of_another_experiment_name_the_folder_and_what_it_holds(store, tmp_path):
    from experiments.suite import e1_kernel_similarity as e1

    (tmp_path / e7.NAME).rename(tmp_path / e1.NAME)
    with pytest.raises(ResultsMismatchError,
                       match=f"{tmp_path / e1.NAME} holds results of experiment '{e7.NAME}'"):
        Store.open_existing(tmp_path, e1.NAME, e1.Config)


def test_a_second_writer_of_a_results_folder_is_refused(tmp_path):
    from experiments.processes import FolderLockedError, folder_lock

    held = rf"{tmp_path / e7.NAME} is being written .*pid {os.getpid()}"
    with folder_lock(tmp_path / e7.NAME), pytest.raises(FolderLockedError, match=held):  # (same pid here)
        run_experiment("e7", "tiny", out=tmp_path)
    assert run_experiment("e7", "tiny", out=tmp_path).computed  # free again


# ------------------------------------------------------------------ training runs
class Bag(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(12, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.classifier((self.embed(input_ids) * mask).sum(1) / mask.sum(1))


def _split(n: int, seed: int) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 12, (n, 6), generator=g)
    labels = torch.arange(n) % 2
    ids[labels == 1, 0] = 2
    return EncodedSplit(ids, torch.ones_like(ids), labels)


DATA = EncodedSplits(_split(32, 0), _split(16, 1), _split(16, 2), 2, "integrity-toy")
CONFIG = TrainConfig(method="full", lr=0.05, schedule="constant", steps=4, batch_size=8, eval_every=2,
                     checkpoint_every=2, seed=0)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    train(CONFIG, out, model=Bag(), data=DATA, progress=False)
    return out


def _again(folder: Path):
    return train(CONFIG, folder, model=Bag(), data=DATA, progress=False)


def test_no_single_bit_flip_of_rows_parquet_reads_back(finished_run, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("run.json", "rows.parquet"):
        (folder / name).write_bytes((finished_run / name).read_bytes())
    assert json.loads((folder / "run.json").read_text())["rows_sha256"]
    path, clean = folder / "rows.parquet", (folder / "rows.parquet").read_bytes()
    expected = _again(folder).rows
    for offset in range(0, len(clean), 29):  # every 29th byte, each bit in turn
        _flip(path, offset, offset % 8)
        with pytest.raises(DamagedFileError, match=f"{path} is damaged.*delete {folder}"):
            _again(folder)
        path.write_bytes(clean)
    pd.testing.assert_frame_equal(_again(folder).rows, expected)


def test_truncated_run_json_names_the_file(finished_run, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text((finished_run / "run.json").read_text()[:100])
    with pytest.raises(DamagedFileError, match=f"cannot read {folder / 'run.json'} .*delete {folder}"):
        _again(folder)


def test_a_flipped_bit_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 3, "weights": torch.arange(64, dtype=torch.float64)})
    data = path.read_bytes()
    weights = torch.arange(64, dtype=torch.float64).numpy().tobytes()
    _flip(path, data.index(weights) + 100)  # inside the stored tensor
    with pytest.raises(DamagedFileError, match=f"checkpoint {path} is damaged"):
        load_checkpoint(path)


def test_a_second_trainer_of_a_run_folder_is_refused(tmp_path):
    from experiments.processes import FolderLockedError, folder_lock

    with folder_lock(tmp_path), pytest.raises(FolderLockedError, match=f"{tmp_path} is being written"):
        train(CONFIG, tmp_path, model=Bag(), data=DATA, progress=False)


def _state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except OSError:
        return "gone"
    return "?"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_killed_parent(tmp_path):
    """The e5 pattern: a parent starts a training child, then gets SIGKILL; the child must go too."""
    child = ("import sys, time; from experiments.processes import die_with_parent; "
             "die_with_parent(int(sys.argv[1])); time.sleep(60)")
    parent = ("import os, subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())]); "
              "print(p.pid, flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    time.sleep(3)  # the child has imported and asked for the signal
    assert _state(pid) in ("S", "R")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while _state(pid) not in ("gone", "Z") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _state(pid) in ("gone", "Z"), "the child outlived its parent"


# ------------------------------------------------------------------ configs and flags
def test_repeated_set_and_sweep_flags_all_count():
    args = cli.build_parser().parse_args(["run", "e7", "--set", "num_labels=3", "--set", "lora_r=4",
                                          "--sweep", "seed=0,1", "--sweep", "lora_r=2,4"])
    assert args.set == ["num_labels=3", "lora_r=4"]
    assert args.sweep == ["seed=0,1", "lora_r=2,4"]


def test_repeated_set_flags_reach_the_config(tmp_path):
    assert cli.main(["run", "e7", "--preset", "tiny", "--out", str(tmp_path), "--set", "num_labels=3",
                     "--set", "lora_r=4"]) == 0
    config = json.loads((tmp_path / e7.NAME / "config.json").read_text())["config"]
    assert (config["num_labels"], config["lora_r"]) == (3, 4)


def test_a_key_set_twice_is_refused(capsys):
    assert cli.main(["run", "e7", "--set", "lora_r=4", "--set", "lora_r=8"]) == 2
    assert "gives lora_r twice" in capsys.readouterr().err


@pytest.mark.parametrize("value, match", [("", "needs at least one value"), ("1,,5", "empty item")])
def test_empty_lists_in_a_config_are_refused(value, match):
    from experiments.suite import e3_kernel_regime as e3
    from experiments.suite import e4_degree_lr as e4

    for module in (e3, e4):
        with pytest.raises(ValueError, match=match):
            module.PRESETS["tiny"].replace(degrees=value)
    with pytest.raises(ValueError, match="models needs at least one value"):
        e7.Config(models=())


# ------------------------------------------------------------------ command lines: one sentence
def tiny_model(*, num_labels: int, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, num_labels)).to(device=device, dtype=dtype)


def tiny_data(*, split: str, seed: int) -> torch.Tensor:
    return torch.randn(8, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


KERNEL = ["kernel", "--model", "test_integrity:tiny_model", "--dataset", "test_integrity:tiny_data",
          "--examples", "6", "--tile", "3", "--model-dtype", "float64", "--no-progress", "--threads", "1"]


def _file(tmp_path: Path) -> str:
    path = tmp_path / "a-file"
    path.write_text("x")
    return str(path)


@pytest.mark.parametrize("argv, match", [
    (lambda t: ["run", "e7", "--preset", "tiny", "--out", _file(t)], "--out .*a-file is a file"),
    (lambda t: ["run", "e7", "--preset", "tiny", "--out", f"{_file(t)}/sub"], "cannot be written"),
    (lambda t: ["report", "--results", str(t), "--out", _file(t)], "--out .*a-file is a file"),
    (lambda t: [*KERNEL, "--out", _file(t)], "--out .*a-file is a file"),
    (lambda t: [*KERNEL, "--out", str(t / "k"), "--memory-budget-gb", "1e-6"],
     "over the memory budget.*--memory-budget-gb"),
    (lambda t: [*KERNEL[:2], "os:getcwd", *KERNEL[3:], "--out", str(t / "k")],
     "model factory 'os:getcwd' cannot be called"),
    (lambda t: ["train", "--out", str(t / "r"), "--option", "nosuch=1"],
     r"method 'propulsion' does not take options \['nosuch'\]; it takes .*degree"),
    (lambda t: ["train", "--out", _file(t), "--method", "full"], "a-file is a file"),
])
def test_bad_command_lines_end_in_one_sentence(tmp_path, capsys, argv, match):
    assert cli.main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err
    assert len(err.strip().splitlines()) == 1
    assert __import__("re").search(match, err), err

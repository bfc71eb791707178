"""Tiled kernels on disk (ntk.tiles): equal to one engine call, resumable, checked on assembly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_close_rel
from zoo import CASES

import ntk
from ntk.tiles import (
    TileError,
    TilesInterrupted,
    assemble_kernel,
    compute_tiles,
    tile_grid,
    tiled_ntk,
)

TOL = 1e-12
BY_ID = {c.id: c for c in CASES}


def _setup(case_id: str, n1: int = 7, n2: int | None = None, seed: int = 0):
    case = BY_ID[case_id]
    model = case.build(seed)
    x1 = case.inputs(n1, seed)
    x2 = None if n2 is None else case.inputs(n2, seed + 1)
    return model, x1, x2


@pytest.mark.parametrize("output", ["trace", "full"])
@pytest.mark.parametrize("cross", [False, True], ids=["x2_none", "x2_given"])
@pytest.mark.parametrize("case_id", ["mlp", "transformer"])
def test_assembled_equals_one_call(tmp_path, case_id, cross, output):
    model, x1, x2 = _setup(case_id, 7, 5 if cross else None)
    expected = ntk.empirical_ntk(model, x1, x2, params="all", output=output)
    kernel, report = tiled_ntk(model, x1, x2, out_dir=tmp_path, params="all", output=output, tile_size=3)
    assert report.total == 6  # a 3x2 grid, or the upper triangle of 3x3
    assert len(report.computed) == report.total and report.finished_before == 0
    assert isinstance(kernel, torch.Tensor) and kernel.dtype == torch.float64
    assert_close_rel(kernel, expected, TOL)
    if not cross:
        assert torch.equal(kernel, kernel.transpose(0, 1) if output == "trace"
                           else kernel.permute(1, 0, 3, 2))
    mapped = assemble_kernel(tmp_path, mmap=True)
    assert isinstance(mapped, np.memmap) and (tmp_path / "kernel.npy").exists()
    np.testing.assert_array_equal(np.asarray(mapped), kernel.numpy())


def test_tile_grid_upper_triangle_and_ragged_edges():
    tiles = tile_grid(7, 7, 3, symmetric=True)
    assert [(t.i, t.j) for t in tiles] == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    assert tiles[-1].rows == (6, 7) and tiles[1].cols == (3, 6)
    assert len(tile_grid(7, 4, 3, symmetric=False)) == 6
    with pytest.raises(ValueError, match="n1 == n2"):
        tile_grid(7, 4, 3, symmetric=True)


def test_x2_equal_to_x1_is_the_symmetric_job(tmp_path):
    model, x1, _ = _setup("transformer", 7)
    x2 = {k: v.clone() for k, v in x1.items()}
    kernel, report = tiled_ntk(model, x1, x2, out_dir=tmp_path, params="all", output="trace", tile_size=3)
    assert report.total == 6 and json.loads((tmp_path / "job.json").read_text())["symmetric"] is True
    assert_close_rel(kernel, ntk.empirical_ntk(model, x1, params="all", output="trace"), TOL)


def test_interrupted_job_recomputes_only_missing_tiles(tmp_path):
    model, x1, _ = _setup("mlp", 10)
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return ntk.empirical_ntk(*args, **kwargs)

    kw = dict(out_dir=tmp_path, params="all", output="full", tile_size=3, compute=counting)
    with pytest.raises(TilesInterrupted):
        compute_tiles(model, x1, stop_after=4, **kw)
    assert len(calls) == 4
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tiles").glob("*.safetensors")}
    assert len(before) == 4
    report = compute_tiles(model, x1, **kw)
    assert report.total == 10 and report.finished_before == 4 and len(report.computed) == 6
    assert len(calls) == 10  # 4 + 6: no finished tile was computed again
    for name, mtime in before.items():  # finished tiles are not rewritten
        assert (tmp_path / "tiles" / name).stat().st_mtime_ns == mtime
    again = compute_tiles(model, x1, **kw)
    assert again.computed == [] and len(calls) == 10
    assert_close_rel(assemble_kernel(tmp_path), ntk.empirical_ntk(model, x1, params="all"), TOL)


def test_missing_tiles_are_listed(tmp_path):
    model, x1, _ = _setup("mlp", 7)
    with pytest.raises(TilesInterrupted):
        compute_tiles(model, x1, out_dir=tmp_path, params="all", tile_size=3, stop_after=2)
    with pytest.raises(TileError, match="4 of 6 tiles are missing"):
        assemble_kernel(tmp_path)


@pytest.mark.parametrize("change", ["weights", "inputs", "output", "tile_size", "params"])
def test_job_of_another_config_is_refused(tmp_path, change):
    model, x1, _ = _setup("mlp", 7)
    compute_tiles(model, x1, out_dir=tmp_path, params="all", output="trace", tile_size=3)
    kw = dict(params="all", output="trace", tile_size=3)
    if change == "weights":
        with torch.no_grad():
            model.classifier.bias.add_(1e-9)
    elif change == "inputs":
        x1 = x1 + 1e-9
    elif change == "output":
        kw["output"] = "full"
    elif change == "tile_size":
        kw["tile_size"] = 4
    else:
        kw["params"] = "bias"
    with pytest.raises(TileError, match="another configuration"):
        compute_tiles(model, x1, out_dir=tmp_path, **kw)


def test_tile_of_another_config_is_refused(tmp_path):
    model, x1, _ = _setup("mlp", 7)
    a, b = tmp_path / "a", tmp_path / "b"
    compute_tiles(model, x1, out_dir=a, params="all", output="trace", tile_size=3)
    compute_tiles(model, x1, out_dir=b, params="bias", output="trace", tile_size=3)
    for suffix in (".safetensors", ".json"):  # a stray tile copied in from job b
        name = f"r00000_c00001{suffix}"
        (a / "tiles" / name).write_bytes((b / "tiles" / name).read_bytes())
    with pytest.raises(TileError, match="another config"):
        assemble_kernel(a)
    with pytest.raises(TileError, match="another config"):
        compute_tiles(model, x1, out_dir=a, params="all", output="trace", tile_size=3)


def test_corrupt_tile_is_detected_and_recomputed_after_deletion(tmp_path):
    model, x1, _ = _setup("transformer", 7)
    compute_tiles(model, x1, out_dir=tmp_path, params="all", output="trace", tile_size=3)
    path = tmp_path / "tiles" / "r00001_c00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(TileError, match="corrupt"):
        assemble_kernel(tmp_path)
    path.unlink()
    path.with_suffix(".json").unlink()
    report = compute_tiles(model, x1, out_dir=tmp_path, params="all", output="trace", tile_size=3)
    assert report.computed == [(1, 2)]
    assert_close_rel(assemble_kernel(tmp_path), ntk.empirical_ntk(model, x1, params="all", output="trace"),
                     TOL)


def test_job_manifest_describes_the_job(tmp_path):
    model, x1, x2 = _setup("transformer", 5, 4)
    compute_tiles(model, x1, x2, out_dir=tmp_path, params="bias", output="diagonal", tile_size=2,
                  model_name="tiny")
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["kernel_shape"] == [5, 4, 2] and job["symmetric"] is False
    assert job["model_name"] == "tiny" and job["parameter_selection"] == "bias"
    assert job["n_parameters"] == sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    meta = json.loads((tmp_path / "tiles" / "r00002_c00001.json").read_text())
    assert meta["rows"] == [4, 5] and meta["cols"] == [2, 4] and meta["shape"] == [1, 2, 2]


def _copy(src, dst):
    dst.write_bytes(src.read_bytes())


@pytest.mark.parametrize("how", ["both files", "tensor file only, manifest sha edited"])
def test_tile_copied_over_another_position_is_refused(tmp_path, how):
    """Same config, same shape: only the position tells the two tiles apart."""
    model, x1, _ = _setup("mlp", 9)
    compute_tiles(model, x1, out_dir=tmp_path, params="all", output="trace", tile_size=3)
    tiles = tmp_path / "tiles"
    src, dst = tiles / "r00000_c00001", tiles / "r00000_c00002"
    _copy(src.with_suffix(".safetensors"), dst.with_suffix(".safetensors"))
    if how == "both files":
        _copy(src.with_suffix(".json"), dst.with_suffix(".json"))
        match = "describes tile i=0, j=1 .* read for i=0, j=2"
    else:
        meta = json.loads(dst.with_suffix(".json").read_text())
        meta["sha256"] = json.loads(src.with_suffix(".json").read_text())["sha256"]
        dst.with_suffix(".json").write_text(json.dumps(meta))
        match = "says it is tile 'r00000_c00001'.*position r00000_c00002"
    with pytest.raises(TileError, match=match):
        assemble_kernel(tmp_path)


def test_a_pickle_in_place_of_a_tile_is_named_not_a_raw_parser_error(tmp_path):
    import hashlib
    import pickle

    model, x1, _ = _setup("mlp", 6)
    compute_tiles(model, x1, out_dir=tmp_path, params="all", output="trace", tile_size=3)
    path = tmp_path / "tiles" / "r00000_c00001.safetensors"
    data = pickle.dumps({"kernel": np.zeros((3, 3))})
    path.write_bytes(data)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = hashlib.sha256(data).hexdigest()  # the manifest vouches for it
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(TileError, match=f"tile {path} is not a safetensors file .*delete"):
        assemble_kernel(tmp_path)

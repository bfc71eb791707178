"""save_adapter / load_adapter: round trips into a fresh base model, mismatches, bad files."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import assert_close_rel
from model_state import assert_unchanged, run, snapshot
from torch import nn
from zoo import CASES, MLP

from propulsion import (
    AdapterFileError,
    AdapterMismatchError,
    PropulsionConfig,
    PropulsionConfigError,
    PropulsionError,
    adapter_state,
    get_propulsion_model,
    merge_adapter,
    propulsion_config,
    propulsion_layers,
    unmerge_adapter,
)
from propulsion.serialization import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter

CASE = {c.id: c for c in CASES}


def train_adapter(model: nn.Module, seed: int) -> None:
    """Stand-in for training: random z in [0.9, 1.1), every other trainable tensor moved."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.rand(param.shape, generator=gen, dtype=torch.float64)
                if name.endswith("propulsion_z"):
                    param.copy_(0.9 + 0.2 * noise)
                else:
                    param.add_(0.1 * (noise - 0.5))


# -- round trips -------------------------------------------------------------------------------

ROUND_TRIP_CONFIGS = {
    "z-only": PropulsionConfig(degree=3),
    "bias+head": PropulsionConfig(degree=2, train_bias=True, modules_to_save=("classifier",)),
    "reference": PropulsionConfig.reference(),
    "emb+ln+bias+head": PropulsionConfig(
        degree=4, include_embeddings=True, include_layernorm=True, train_bias=True,
        modules_to_save=("classifier",),
    ),
}
ROUND_TRIP_ROWS = [
    pytest.param(case, name, id=f"{case.id}-{name}")
    for case in CASES
    for name in ROUND_TRIP_CONFIGS
    if case.id == "transformer" or name != "emb+ln+bias+head"
]


@pytest.mark.parametrize(("case", "config_name"), ROUND_TRIP_ROWS)
def test_save_then_load_into_fresh_base_reproduces_outputs(case, config_name, tmp_path):
    config = ROUND_TRIP_CONFIGS[config_name]
    x = case.inputs(4, 1)
    trained = get_propulsion_model(case.build(0), config)
    train_adapter(trained, 1)
    expected = run(trained, x)
    assert save_adapter(trained, tmp_path / "adapter") == tmp_path / "adapter"

    fresh = case.build(0)
    assert not torch.allclose(run(fresh, x), expected)  # the adapter matters
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded is fresh
    assert propulsion_config(loaded) == config
    assert torch.equal(run(loaded, x), expected)  # float64 tensors stored exactly
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in trained.named_parameters()
    }


def test_adapter_holds_only_trained_tensors_and_no_pickle(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in [(torch, "save"), (torch, "load"), (pickle, "dump"), (pickle, "dumps"),
                         (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, forbidden)

    config = PropulsionConfig(degree=2, train_bias=True, modules_to_save=("classifier",))
    model = get_propulsion_model(CASE["mlp"].build(0), config)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    for path in tmp_path.iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # pickle protocol 2+ magic

    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(tensors) == set(adapter_state(model)) == {
        "layers.0.propulsion_z", "layers.0.base_layer.bias",
        "layers.1.propulsion_z", "layers.1.base_layer.bias",
        "classifier.weight", "classifier.bias",
    }
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["config"] == config.to_dict()
    assert meta["wrapped_modules"] == ["layers.0", "layers.1"]
    assert meta["modules_to_save"] == ["classifier"]
    assert meta["tensors"]["classifier.weight"] == [3, 7]
    load_adapter(CASE["mlp"].build(0), tmp_path)  # loading needs no pickle either


def test_save_overwrites_an_existing_adapter(tmp_path):
    case = CASE["mlp"]
    x = case.inputs(2, 0)
    first = get_propulsion_model(case.build(0), PropulsionConfig(degree=2))
    save_adapter(first, tmp_path)
    second = get_propulsion_model(case.build(0), PropulsionConfig(degree=3))
    train_adapter(second, 2)
    save_adapter(second, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert_close_rel(run(load_adapter(case.build(0), tmp_path), x), run(second, x), 0.0)


def test_loaded_adapter_can_be_saved_again(tmp_path):
    case = CASE["transformer"]
    model = get_propulsion_model(case.build(0), PropulsionConfig(include_embeddings=True))
    train_adapter(model, 3)
    save_adapter(model, tmp_path / "a")
    save_adapter(load_adapter(case.build(0), tmp_path / "a"), tmp_path / "b")
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()


def test_adapter_loads_into_a_float32_base(tmp_path):
    case = CASE["mlp"]
    x = case.inputs(3, 0)
    model = get_propulsion_model(case.build(0), PropulsionConfig(degree=2, train_bias=True))
    train_adapter(model, 4)
    save_adapter(model, tmp_path)
    loaded = load_adapter(case.build(0).float(), tmp_path)
    assert {layer.propulsion_z.dtype for layer in propulsion_layers(loaded).values()} == {
        torch.float32}
    assert_close_rel(loaded(x.float()), run(model, x), 1e-5)


# -- bad saves ---------------------------------------------------------------------------------

def test_save_of_merged_model_raises(tmp_path):
    model = get_propulsion_model(CASE["mlp"].build(0), PropulsionConfig())
    merge_adapter(model)
    with pytest.raises(PropulsionError, match="merged into the base weights; call unmerge_adapter"):
        save_adapter(model, tmp_path)
    assert list(tmp_path.iterdir()) == []
    unmerge_adapter(model)
    save_adapter(model, tmp_path)


def test_save_of_unwrapped_model_raises(tmp_path):
    with pytest.raises(PropulsionError, match="cannot save the adapter: the model has no Propulsion"):
        save_adapter(CASE["mlp"].build(0), tmp_path)


def test_save_of_non_finite_adapter_raises(tmp_path):
    model = get_propulsion_model(CASE["mlp"].build(0), PropulsionConfig())
    with torch.no_grad():
        model.layers[1].propulsion_z[2] = float("nan")
    with pytest.raises(PropulsionError, match=r"non-finite adapter tensors: \['layers.1.propulsion_z'\]"):
        save_adapter(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- mismatches: the model stays unwrapped and unchanged ---------------------------------------

class RenamedMLP(nn.Module):
    """The MLP's shapes under other module names."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(5, 7), nn.Linear(7, 7)])
        self.classifier = nn.Linear(7, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.classifier(x)


MISMATCH_ROWS = [
    pytest.param(PropulsionConfig(degree=2), lambda: MLP(hidden=9),
                 r"wrong shapes \['layers.0.propulsion_z: file \(7,\) vs model \(9,\)",
                 id="wider"),
    pytest.param(PropulsionConfig(degree=2, modules_to_save=("classifier",)),
                 lambda: MLP(hidden=9), r"classifier.weight: file \(3, 7\) vs model \(3, 9\)",
                 id="wider-head"),
    pytest.param(PropulsionConfig(degree=2), RenamedMLP,
                 r"missing \['blocks.0.propulsion_z', 'blocks.1.propulsion_z'\], unexpected "
                 r"\['layers.0.propulsion_z', 'layers.1.propulsion_z'\]", id="renamed-default-targets"),
    pytest.param(PropulsionConfig(degree=2, target_modules=["layers.0"]), RenamedMLP,
                 "target_modules entry 'layers.0' matches no module", id="renamed-explicit-target"),
    pytest.param(PropulsionConfig(degree=2), lambda: MLP(depth=3),
                 r"missing \['layers.2.propulsion_z'\]", id="deeper"),
    pytest.param(PropulsionConfig(degree=2), lambda: MLP(depth=1), r"unexpected \['layers.1.",
                 id="shallower"),
]


@pytest.mark.parametrize(("config", "make_target", "match"), MISMATCH_ROWS)
def test_load_into_mismatched_model_raises_and_leaves_it_unwrapped(
    config, make_target, match, tmp_path
):
    source = get_propulsion_model(CASE["mlp"].build(0), config)
    train_adapter(source, 5)
    save_adapter(source, tmp_path)
    torch.manual_seed(1)
    target = make_target().double()
    for i, param in enumerate(target.parameters()):  # a flag pattern that must survive
        param.requires_grad_(i % 2 == 0)
    before = snapshot(target)
    with pytest.raises(AdapterMismatchError, match=match) as info:
        load_adapter(target, tmp_path)
    assert str(tmp_path) in str(info.value)
    assert_unchanged(target, before)


def test_load_into_wrapped_model_raises(tmp_path):
    model = get_propulsion_model(CASE["mlp"].build(0), PropulsionConfig())
    save_adapter(model, tmp_path)
    before = snapshot(model)
    with pytest.raises(PropulsionError, match="already wrapped; load into the plain base model"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


# -- bad files: AdapterFileError naming the file, model untouched ------------------------------

def _seal(meta: dict) -> dict:
    """What save_adapter writes as content_sha256: sha256 of the other entries, canonical."""
    body = {k: v for k, v in meta.items() if k != "content_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return {**meta, "content_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _rewrite_checksum(folder: Path) -> None:
    """A consistent pair (both checksums recomputed), so that later checks are reached."""
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    (folder / CONFIG_NAME).write_text(json.dumps(_seal(meta)))


def _edit_meta(edit, reseal: bool = True):
    """Edit the config file; ``reseal`` recomputes its checksum (reaching the later checks),
    otherwise the edit is what a user typing into the file does."""

    def apply(folder: Path) -> None:
        meta = json.loads((folder / CONFIG_NAME).read_text())
        edit(meta)
        (folder / CONFIG_NAME).write_text(json.dumps(_seal(meta) if reseal else meta))

    return apply


def _weights(transform, fix_checksum: bool):
    def apply(folder: Path) -> None:
        path = folder / WEIGHTS_NAME
        path.write_bytes(transform(path.read_bytes()))
        if fix_checksum:
            _rewrite_checksum(folder)

    return apply


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS_NAME))
    tensors["classifier.propulsion_z"][0] = float("nan")
    save_file(tensors, str(folder / WEIGHTS_NAME))
    _rewrite_checksum(folder)


def _flip_last_byte(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 0xFF])


BAD_FILES = [
    pytest.param(lambda f: (f / CONFIG_NAME).unlink(), f"{CONFIG_NAME} is missing",
                 id="config-missing"),
    pytest.param(lambda f: (f / WEIGHTS_NAME).unlink(), f"{WEIGHTS_NAME} is missing",
                 id="weights-missing"),
    pytest.param(lambda f: (f / CONFIG_NAME).write_text('{"format": "propulsion-ntk-ad'),
                 "is corrupt \\(not valid JSON\\)", id="truncated-json"),
    pytest.param(lambda f: (f / CONFIG_NAME).write_bytes(b"\xff\xfe\x00garbage"),
                 "is corrupt \\(not valid JSON\\)", id="binary-json"),
    pytest.param(lambda f: (f / CONFIG_NAME).write_text("[1, 2]"), "is not a propulsion-ntk-adapter",
                 id="json-list"),
    pytest.param(_edit_meta(lambda m: m.update(format="peft")), "is not a propulsion-ntk-adapter",
                 id="other-format"),
    pytest.param(_edit_meta(lambda m: m.update(format_version=99)), "format version 99",
                 id="future-version"),
    pytest.param(_edit_meta(lambda m: m.pop("config")), "adapter_config.json",
                 id="json-without-config"),
    pytest.param(_edit_meta(lambda m: m.pop("weights_sha256")), "weights_sha256.*missing",
                 id="json-without-checksum"),
    pytest.param(_weights(_flip_last_byte, fix_checksum=False), "does not match the checksum",
                 id="checksum-mismatch"),
    pytest.param(_weights(lambda b: b[: len(b) // 2], fix_checksum=False),
                 "does not match the checksum", id="truncated-weights"),
    pytest.param(_weights(lambda b: b[: len(b) // 2], fix_checksum=True), "is corrupt",
                 id="truncated-weights-matching-checksum"),
    pytest.param(_weights(lambda b: b"", fix_checksum=True), "is corrupt", id="empty-weights"),
    pytest.param(_weights(lambda b: b[:8] + b"{not json" + b[17:], fix_checksum=True),
                 "is corrupt", id="corrupt-header"),
    pytest.param(_weights(lambda b: b"\x80\x04" + b[2:], fix_checksum=True), "is corrupt",
                 id="pickle-bytes"),
    pytest.param(_nan_weights, "holds non-finite values in \\['classifier.propulsion_z'\\]",
                 id="nan-weights"),
    pytest.param(_edit_meta(lambda m: m["config"].update(degree=3), reseal=False),
                 "adapter_config.json was edited or is damaged.*save the adapter again",
                 id="config-degree-edited"),
    pytest.param(_edit_meta(lambda m: m["config"].update(train_bias=True), reseal=False),
                 "was edited or is damaged", id="config-flag-edited"),
    pytest.param(_edit_meta(lambda m: m.update(wrapped_modules=["layers.0"]), reseal=False),
                 "was edited or is damaged", id="wrapped-list-edited"),
    pytest.param(_edit_meta(lambda m: m.update(weights_sha256="0" * 64), reseal=False),
                 "was edited or is damaged", id="weights-checksum-edited"),
    pytest.param(_edit_meta(lambda m: m.pop("content_sha256"), reseal=False),
                 "'content_sha256' is missing", id="seal-removed"),
    pytest.param(_edit_meta(lambda m: m.update(content_sha256="0" * 64), reseal=False),
                 "was edited or is damaged", id="seal-edited"),
    pytest.param(_edit_meta(lambda m: m["tensors"].update({"layers.0.propulsion_z": [8]})),
                 "does not hold the tensors adapter_config.json lists.*layers.0.propulsion_z",
                 id="tensor-list-edited-and-resealed"),
]


@pytest.mark.parametrize(("damage", "match"), BAD_FILES)
def test_bad_adapter_file_raises_file_error(damage, match, tmp_path):
    source = get_propulsion_model(CASE["mlp"].build(0), PropulsionConfig(degree=2))
    train_adapter(source, 6)
    save_adapter(source, tmp_path)
    damage(tmp_path)
    target = CASE["mlp"].build(0)
    before = snapshot(target)
    with pytest.raises(AdapterFileError, match=match):
        load_adapter(target, tmp_path)
    assert_unchanged(target, before)


def test_missing_folder_raises_file_error(tmp_path):
    with pytest.raises(AdapterFileError, match="is not a Propulsion adapter"):
        load_adapter(CASE["mlp"].build(0), tmp_path / "nowhere")


def test_adapter_with_invalid_config_names_the_field(tmp_path):
    source = get_propulsion_model(CASE["mlp"].build(0), PropulsionConfig(degree=2))
    save_adapter(source, tmp_path)
    _edit_meta(lambda m: m["config"].update(degree=0))(tmp_path)  # resealed: reaches the config
    target = CASE["mlp"].build(0)
    before = snapshot(target)
    with pytest.raises((PropulsionConfigError, AdapterFileError), match="degree"):
        load_adapter(target, tmp_path)
    assert_unchanged(target, before)


def test_config_file_is_sealed_and_its_layout_does_not_matter(tmp_path):
    """The checksum covers the entries, not the bytes: re-indenting the file still loads."""
    case = CASE["mlp"]
    source = get_propulsion_model(case.build(0), PropulsionConfig(degree=5))
    train_adapter(source, 7)
    save_adapter(source, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format_version"] == 2 and meta == _seal(meta)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta, indent=7, sort_keys=True))
    loaded = load_adapter(case.build(0), tmp_path)
    assert torch.equal(loaded(case.inputs(3, 0)), source(case.inputs(3, 0)))


def test_adapter_of_format_1_still_loads_with_a_warning(tmp_path):
    case = CASE["mlp"]
    source = get_propulsion_model(case.build(0), PropulsionConfig(degree=3, train_bias=True))
    train_adapter(source, 8)
    save_adapter(source, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta.pop("content_sha256")
    meta["format_version"] = 1  # what the earlier release wrote
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    with pytest.warns(UserWarning, match=r"format 1.*cannot be detected.*save it again"):
        loaded = load_adapter(case.build(0), tmp_path)
    assert torch.equal(loaded(case.inputs(3, 0)), source(case.inputs(3, 0)))
    save_adapter(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text())["format_version"] == 2


def test_adapter_whose_config_selects_other_modules_in_this_model_is_refused(tmp_path):
    source = get_propulsion_model(CASE["mlp"].build(0), PropulsionConfig(degree=2))
    save_adapter(source, tmp_path)
    _edit_meta(lambda m: m.update(wrapped_modules=["layers.1", "layers.0", "classifier"]))(
        tmp_path)
    target = CASE["mlp"].build(0)
    before = snapshot(target)
    with pytest.raises(AdapterMismatchError, match="wrapped the modules"):
        load_adapter(target, tmp_path)
    assert_unchanged(target, before)

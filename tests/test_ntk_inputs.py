"""Inputs, parameter selection, memory budget: what is accepted, and clear errors otherwise."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import RTOL, assert_close_rel
from test_ntk_reference import WRAPPED, reference_ntk
from torch import nn
from zoo import CASES, TinyTransformer

from ntk import (
    InputError,
    KernelOutputError,
    KernelTooLargeError,
    ParameterSelectionError,
    default_budget,
    empirical_ntk,
    select_parameters,
)
from ntk._inputs import vmap_safe

F64 = torch.float64
MLP_CASE, TRANSFORMER_CASE = CASES[0], CASES[1]


def _mlp():
    return MLP_CASE.build(0), MLP_CASE.inputs(3, 0)


def _tokens(n: int = 3, seed: int = 0):
    return TRANSFORMER_CASE.build(0), TRANSFORMER_CASE.inputs(n, seed)


# -- bad inputs: each raises a clear error -----------------------------------------------------


class NaNWhereZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) / x[:, :1]  # inf or nan where x[:, 0] == 0


class OneOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)[:, 0]  # (N,), not (N, C)


def _bad_cases():
    model, x = _mlp()
    tmodel, tx = _tokens()
    three = torch.ones(3, 3, dtype=F64)
    zero_last = torch.ones(4, 3, dtype=F64)
    zero_last[3, 0] = 0.0
    return [
        ("mapping_batch_mismatch", lambda: empirical_ntk(
            tmodel, {"input_ids": tx["input_ids"], "attention_mask": tx["attention_mask"][:2]}),
         InputError, r"batch sizes differ inside the mapping x1: input_ids has 3, "
                     r"attention_mask has 2"),
        ("x2_mapping_batch_mismatch", lambda: empirical_ntk(
            tmodel, tx, {"input_ids": tx["input_ids"], "attention_mask": tx["attention_mask"][:1]}),
         InputError, r"inside the mapping x2"),
        ("feature_shape_mismatch", lambda: empirical_ntk(model, x, torch.ones(2, 4, dtype=F64)),
         InputError, r"per-example shapes: \(5,\) vs \(4,\)"),
        ("sequence_length_mismatch", lambda: empirical_ntk(
            tmodel, tx, {k: v[:, :3] for k, v in tx.items()}),
         InputError, r"x1\['input_ids'\] and x2\['input_ids'\].*pad"),
        ("tensor_vs_mapping", lambda: empirical_ntk(model, x, {"x": x}),
         InputError, r"both be tensors or both be mappings"),
        ("different_keys", lambda: empirical_ntk(tmodel, tx, {"input_ids": tx["input_ids"]}),
         InputError, r"different keys"),
        ("zero_dim_input", lambda: empirical_ntk(model, torch.tensor(1.0)),
         InputError, r"0-d tensor"),
        ("empty_batch", lambda: empirical_ntk(model, x[:0]), InputError, r"batch size 0"),
        ("not_a_tensor", lambda: empirical_ntk(model, [[1.0] * 5]), InputError,
         r"tensor or a mapping of tensors, got list"),
        ("mapping_value_not_tensor", lambda: empirical_ntk(tmodel, {**tx, "flag": True}),
         InputError, r"x1\['flag'\] is a bool"),
        ("selector_selects_nothing", lambda: empirical_ntk(model, x, params=lambda n, p: False),
         ParameterSelectionError, r"selects nothing in MLP"),
        ("lora_on_plain_model", lambda: empirical_ntk(model, x, params="lora"),
         ParameterSelectionError, r"'lora' selects nothing"),
        ("trainable_when_all_frozen", lambda: empirical_ntk(
            _mlp()[0].requires_grad_(False), x), ParameterSelectionError,
         r"0 with requires_grad"),
        ("unknown_selector", lambda: empirical_ntk(model, x, params="weights"),
         ParameterSelectionError, r"unknown parameter selector 'weights'"),
        ("unknown_name_close_match", lambda: empirical_ntk(model, x, params=["layer.0.weight"]),
         ParameterSelectionError, r"did you mean 'layers.0.weight'"),
        ("duplicate_name", lambda: empirical_ntk(
            model, x, params=["classifier.bias", "classifier.bias"]),
         ParameterSelectionError, r"more than once"),
        ("non_finite_outputs", lambda: empirical_ntk(NaNWhereZero().double(), three, zero_last,
                                                     params="all", batch_size=2, method="jacobian"),
         KernelOutputError, r"not finite \(nan or inf\) for x2 examples \[3\]"),
        ("non_finite_outputs_in_probe", lambda: empirical_ntk(NaNWhereZero().double(), zero_last,
                                                              method="jacobian"),
         KernelOutputError, r"not finite \(nan or inf\) for x1 examples \[3\]"),
        ("unknown_output", lambda: empirical_ntk(model, x, output="logits"),
         ValueError, r"unknown output reduction 'logits'"),
        ("unknown_method", lambda: empirical_ntk(model, x, method="fast"),
         ValueError, r"unknown method 'fast'"),
        ("output_not_2d", lambda: empirical_ntk(OneOutput().double(), three, method="jacobian"),
         KernelOutputError, r"must have shape \(n, C\) .* for a batch of 2 it has shape \(2,\)"),
        ("non_finite_outputs_structured", lambda: empirical_ntk(NaNWhereZero().double(), zero_last),
         KernelOutputError, r"not finite \(NaN or inf\)"),
        ("output_not_2d_structured", lambda: empirical_ntk(OneOutput().double(), three),
         KernelOutputError, r"must have shape \(n, C\) .* it has shape \(3,\)"),
        ("budget_too_small_structured", lambda: empirical_ntk(model, x, memory_budget=1000),
         KernelTooLargeError, r"needs about [0-9.e+-]+ GiB .* budget of 9.31e-07 GiB"),
        ("output_not_tensor", lambda: empirical_ntk(model, x, output_fn=lambda out: (out,)),
         KernelOutputError, r"is a tuple, not a tensor"),
        ("integer_dtype", lambda: empirical_ntk(model, x, dtype=torch.int64),
         ValueError, r"floating torch.dtype"),
        ("bad_batch_size", lambda: empirical_ntk(model, x, batch_size=0),
         ValueError, r"batch_size must be a positive integer"),
        ("bad_budget", lambda: empirical_ntk(model, x, memory_budget=-1),
         ValueError, r"memory_budget must be a finite positive"),
        ("budget_too_small", lambda: empirical_ntk(model, x, memory_budget=1000,
                                                   method="jacobian"),
         KernelTooLargeError, r"needs an estimated [0-9.e+-]+ GiB .* budget of 9.31e-07 GiB"),
        ("budget_too_small_one_method", lambda: empirical_ntk(
            model, x, method="ntk_vp", memory_budget=1000),
         KernelTooLargeError, r"method 'ntk_vp' needs an estimated"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_clear_error(case):
    _, call, error, pattern = case
    with pytest.raises(error, match=pattern):
        call()


def test_kernel_too_large_is_a_memory_error():
    assert issubclass(KernelTooLargeError, MemoryError)
    for err in (InputError, ParameterSelectionError, KernelOutputError):
        assert issubclass(err, ValueError)


# -- accepted inputs -----------------------------------------------------------------------------


def test_output_fn_fixes_a_one_dimensional_output():
    model, x = OneOutput().double(), torch.randn(3, 3, dtype=F64)
    k = empirical_ntk(model, x, params="all", output_fn=lambda y: y[:, None])
    assert k.shape == (3, 3, 1, 1)
    expected = (x @ x.T + 1)[:, :, None, None]
    assert_close_rel(k, expected, RTOL[F64])


def test_default_output_fn_takes_logits():
    class WithLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.fc(x), hidden=x)

    model, x = WithLogits().double(), torch.randn(2, 3, dtype=F64)
    k = empirical_ntk(model, x, params="all")
    assert_close_rel(k, (x @ x.T + 1)[:, :, None, None] * torch.eye(2, dtype=F64), RTOL[F64])


def test_kernel_on_the_model_device():
    model, x = _mlp()
    assert empirical_ntk(model, x).device == next(model.parameters()).device


class CheckedForward(nn.Module):
    """A data-dependent check (``bool(tensor)``): vmap over examples cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(torch.isnan(x).any()):
            raise ValueError("nan in the inputs")
        return self.head(torch.tanh(self.fc(x)))


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp"])
def test_unvmappable_model_falls_back_to_a_loop(method):
    torch.manual_seed(0)
    model, x = CheckedForward().double().eval(), torch.randn(3, 3, dtype=F64)
    with pytest.warns(RuntimeWarning, match="Python loop"):
        k = empirical_ntk(model, x, params="all", method=method)
    names = list(select_parameters(model, "all"))
    assert_close_rel(k, reference_ntk(model, x, None, names), RTOL[F64])


def test_tiny_transformer_mask_stays_2d_and_vmap_is_used():
    model, x = _tokens()
    assert vmap_safe(model, x) is x  # not a transformers model: inputs unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        empirical_ntk(model, x, params="all")


def test_mask_mishandled_by_vmap_path_is_caught(monkeypatch):
    # Simulate a vmap-safe rewrite that loses the padding: the probe includes the most padded
    # example, sees different outputs and falls back to the loop (which gives the right K).
    import ntk._inputs as inputs

    def drop_mask(model, x):
        return {**x, "attention_mask": torch.ones_like(x["attention_mask"])}

    monkeypatch.setattr(inputs, "vmap_safe", drop_mask)
    model, x = _tokens(4, 3)
    x["attention_mask"][:2] = 1  # the padded examples come last: the probe must find them
    x["attention_mask"][3, 1:] = 0
    with pytest.warns(RuntimeWarning, match="differ from the batched forward"):
        k = empirical_ntk(model, x, params="all", method="jacobian")
    names = list(select_parameters(model, "all"))
    assert_close_rel(k, reference_ntk(model, x, None, names), RTOL[F64])


def test_progress_bar_runs(capsys):
    model, x = _mlp()
    k = empirical_ntk(model, x, progress=True, batch_size=2, method="jacobian")
    assert k.shape == (3, 3, 3, 3)
    assert "ntk tiles" in capsys.readouterr().err
    empirical_ntk(model, x, progress=True, batch_size=2)
    assert "structured kernels" in capsys.readouterr().err


@pytest.mark.realmodel
def test_vmap_safe_builds_additive_4d_mask_for_transformers(minilm_path):
    from conftest import load_minilm

    model = load_minilm(minilm_path)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = vmap_safe(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long),
                            "attention_mask": mask})
    m4 = out["attention_mask"]
    assert m4.shape == (2, 1, 3, 3) and m4.dtype == F64
    assert (m4[0, 0, :, 2] == torch.finfo(F64).min).all() and (m4[0, 0, :, :2] == 0).all()
    assert (m4[1] == 0).all()


# -- parameter selection -------------------------------------------------------------------------


SELECTIONS = [
    ("all", "all", lambda names: names),
    ("bias", "bias", lambda names: [n for n in names if n.endswith("bias")]),
    ("list", ["up.weight", "classifier.bias"], lambda names: ["up.weight", "classifier.bias"]),
    ("predicate", lambda n, p: p.ndim == 2 and "embed" in n, lambda names: ["embed.weight"]),
]


@pytest.mark.parametrize("sel", SELECTIONS, ids=[s[0] for s in SELECTIONS])
def test_selectors(sel):
    _, selector, expected = sel
    model = TinyTransformer()
    names = [n for n, _ in model.named_parameters()]
    assert list(select_parameters(model, selector)) == expected(names)


def test_named_selectors_on_wrapped_models():
    prop = WRAPPED[0].build(0)
    assert all("propulsion_z" in n for n in select_parameters(prop, "propulsion"))
    assert list(select_parameters(prop, "propulsion")) == list(select_parameters(prop))
    lora = WRAPPED[7].build(0)
    chosen = list(select_parameters(lora, "lora"))
    assert len(chosen) == 4 and all(("lora_A" in n) or ("lora_B" in n) for n in chosen)


def test_selected_tensors_share_storage_with_live_parameters():
    model, _ = _mlp()
    chosen = select_parameters(model, "all")
    for name, p in model.named_parameters():
        assert chosen[name].data_ptr() == p.data_ptr()


def test_trainable_follows_requires_grad_at_call_time():
    model, x = _mlp()
    k_all = empirical_ntk(model, x)
    model.layers[0].requires_grad_(False)
    k_rest = empirical_ntk(model, x)
    k_first = empirical_ntk(model, x, params=["layers.0.weight", "layers.0.bias"])
    assert_close_rel(k_rest + k_first, k_all, RTOL[F64])


# -- memory ---------------------------------------------------------------------------------------


def test_default_budget_reads_free_memory():
    budget = default_budget(torch.device("cpu"))
    meminfo = open("/proc/meminfo").read()
    available = int(re.search(r"MemAvailable:\s+(\d+)", meminfo).group(1)) * 1024
    assert 0 < budget <= available


def test_budget_error_states_estimate_and_budget_in_gib():
    model, x = _mlp()
    with pytest.raises(KernelTooLargeError) as info:
        empirical_ntk(model, x, method="jacobian", memory_budget=1000)
    message = str(info.value)
    found = re.search(r"needs an estimated ([0-9.e+-]+) GiB.*budget of ([0-9.e+-]+) GiB", message)
    assert found and float(found.group(1)) > float(found.group(2)) == pytest.approx(1000 / 2**30,
                                                                                    rel=1e-2)
    assert "memory_budget" in message and "params=" in message

"""Linear layers that read one input (q, k, v) form one block in the summed kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import TinyTransformer, _token_inputs

import ntk
from ntk._handlers import SharedInputHandler

F64 = torch.float64


@pytest.fixture
def groups(monkeypatch):
    """Members of every group the handler formed (list of tuples of member names)."""
    seen: list[tuple[str, ...]] = []
    real = SharedInputHandler.prepare

    def prepare(self, module, calls, n, names, dtype):
        out = real(self, module, calls, n, names, dtype)
        if out is not None:
            path = {m: f"{type(m).__name__}{i}" for i, m in enumerate(self.members)}
            seen.extend(tuple(path[self.members[i]] for i in g) for g, _ in out.groups)
        return out

    monkeypatch.setattr(SharedInputHandler, "prepare", prepare)
    return seen


def _bert(layers: int, hidden: int, heads: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=2 * hidden,
                                  max_position_embeddings=16, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).double().eval()


MODELS = {  # model, the largest group expected (BERT's last layer: k and v only)
    "transformer": (lambda: (torch.manual_seed(0), TinyTransformer().double().eval())[1], 3),
    "bert": (lambda: _bert(1, 16, 2), 2),
    "minilm_like": (lambda: _bert(2, 24, 4), 3),  # MiniLM's shape: BERT layers, [CLS] pooler
}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert float((got - want).abs().max() / want.abs().max()) < 1e-10


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("output", ["full", "trace"])
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialise"])
def test_fused_blocks_agree_with_the_reference(groups, name, output, strategy):
    build, largest = MODELS[name]
    model = build()
    for padded in (True, False):  # padded: some q, k rows lose their back-signal
        make = _token_inputs(vocab=11, t=6, padded=padded)
        x, x2 = make(5, 0), make(3, 1)
        for second in (None, x2):
            got = ntk.structured_ntk(model, x, second, params="all", output=output,
                                     strategy=strategy)
            _close(got, ntk.reference_ntk(model, x, second, params="all", output=output))
    assert max(len(g) for g in groups) == largest  # q, k and v of a layer in one group


def test_layers_with_other_live_tokens_stay_apart(groups):
    """BERT's last layer is read at [CLS] only: its query has a back-signal there alone, key
    and value at every token, so the query is not grouped with them."""
    model = _bert(1, 16, 2)
    x = _token_inputs(vocab=11, t=6, padded=False)(4, 0)
    _close(ntk.structured_ntk(model, x, params="all", output="trace"),
           ntk.reference_ntk(model, x, params="all", output="trace"))
    assert ("Linear1", "Linear2") in groups and not any(len(g) >= 3 for g in groups)


def test_tiles_grouped_differently_agree_with_the_reference(monkeypatch):
    """One-example tiles of padded inputs: a single kept token leaves q and k without a
    back-signal in some tiles only, so tile pairs meet with different groups."""
    import ntk._handlers.shared_input as shared

    calls = [0]
    real = shared._columns

    def columns(f, member):
        calls[0] += 1
        return real(f, member)

    monkeypatch.setattr(shared, "_columns", columns)
    model = MODELS["transformer"][0]()
    x = _token_inputs(vocab=11, t=6)(5, 0)
    for output in ("full", "trace"):
        _close(ntk.structured_ntk(model, x, params="all", output=output, batch_size=1),
               ntk.reference_ntk(model, x, params="all", output=output))
    assert calls[0] > 0

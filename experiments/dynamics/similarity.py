"""Kernels of several fine-tuning methods on one model at initialisation, and how alike they are.

The question (``docs/theory/claims.md``): is the Propulsion kernel ``K_P`` (gradients with
respect to the z vectors) a good approximation of the full fine-tuning kernel ``K_F`` (gradients
with respect to every weight)? Per layer, full fine-tuning sees the identity metric on the layer
inputs, Propulsion the rank-one metric ``k^2 w_j w_j^T`` of each output unit, so the two can only
agree up to a scale. Every comparison here is therefore scale-free (CKA, alignment, relative
error after the best scalar) or reports the scale itself.

Parameter sets (:func:`method_kernels`; all kernels at initialisation, z = 1, full layout
``(N, N, C, C)``). One capture pass on the model wrapped by Propulsion on every Linear and
Embedding gives the first group (wrapping is the identity at z = 1, so the base weights' kernel
is that of the plain model):

- ``full``: every base parameter (weights, biases, embeddings, LayerNorms, head);
- ``full_nohead``: the same without the classification head;
- ``propulsion``: z of every Linear, the head included (the clean "z only" default), degree k;
- ``propulsion_nohead``: z of every Linear but the head;
- ``propulsion_attn``: z of the attention projections (query, key, value, attention output);
- ``propulsion_reference``: the authors' default: z of every Linear and Embedding plus the
  biases of the wrapped Linears (the head weight frozen);
- ``bitfit``: every bias (LayerNorm and head biases included); ``bitfit_nohead`` without the head's;
- ``head``: the head's weight and bias (what "head trained in full" adds to every method);
- ``reference_bias``: the biases of the wrapped Linears, the part of ``propulsion_reference`` that
  does not scale with k.

The head as an explicit factor (:func:`with_head`): the kernel of a set is the sum of its
parameters' blocks, so "method X with the head trained in full" is ``K_{X without head} + K_head``
exactly, and the authors' preset at another degree k' is
``(k'/k)^2 (K_reference - K_reference_bias) + K_reference_bias`` at z = 1 (every z block scales
by k^2, a bias block does not).

Further passes: ``propulsion_k1`` (same z as ``propulsion``, degree 1: at z = 1 each layer's
block is exactly ``1/k^2`` of the degree-k block, so scale-free metrics of the z-only sets do not
depend on k at initialisation; the authors' preset, which also trains biases, does), ``lora``
(peft LoRA on the attention query and value projections, rank r; B drawn ``N(0, b_std^2)``
instead of peft's zeros, because at B = 0 the A-block is exactly zero and the kernel is that of
B alone; the small B changes the model's function by O(b_std)) and ``ia3``
(peft's IA3 defaults for the architecture). LoRA and IA3 kernels exclude the head; compare them
with ``full_nohead``, or add ``head`` (:func:`with_head`). ``propulsion_k1`` may be computed on
the first examples only (``k1_examples``): it serves the exact check ``K_P(k) = k^2 K_P(1)``.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import ntk
from ntk import metrics
from propulsion import PropulsionConfig, get_propulsion_model
from propulsion.layer import PropulsionEmbedding, PropulsionLinear

__all__ = [
    "ATTENTION",
    "HEAD",
    "METRICS",
    "WideMLP",
    "centre_examples",
    "compare",
    "lora_model",
    "minilm",
    "model_at_init",
    "parameter_counts",
    "propulsion_sets",
    "reference_at_degree",
    "with_head",
    "small_bert",
    "trace",
    "method_kernels",
    "method_parameter_counts",
]

HEAD = "classifier"
ATTENTION = re.compile(r"(.*\.)?attention\.(self\.(query|key|value)|output\.dense)")
METRICS = ("cka", "cka_u", "cka_examples", "cka_examples_u", "alignment", "rel_error", "best_scale",
           "eff_rank", "eff_rank_ref")
#: the metrics of :func:`compare` that need no eigen-decomposition (cheap enough for resampling)
CHEAP_METRICS = ("cka", "cka_u", "cka_examples", "cka_examples_u", "alignment", "rel_error")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class WideMLP(nn.Module):
    """``x (N, d_in) -> [Linear(width) -> act] * depth -> classifier -> (N, C)``.

    Standard parameterisation with Gaussian weights ``W ~ N(0, gain^2 / fan_in)`` (gain 1 for
    tanh, sqrt(2) for relu) and biases ``N(0, bias_std^2)``: the setting of the NTK width limit.
    """

    def __init__(self, d_in: int, width: int, depth: int, n_out: int, *, activation: str = "tanh",
                 bias_std: float = 0.1, seed: int = 0):
        super().__init__()
        if min(d_in, width, depth, n_out) < 1:
            raise ValueError(f"d_in, width, depth, n_out must be >= 1, got {(d_in, width, depth, n_out)}")
        if activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
        dims = [d_in] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.classifier = nn.Linear(width, n_out)
        self.activation = activation
        gain = 1.0 if activation == "tanh" else 2.0**0.5
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in [*self.layers, self.classifier]:
                w = torch.randn(layer.weight.shape, generator=gen) * gain / layer.in_features**0.5
                layer.weight.copy_(w)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * bias_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.tanh if self.activation == "tanh" else torch.relu
        for layer in self.layers:
            x = act(layer(x))
        return self.classifier(x)


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def small_bert(hidden: int, *, layers: int = 2, vocab_size: int = 30522, max_length: int = 64,
               n_out: int = 2, seed: int = 0, init_std: float | None = None) -> nn.Module:
    """A randomly initialised ``BertForSequenceClassification`` of a given width.

    Heads of 32 dimensions (as MiniLM), feed-forward ``4 * hidden``; weights
    ``N(0, init_std^2)`` with ``init_std = hidden^-1/2`` by default (fan-in scaling, the standard
    parameterisation of width limits; transformers' own default is a fixed 0.02).
    """
    from transformers import BertConfig, BertForSequenceClassification

    if hidden < 32 or hidden % 32:
        raise ValueError(f"hidden must be a multiple of 32 (heads of 32 dimensions), got {hidden}")
    _quiet()
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, intermediate_size=4 * hidden,
        max_position_embeddings=max(max_length, 8), num_labels=n_out,  # type: ignore[call-arg]
        initializer_range=hidden**-0.5 if init_std is None else init_std,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def minilm(pretrained: bool, *, n_out: int = 2, seed: int = 0) -> nn.Module:
    """MiniLM with its pre-trained weights, or the same architecture with transformers' random
    initialisation (``N(0, 0.02^2)`` weights, seeded); the head is seeded in both cases."""
    return model_at_init("minilm", pretrained, n_out=n_out, seed=seed)


def model_at_init(name: str, pretrained: bool, *, n_out: int = 2, seed: int = 0) -> nn.Module:
    """An offline model of ``experiments.data.models`` (``"minilm"``, ``"smollm2"``, ...) with its
    pre-trained weights, or the same architecture with transformers' random initialisation
    (seeded ``from_config``); the classification head is seeded in both cases. Eval mode, float32."""
    from experiments.data.models import load_model

    if pretrained:
        return load_model(name, num_labels=n_out, seed=seed)
    from transformers import AutoModelForSequenceClassification

    _quiet()
    config = copy.deepcopy(load_model(name, num_labels=n_out, seed=seed).config)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


# --------------------------------------------------------------------------------------------
# Parameter sets and kernels
# --------------------------------------------------------------------------------------------


def _heads(model: nn.Module) -> tuple[str, ...]:
    from experiments.training.methods import HEAD_NAMES

    children = dict(model.named_children())
    return tuple(name for name in HEAD_NAMES if name in children)


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def propulsion_sets(wrapped: nn.Module) -> dict[str, list[str]]:
    """Parameter-name lists of the sets of the main pass (module docstring) in a model wrapped by
    Propulsion on every Linear and Embedding. The head is the top-level module named ``classifier``
    (BERT, the MLPs here) or ``score`` (LLaMA). Sets that would be empty are left out."""
    heads = _heads(wrapped)
    linear_z, embed_z, linear_bias = [], [], []
    for path, module in wrapped.named_modules():
        if isinstance(module, PropulsionLinear):
            linear_z.append(f"{path}.propulsion_z")
            if module.base_layer.bias is not None:
                linear_bias.append(f"{path}.base_layer.bias")
        elif isinstance(module, PropulsionEmbedding):
            embed_z.append(f"{path}.propulsion_z")
    names = [n for n, _ in wrapped.named_parameters()]
    base = [n for n in names if "propulsion_z" not in n]
    attn = [z for z in linear_z if ATTENTION.fullmatch(z.removesuffix(".propulsion_z"))]
    biases = [n for n in base if n.endswith(".bias")]
    sets = {
        "full": base,
        "full_nohead": [n for n in base if not _in(n, heads)],
        "head": [n for n in base if _in(n, heads)],
        "propulsion": linear_z,
        "propulsion_nohead": [z for z in linear_z if not _in(z, heads)],
        "propulsion_attn": attn,
        "propulsion_reference": linear_z + embed_z + linear_bias if embed_z else [],
        "reference_bias": linear_bias if embed_z else [],
        "bitfit": biases,
        "bitfit_nohead": [n for n in biases if not _in(n, heads)],
    }
    return {key: value for key, value in sets.items() if value}


def parameter_counts(model: nn.Module, sets: Mapping[str, list[str]]) -> dict[str, int]:
    """Number of scalar parameters in each named set of ``model``."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    return {key: sum(sizes[n] for n in names) for key, names in sets.items()}


def _kernels(model: nn.Module, x: Any, sets: Mapping[str, Any], dtype: torch.dtype,
             batch_size: int | None, memory_budget: float | None = None) -> dict[str, torch.Tensor]:
    out = ntk.kernels(model, x, params=dict(sets), output="full", dtype=dtype, batch_size=batch_size,
                      memory_budget=memory_budget)
    return {k: v.detach().cpu() for k, v in out.items()}  # type: ignore[union-attr]


def lora_model(model: nn.Module, *, rank: int = 8, alpha: int = 16, b_std: float = 0.02, seed: int = 0
               ) -> nn.Module:
    """A deep copy of ``model`` with peft LoRA (rank r, alpha) on the attention query and value
    projections (``query``/``value`` in BERT, ``q_proj``/``v_proj`` in LLaMA), head frozen;
    A drawn as peft does (``U(-1/sqrt(d_in), 1/sqrt(d_in))``) and every B ``N(0, b_std^2)``
    (peft's default B = 0 zeroes the A-block), both from ``seed``."""
    from experiments.training.methods import prepare

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = ["q_proj", "v_proj"] if model_type in ("llama", "mistral", "qwen2") else ["query", "value"]
    lora = prepare(copy.deepcopy(model), "lora", head="frozen", r=rank, lora_alpha=alpha,
                   target_modules=targets)
    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_A" in name:  # peft's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in))
                bound = param.shape[1] ** -0.5
                param.copy_((2 * torch.rand(param.shape, generator=gen) - 1) * bound)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
    return lora


def _slice(x: Any, n: int) -> Any:
    if isinstance(x, Mapping):
        return {k: v[:n] for k, v in x.items()}
    return x[:n]


def _peft_model(model: nn.Module, method: str, *, lora_rank: int, lora_alpha: int, lora_b_std: float,
                seed: int) -> nn.Module:
    from experiments.training.methods import prepare

    if method == "lora":
        return lora_model(model, rank=lora_rank, alpha=lora_alpha, b_std=lora_b_std, seed=seed)
    return prepare(copy.deepcopy(model), "ia3", head="frozen")


_PEFT_PARAMS = {"lora": "lora", "ia3": lambda name, _: "ia3_l" in name}


def method_kernels(model: nn.Module, x: Any, *, degree: int, peft_methods: tuple[str, ...] = (),
                   lora_rank: int = 8, lora_alpha: int = 16, lora_b_std: float = 0.02, seed: int = 0,
                   dtype: torch.dtype = torch.float64, batch_size: int | None = None,
                   k1_examples: int | None = None, memory_budget: float | None = None
                   ) -> dict[str, torch.Tensor]:
    """Full-layout kernels ``(N, N, C, C)`` of every parameter set of the module docstring.

    Args:
        model: the plain classifier (left untouched; every pass works on a deep copy).
        x: inputs, a tensor or a mapping of tensors (already on the model's device).
        degree: Propulsion degree k (>= 1) of ``propulsion*`` sets; ``propulsion_k1`` uses 1.
        peft_methods: any of ``"lora"``, ``"ia3"`` (needs a transformers model).
        lora_rank, lora_alpha: LoRA's r and alpha on the query and value projections.
        lora_b_std: standard deviation of LoRA's B at initialisation (> 0, see module docstring).
        seed: seeds LoRA's B.
        dtype: accumulation dtype of the kernels.
        batch_size: largest tile of examples (None: from the memory budget).
        k1_examples: compute ``propulsion_k1`` (the check of ``K_P(k) = k^2 K_P(1)``) on the first
            this many examples only (``(n, n, C, C)``); None: on all.
        memory_budget: bytes each kernel pass may use (None: a share of the free memory).

    Returns:
        set name -> kernel on the CPU.
    """
    unknown = set(peft_methods) - {"lora", "ia3"}
    if unknown:
        raise ValueError(f"unknown peft methods {sorted(unknown)}; use 'lora' and/or 'ia3'")
    if "lora" in peft_methods and not lora_b_std > 0:
        raise ValueError(f"lora_b_std must be > 0 (at B = 0 the A-block vanishes), got {lora_b_std}")
    if k1_examples is not None and k1_examples < 1:
        raise ValueError(f"k1_examples must be >= 1 or None, got {k1_examples}")
    has_embedding = any(isinstance(m, nn.Embedding) for m in model.modules())

    wrapped = get_propulsion_model(copy.deepcopy(model),
                                   PropulsionConfig(degree=degree, include_embeddings=has_embedding))
    out = _kernels(wrapped, x, propulsion_sets(wrapped), dtype, batch_size, memory_budget)
    del wrapped

    wrapped = get_propulsion_model(copy.deepcopy(model), PropulsionConfig(degree=1))
    x1 = x if k1_examples is None else _slice(x, k1_examples)
    out.update(_kernels(wrapped, x1, {"propulsion_k1": "propulsion"}, dtype, batch_size,
                        memory_budget))
    del wrapped

    for method in peft_methods:
        # "auto": peft IA3 keeps its vectors in a never-called ParameterDict; the structured engine
        # attributes them to the layer that uses them (checked against the Jacobian in the tests).
        adapted = _peft_model(model, method, lora_rank=lora_rank, lora_alpha=lora_alpha,
                              lora_b_std=lora_b_std, seed=seed)
        out.update(_kernels(adapted, x, {method: _PEFT_PARAMS[method]}, dtype, batch_size,
                            memory_budget))
        del adapted
    zero = [name for name, kernel in out.items() if not bool(kernel.abs().max() > 0)]
    if zero:
        raise RuntimeError(f"kernels of {zero} are exactly zero: their parameters get no gradient")
    return out


def method_parameter_counts(model: nn.Module, *, degree: int = 5, peft_methods: tuple[str, ...] = (),
                            lora_rank: int = 8) -> dict[str, int]:
    """Trainable-parameter count of every set of :func:`method_kernels` (and of ``X+head``)."""
    has_embedding = any(isinstance(m, nn.Embedding) for m in model.modules())
    wrapped = get_propulsion_model(copy.deepcopy(model),
                                   PropulsionConfig(degree=degree, include_embeddings=has_embedding))
    counts = parameter_counts(wrapped, propulsion_sets(wrapped))
    del wrapped
    for method in peft_methods:
        adapted = _peft_model(model, method, lora_rank=lora_rank, lora_alpha=16, lora_b_std=0.02, seed=0)
        selector = _PEFT_PARAMS[method]
        counts[method] = sum(p.numel() for n, p in adapted.named_parameters()
                             if (("lora_A" in n or "lora_B" in n) if selector == "lora" else selector(n, p)))
        del adapted
    for name in ("propulsion_nohead", "propulsion_attn", "bitfit_nohead", *peft_methods):
        if name in counts and "head" in counts:
            counts[_plus_head(name)] = counts[name] + counts["head"]
    return counts


def _plus_head(name: str) -> str:
    return name.removesuffix("_nohead") + "+head"


def with_head(kernels: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``X+head = K_X + K_head`` for every head-free set X present (``propulsion_nohead``,
    ``propulsion_attn``, ``bitfit_nohead``, ``lora``, ``ia3``): the method with the head trained in
    full (exact: a kernel is the sum of its parameters' blocks)."""
    if "head" not in kernels:
        raise ValueError("with_head needs the 'head' kernel (the head's weight and bias)")
    return {_plus_head(name): kernels[name] + kernels["head"] for name in
            ("propulsion_nohead", "propulsion_attn", "bitfit_nohead", "lora", "ia3") if name in kernels}


def reference_at_degree(kernels: Mapping[str, torch.Tensor], degree: int, new_degree: int) -> torch.Tensor:
    """The authors' preset (z on every Linear and Embedding, wrapped biases trained) at degree
    ``new_degree``, from its kernel at ``degree``: ``(k'/k)^2 (K_ref - K_bias) + K_bias`` (z = 1)."""
    if min(degree, new_degree) < 1:
        raise ValueError(f"degrees must be >= 1, got {degree} and {new_degree}")
    ref = kernels["propulsion_reference"]
    bias = kernels.get("reference_bias", torch.zeros_like(ref))
    return (new_degree / degree) ** 2 * (ref - bias) + bias


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def trace(kernel: torch.Tensor) -> torch.Tensor:
    """``(N, N, C, C) -> (N, N)``: ``sum_c K[a, b, c, c]``."""
    if kernel.dim() != 4:
        raise ValueError(f"expected a full kernel (N, N, C, C), got shape {tuple(kernel.shape)}")
    return torch.einsum("abcc->ab", kernel)


def centre_examples(kernel: torch.Tensor) -> torch.Tensor:
    """Double-centre over the two example axes, for every output pair:
    ``K[a, b] - mean_a K[., b] - mean_b K[a, .] + mean_ab K`` (``(H_N x I) K (H_N x I)``)."""
    return (kernel - kernel.mean(0, keepdim=True) - kernel.mean(1, keepdim=True)
            + kernel.mean((0, 1), keepdim=True))


def compare(reference: torch.Tensor, kernel: torch.Tensor, top_ks: tuple[int, ...] = (2, 10), *,
            cheap: bool = False) -> dict[str, float]:
    """Scale-free similarity of ``kernel`` to ``reference`` (same layout, square).

    Returns:
        Centred over examples (the input-dependent part; what decides): ``cka_examples`` (each
        ``(N, N)`` block double-centred over examples, HSICs summed over output pairs; equal to
        ``cka`` for a ``(N, N)`` kernel) and ``cka_examples_u`` (the same from unbiased HSIC,
        not inflated at small N). Centred over all N C rows of the matrix form: ``cka`` and
        ``cka_u``. Uncentred (dominated by the input-independent block of these kernels):
        ``alignment`` (cosine of vec K) and ``rel_error`` = ``||K_ref - c* K||_F / ||K_ref||_F``
        with the best scalar ``c*`` (``= sqrt(1 - alignment^2)``). Unless ``cheap``: ``best_scale``
        = ``c*``, ``eff_rank`` and ``eff_rank_ref`` (Roy-Vetterli) and ``overlap_top{k}`` for each k
        in ``top_ks`` no larger than the matrix size (mean squared cosine of the principal angles
        between the top-k eigenspaces). An unbiased value is NaN where the unbiased self-HSIC of
        a kernel is not positive (no measurable structure at this N).
    """
    n = metrics.as_matrix(reference).shape[0]
    result = {
        "cka": metrics.cka(reference, kernel),
        "cka_u": _unbiased(metrics.cka, reference, kernel),
        "cka_examples": metrics.cka_examples(reference, kernel),
        "cka_examples_u": _unbiased(metrics.cka_examples, reference, kernel),
        "alignment": metrics.alignment(reference, kernel),
        "rel_error": metrics.relative_error(reference, kernel, scale_optimal=True),
    }
    if cheap:
        return result
    result |= {
        "best_scale": metrics.best_scale(reference, kernel),
        "eff_rank": metrics.effective_rank(kernel),
        "eff_rank_ref": metrics.effective_rank(reference),
    }
    for k in top_ks:
        if k <= n:
            result[f"overlap_top{k}"] = metrics.top_k_overlap(reference, kernel, k)
    return result


def _unbiased(metric: Any, reference: torch.Tensor, kernel: torch.Tensor) -> float:
    try:
        return metric(reference, kernel, unbiased=True)
    except ValueError as err:
        if "unbiased HSIC" in str(err) and "<= 0" in str(err):
            return float("nan")
        raise

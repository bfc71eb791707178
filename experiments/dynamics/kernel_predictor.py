"""What a method's initial kernel predicts on its own: kernel regression with the empirical NTK.

If fine-tuning stays in the kernel regime, the fine-tuned model behaves like kernel regression
with the NTK at initialisation over the method's trained parameters (Malladi et al. 2023 compare
such kernel predictors with fine-tuning). :func:`kernel_predictor_accuracy` fits that predictor
on ``n_train`` labelled examples and scores it on test examples, to set beside the method's
fine-tuned accuracy.

Choices (documented, overridable):

- targets: centred one-hot, ``Y[a, c] = 1[y_a = c] - 1/C`` (rows sum to 0; Arora et al. 2019).
  With a reduced kernel (``"trace"``, shared by every class) one-hot, centred and +-1 targets
  give the same argmax; with ``"full"`` kernels they can differ.
- ridge: relative to the kernel's scale, ``lambda = ridge * mean_i M[i, i]`` with ``M`` the
  matrix form of ``K_train`` (:func:`ntk.metrics.as_matrix`). The predictions are then invariant
  to rescaling the kernel (Propulsion's degree k multiplies it by ``k^2`` at init), so methods are
  compared at the same effective regularisation. ``ridge=0`` is the minimum-norm interpolant.
- the prediction ignores the model's initial outputs (``f_0 = 0``): the classic kernel predictor.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import ntk
from experiments.dynamics.tracking import eval_mode, logits_of, model_inputs
from experiments.records import accuracy, macro_f1
from ntk import metrics
from ntk._params import ParamSelector
from ntk.predict import class_targets, kernel_regression

__all__ = ["kernel_predictor_accuracy"]


def _labels(batch: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if "labels" not in batch:
        raise ValueError(f"{name} has no 'labels': pass a batch dict with input_ids, attention_mask "
                         "and labels")
    return batch["labels"].detach().cpu().long()


def kernel_predictor_accuracy(
    model: nn.Module,
    train_batch: Mapping[str, torch.Tensor],
    test_batch: Mapping[str, torch.Tensor],
    *,
    params: ParamSelector = "trainable",
    ridge: float = 1e-3,
    output: str = "trace",
    targets: str = "centered",
    method: str = "auto",
    memory_budget: float | None = None,
) -> dict[str, Any]:
    """Accuracy and macro-F1 of kernel regression with the NTK of ``params`` at the model's values.

    ``scores = K_test,train (K_train,train + lambda I)^{-1} Y`` (:func:`ntk.predict.kernel_regression`),
    predicted class ``argmax_c scores[:, c]``, with ``K`` from :func:`ntk.empirical_ntk` in
    ``output`` layout (``K_train`` ``(N, N[, C, C])``, ``K_test,train`` ``(M, N[, C, C])`` via ``x2``).

    Args:
        model: the classifier as prepared for the method, before training.
        train_batch: ``{"input_ids", "attention_mask", "labels"}`` of N training examples
            (e.g. ``EncodedSplit.batch(indices)``); any other model inputs are passed on.
        test_batch: the same for M test examples.
        params: the method's trained parameter set (a ``ntk`` selector).
        ridge: ``>= 0``, relative to the mean diagonal of ``K_train``'s matrix form.
        output: ``"trace"`` (default; one ``(N, N)`` kernel for all classes), ``"full"``,
            ``"diagonal"`` or ``"sum_logits"``.
        targets: ``"centered"`` (default), ``"pm1"`` or ``"onehot"`` (see ``ntk.predict.class_targets``).
        method, memory_budget: passed to :func:`ntk.empirical_ntk`.

    Returns:
        ``accuracy``, ``macro_f1``, ``train_accuracy`` (the fit on the training set), ``n_train``,
        ``n_test``, ``num_classes``, ``output``, ``ridge``, ``ridge_absolute``, ``mean_diagonal``,
        ``seconds``, and ``predictions`` (an ``(M,)`` int64 tensor).

    Raises:
        ValueError: batches without labels, labels outside the model's C outputs, negative ridge.
    """
    if not (ridge >= 0 and ridge < float("inf")):
        raise ValueError(f"ridge must be a finite number >= 0 (relative to the mean diagonal), got {ridge!r}")
    start = time.perf_counter()
    y_train, y_test = _labels(train_batch, "train_batch"), _labels(test_batch, "test_batch")
    x_train, x_test = model_inputs(train_batch), model_inputs(test_batch)
    with torch.no_grad(), eval_mode(model):
        c = int(logits_of(model(**{k: v[:1] for k, v in x_train.items()})).shape[-1])
    for name, y in (("train", y_train), ("test", y_test)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= c):
            raise ValueError(f"{name} labels lie in [{int(y.min())}, {int(y.max())}] but the model has "
                             f"{c} outputs")
    kw: dict[str, Any] = {"params": params, "output": output, "method": method,
                          "memory_budget": memory_budget}
    k_train = ntk.empirical_ntk(model, x_train, **kw)
    k_test = ntk.empirical_ntk(model, x_test, x_train, **kw)
    assert isinstance(k_train, torch.Tensor) and isinstance(k_test, torch.Tensor)
    k_train, k_test = k_train.cpu(), k_test.cpu()
    mean_diag = float(metrics.as_matrix(k_train).diagonal().mean())
    lam = ridge * mean_diag
    y = class_targets(y_train, c, kind=targets)
    scores_test = kernel_regression(k_train, k_test, y, lam)
    scores_train = kernel_regression(k_train, k_train, y, lam)
    predictions = scores_test.argmax(-1)
    return {
        "accuracy": accuracy(predictions, y_test),
        "macro_f1": macro_f1(predictions, y_test, c),
        "train_accuracy": accuracy(scores_train.argmax(-1), y_train),
        "n_train": len(y_train), "n_test": len(y_test), "num_classes": c, "output": output,
        "ridge": float(ridge), "ridge_absolute": lam, "mean_diagonal": mean_diag,
        "seconds": time.perf_counter() - start, "predictions": predictions,
    }

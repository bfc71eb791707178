"""Token ids of a data set's splits, padded on the right, cached on disk.

:class:`EncodedSplit` holds one split as tensors; :meth:`EncodedSplit.batch` trims a batch to
its longest real sequence, so short sentences cost short forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["EncodedSplit", "EncodedSplits"]


@dataclass(frozen=True)
class EncodedSplit:
    """One split: ``input_ids`` and ``attention_mask`` of shape (n, T), right-padded; ``labels`` (n,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must both be (n, T)"
            )
        if self.input_ids.shape[0] != n or self.labels.ndim != 1:
            raise ValueError(f"labels {tuple(self.labels.shape)} must be ({self.input_ids.shape[0]},)")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: Sequence[int] | torch.Tensor, device: str | torch.device | None = None
              ) -> dict[str, torch.Tensor]:
        """Rows ``indices`` as ``{"input_ids", "attention_mask", "labels"}``, trimmed to the longest row."""
        index = torch.as_tensor(indices, dtype=torch.long)
        mask = self.attention_mask[index]
        length = max(int(mask.sum(dim=1).max().item()), 1) if len(index) else 1
        out = {
            "input_ids": self.input_ids[index, :length],
            "attention_mask": mask[:, :length],
            "labels": self.labels[index],
        }
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out


@dataclass(frozen=True)
class EncodedSplits:
    """Encoded train / validation / test splits of one data set with one tokenizer."""

    train: EncodedSplit
    validation: EncodedSplit
    test: EncodedSplit
    num_labels: int
    fingerprint: str  # hash of (split record, tokenizer, max_length): what the cache is keyed on

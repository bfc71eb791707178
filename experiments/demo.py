"""The demo on the embedded default: Propulsion on the offline MiniLM, Rotten Tomatoes sentences.

Wrap, print the parameter table, train z (and the head) for a few steps, save the adapter,
reload it into a fresh model, merge, and check that merged, unmerged and reloaded logits agree.

    propulsion-ntk demo                      # CPU, about a minute
    propulsion-ntk demo --steps 200 --device cuda
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.data.datasets import load_rotten_tomatoes
from experiments.data.models import load_model, load_tokenizer
from experiments.records import atomic_write
from experiments.training.methods import parameter_table, prepare
from propulsion import load_adapter, merge_and_unload, save_adapter

__all__ = ["DemoConfig", "main"]


@dataclass(frozen=True)
class DemoConfig:
    model: str = "minilm"
    degree: int = 5
    steps: int = 120
    batch_size: int = 16
    max_length: int = 64
    lr: float = 3e-3
    eval_examples: int = 256
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/demo"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("degree", "steps", "batch_size", "max_length", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def _encode(tokenizer, texts: list[str], max_length: int, device: str) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _logits(model, tokenizer, texts: list[str], cfg: DemoConfig) -> torch.Tensor:
    model.eval()
    out = [model(**_encode(tokenizer, texts[i:i + 64], cfg.max_length, cfg.device)).logits
           for i in range(0, len(texts), 64)]
    return torch.cat(out).float().cpu()


def _accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return float((logits.argmax(-1) == torch.tensor(labels)).float().mean())


def main(cfg: DemoConfig) -> dict:
    """Run the demo; returns (and writes to ``cfg.out/summary.json``) what it measured."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {cfg.device!r} requested but CUDA is not available")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_rotten_tomatoes(seed=cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, data.num_labels, device=cfg.device, seed=cfg.seed)
    model = prepare(model, "propulsion", degree=cfg.degree)
    print(f"Propulsion (degree {cfg.degree}, z on every Linear, head trained) on {cfg.model}:")
    print(f"  {'group':<8} {'trainable':>12} {'total':>12} {'%':>8}")
    for row in parameter_table(model):
        pct = 100 * row.trainable / row.total if row.total else 0.0
        print(f"  {row.group:<8} {row.trainable:>12,d} {row.total:>12,d} {pct:>8.3f}")

    val = data.validation.sample(n=min(cfg.eval_examples, len(data.validation)), random_state=cfg.seed)
    val_texts, val_labels = val["text"].tolist(), val["label"].tolist()
    acc_before = _accuracy(_logits(model, tokenizer, val_texts, cfg), val_labels)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    train = data.train
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(cfg.steps), desc="training z", disable=not cfg.progress):
        idx = torch.randint(0, len(train), (cfg.batch_size,), generator=generator).tolist()
        batch = _encode(tokenizer, train["text"].iloc[idx].tolist(), cfg.max_length, cfg.device)
        labels = torch.tensor(train["label"].iloc[idx].tolist(), device=cfg.device)
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {len(losses)}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    train_seconds = time.perf_counter() - start

    unmerged = _logits(model, tokenizer, val_texts, cfg)
    acc_after = _accuracy(unmerged, val_labels)
    z = torch.cat([p.detach().float().cpu().flatten() for n, p in model.named_parameters()
                   if n.endswith("propulsion_z")])
    save_adapter(model, out / "adapter")
    reloaded_model = load_adapter(load_model(cfg.model, data.num_labels, device=cfg.device,
                                             seed=cfg.seed + 1), out / "adapter")
    reloaded = _logits(reloaded_model, tokenizer, val_texts, cfg)
    merged = _logits(merge_and_unload(model), tokenizer, val_texts, cfg)
    summary = {
        "config": asdict(cfg),
        "loss_first": losses[0], "loss_last": losses[-1],
        "val_accuracy_before": acc_before, "val_accuracy_after": acc_after,
        "train_seconds": train_seconds,
        "z_min": float(z.min()), "z_max": float(z.max()),
        "z_pow_k_min": float(z.min() ** cfg.degree), "z_pow_k_max": float(z.max() ** cfg.degree),
        "max_abs_diff_merged_vs_unmerged": float((merged - unmerged).abs().max()),
        "max_abs_diff_reloaded_vs_unmerged": float((reloaded - unmerged).abs().max()),
        "max_abs_logit": float(unmerged.abs().max()),
    }
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {cfg.steps} steps ({train_seconds:.1f} s)")
    print(f"validation accuracy {acc_before:.3f} -> {acc_after:.3f} ({len(val_labels)} sentences)")
    print(f"z in [{summary['z_min']:.4f}, {summary['z_max']:.4f}], so z**{cfg.degree} in "
          f"[{summary['z_pow_k_min']:.4f}, {summary['z_pow_k_max']:.4f}]")
    print(f"merged vs unmerged logits: max |diff| = {summary['max_abs_diff_merged_vs_unmerged']:.2e} "
          f"(logits up to {summary['max_abs_logit']:.2f})")
    print(f"adapter saved to {out / 'adapter'} and reloaded into a fresh model: max |diff| = "
          f"{summary['max_abs_diff_reloaded_vs_unmerged']:.2e}")
    return summary

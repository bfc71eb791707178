"""e6's verdict: the accuracy gate decides (and says so) when fine-tuning did not learn."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments.suite import e6_kernel_prediction as e6


def _raw(finetuned: list[float], kernel: list[float]) -> pd.DataFrame:
    rows = [
        {"method_name": m, "run_seed": s, "peak_lr": 0.1, "kernel_accuracy": k, "finetuned_accuracy": f,
         "gap": abs(k - f)}
        for m in ("full", "propulsion")
        for s, (f, k) in enumerate(zip(finetuned, kernel, strict=True))
    ]
    return pd.DataFrame(rows)


class _Tuned:
    """A store holding only the tuning choice: Propulsion's rate at the top of its grid."""

    def load_table(self, unit: str) -> pd.DataFrame:
        assert unit == "tuning/choice"
        return pd.DataFrame({"key": ["full", "full", "propulsion", "propulsion"],
                             "lr": [0.01, 0.03, 0.03, 0.1], "best_val_accuracy": [0.77, 0.75, 0.68, 0.71],
                             "status": "finished", "chosen": [True, False, False, True]})


@pytest.mark.parametrize(
    ("finetuned", "kernel", "verdict", "decided"),
    [
        # one draw at 0.62, two that never left chance: the gate, not the number of draws
        ([0.625, 0.516, 0.477], [0.555, 0.520, 0.551], "inconclusive", "the gate: Propulsion"),
        # fine-tuning learned and agrees with the kernel to 0.01: the gap's interval decides
        ([0.80, 0.81, 0.79], [0.80, 0.80, 0.80], "supported", "upper bound"),
    ],
)
def test_gate_is_named_when_fine_tuning_did_not_learn(monkeypatch, finetuned, kernel, verdict, decided):
    monkeypatch.setattr(e6, "comparison", lambda store, config: _raw(finetuned, kernel))
    (v,) = e6.verdicts(_Tuned(), e6.Config())
    assert v.verdict == verdict
    assert v.decided_by.startswith(decided), v.decided_by
    assert "propulsion: 0.03 (0.680), [0.1 (0.710)] (chosen at the upper edge" in v.measurement

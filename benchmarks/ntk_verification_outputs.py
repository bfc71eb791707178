"""Share of the structured engine's self-check in a kernel with C = 10 outputs (MLP).

The MLP of ``ntk_vs_neural_tangents.py`` (64-512-512-512-10, ReLU, float32, N = 256, all
parameters), float32 kernels, 1 thread. Per round: the kernel without the check, then with it
(``Timings.verify_cpu_seconds`` is the check's share); with ``--old FILE`` (an earlier
``ntk/_verify.py``, e.g. ``git show REV:ntk/_verify.py > old.py``) also that version's check
on the same kernel, timed in the same round. Medians of the rounds, process CPU seconds.

    python benchmarks/ntk_verification_outputs.py --old /tmp/old_verify.py
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import time
from typing import Any

MLP_WIDTHS = (64, 512, 512, 512, 10)


def _old_check(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("old_verify", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.verify


def main(n: int, rounds: int, old: str | None) -> dict:
    import torch
    from torch import nn

    from ntk._problem import default_output_fn
    from ntk._structured import structured_kernels

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(MLP_WIDTHS):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).eval()
    x = torch.randn(n, MLP_WIDTHS[0])
    old_verify = _old_check(old) if old else None
    out: dict[str, Any] = {"n": n, "rounds": rounds, "c": MLP_WIDTHS[-1]}
    for output in ("trace", "full"):
        runs: dict[str, list[float]] = {"kernel": [], "verified": [], "check": [], "old_check": []}
        for _ in range(rounds):
            cpu = time.process_time()
            result, _ = structured_kernels(model, x, None, {"k": "all"}, output=output,
                                           dtype=torch.float32, verify=False)
            runs["kernel"].append(time.process_time() - cpu)
            if old_verify is not None:
                sets = {"k": [k for k, _ in model.named_parameters()]}
                cpu = time.process_time()
                old_verify(model, x, None, n, n, sets, {"k": {"total": result["k"]}}, output,
                           False, default_output_fn, False)
                runs["old_check"].append(time.process_time() - cpu)
            cpu = time.process_time()
            _, timings = structured_kernels(model, x, None, {"k": "all"}, output=output,
                                            dtype=torch.float32)
            runs["verified"].append(time.process_time() - cpu)
            runs["check"].append(timings.verify_cpu_seconds)
        med = {k: statistics.median(v) for k, v in runs.items() if v}
        row = {"runs": runs, "median": med,
               "check_share": med["check"] / med["verified"]}
        if "old_check" in med:
            row["old_check_share"] = med["old_check"] / (med["kernel"] + med["old_check"])
        out[output] = row
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--old", help="an earlier ntk/_verify.py to time in the same rounds")
    args = parser.parse_args()
    print(json.dumps(main(args.n, args.rounds, args.old), indent=1))

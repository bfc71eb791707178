"""Cost of the structured engine's self-check (ntk._verify): MiniLM, all parameters, trace.

The same kernel is computed with and without the check, alternately (which goes first
alternates too), in one process (1 thread, float32 features as in the other benchmarks, a
fixed memory budget); the ratio of the best process CPU seconds of each is reported.

    python benchmarks/ntk_verification.py            # N=64, 4 rounds
    python benchmarks/ntk_verification.py --n 256    # the issue's size, on a quiet machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 8 * 2**30  # fixed, so both runs take the same tiles (the default reads free memory)


def main(n: int, rounds: int) -> dict:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ntk_structured import _minilm

    from ntk._structured import structured_kernels

    torch.set_num_threads(1)
    model, x = _minilm(n)
    warm = {k: v[:2] for k, v in x.items()}
    structured_kernels(model, warm, None, {"k": "all"}, output="trace", dtype=torch.float32)
    runs: dict[str, list[dict]] = {"verified": [], "unverified": []}
    kernels = {}
    order = (("verified", True), ("unverified", False))
    for i in range(rounds):  # alternate which goes first (allocator and cache state)
        for name, verify in (order if i % 2 == 0 else order[::-1]):
            wall, cpu = time.perf_counter(), time.process_time()
            result, timings = structured_kernels(model, x, None, {"k": "all"}, output="trace",
                                                 dtype=torch.float32, verify=verify,
                                                 memory_budget=BUDGET)
            runs[name].append({"seconds": time.perf_counter() - wall,
                               "cpu_seconds": time.process_time() - cpu,
                               "verify_cpu_seconds": timings.verify_cpu_seconds})
            kernels[name] = result["k"]
    cpu = {k: min(r["cpu_seconds"] for r in v) for k, v in runs.items()}
    verify_cpu = min(r["verify_cpu_seconds"] for r in runs["verified"])
    return {
        "n": n, "rounds": rounds, "runs": runs,
        "cpu_ratio": cpu["verified"] / cpu["unverified"],
        "verify_share": verify_cpu / cpu["verified"],
        "same_kernel": bool(torch.equal(kernels["verified"], kernels["unverified"])),
        "verify_cpu_seconds": verify_cpu,
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(main(args.n, args.rounds), indent=1))

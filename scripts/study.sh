#!/usr/bin/env bash
# The study: every experiment with the `study` preset (seeds, intervals, N = 256 kernels, tuned
# learning rates), sized for 2 CPU cores (3-4 hours; resumable: run it again after an
# interruption and finished units are reused), then the figures, the claims report and the
# README's claims table. Run it from a clean commit so the report's provenance names it.
#   bash scripts/study.sh                   results in results/study (committed, see below)
#   OUT=/data/study bash scripts/study.sh   another results folder
# results/study is part of the repository, without what can be recomputed (kernels, training
# checkpoints, logs, locks: see .gitignore), so a study longer than one working session goes on
# in the next: commit results/study, and run this script again on a fresh checkout. Every unit
# records the commit that computed it, and the report lists them.
# Two single-threaded streams share the 2 cores: the kernel experiments (e1, e2, e7, e8) and the
# training experiments (e9, e3, e4, e6, e5; e5 last, since it measures step time and memory).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$root/scripts/setup.sh"
cd "$root"
out="${OUT:-results/study}"
mkdir -p "$out/logs"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
stream() {
  local log="$1"; shift
  for name in "$@"; do
    echo "[study] $(date -u +%T) $name" >> "$out/logs/$log"
    propulsion-ntk run "$name" --preset study --out "$out" >> "$out/logs/$log" 2>&1
  done
}
stream kernels.log e1 e2 e7 e8 &
kernels=$!
stream training.log e9 e3 e4 e6 e5 &
training=$!
trap 'kill "$kernels" "$training" 2>/dev/null' INT TERM
wait "$kernels"; wait "$training"
propulsion-ntk figures --results "$out" --out figures
propulsion-ntk report --results "$out" --out figures --figures figures --readme README.md
echo "[study] results in $out/; figures, claims.md/html and the README table updated"

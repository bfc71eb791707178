#!/usr/bin/env bash
# The main job: sets up the environment, then runs every experiment of the suite on the embedded
# offline default (MiniLM; Rotten Tomatoes), draws the figures and writes the claims report.
#   bash scripts/main.sh                      quick preset, CPU (about 15 min on 2 cores)
#   bash scripts/main.sh --preset full --device cuda    the full study on one GPU
#   OUT=runs/other bash scripts/main.sh       another results folder (default runs/suite)
# Resumable: run it again after an interruption and finished units are reused.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$root/scripts/setup.sh"
cd "$root"
out="${OUT:-runs/suite}"
propulsion-ntk run all --preset quick --out "$out" "$@"
propulsion-ntk figures --results "$out" --out figures
propulsion-ntk report --results "$out" --out figures --figures figures --readme README.md
echo "[main] results in $out/; figures and the claims report (claims.md, claims.html) in figures/"

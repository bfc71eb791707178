#!/usr/bin/env bash
# The test command: sets up the environment, then lint, type check, the strict docs build and
# the test suite (which opens the built docs in headless Chromium where it is installed).
#   bash scripts/test.sh            default suite (what CI runs)
#   bash scripts/test.sh --slow     also the slow tests
#   bash scripts/test.sh ARGS...    extra arguments go to pytest (e.g. -k merge)
# pytest covers tests/, the notebooks (nbmake) and the doctests of the three packages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$root/scripts/setup.sh"
cd "$root"
marker=(-m "not slow")
if [ "${1:-}" = "--slow" ]; then marker=(); shift; fi
echo "[test] ruff"; ruff check .
echo "[test] mypy propulsion ntk"; mypy propulsion ntk
echo "[test] docs (strict build)"
site="$(mktemp -d)/site"
PROPULSION_NTK_SETUP_DONE=1 bash "$root/scripts/docs.sh" build "$site"
export PROPULSION_NTK_DOCS_SITE="$site"   # tests/test_docs.py checks this build
echo "[test] pytest"
python -m pytest --nbmake --doctest-modules "${marker[@]}" tests notebooks propulsion ntk experiments "$@"

#!/usr/bin/env bash
# The documentation site (mkdocs.yml, pages in docs/): sets up the environment, then builds it
# strictly (every warning, broken link or missing API object fails) and serves it.
#   bash scripts/docs.sh                 build into site/ and serve on http://127.0.0.1:8000
#   bash scripts/docs.sh build [DIR]     build only (into DIR, default site/); what scripts/test.sh runs
#   bash scripts/docs.sh serve [ADDR]    live-reloading server (default 127.0.0.1:8000)
# Offline: no fonts, scripts or images are fetched; MathJax comes from the docs extra.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PROPULSION_NTK_SETUP_DONE:-}" ]; then
  # shellcheck source=scripts/setup.sh
  source "$root/scripts/setup.sh"
fi
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export NO_MKDOCS_2_WARNING=1   # Material's banner about MkDocs 2.0; not a warning about these docs
cmd="${1:-build-and-serve}"
case "$cmd" in
  build)
    out="${2:-$root/site}"
    start=$(date +%s)
    python -m mkdocs build --strict --clean --site-dir "$out"
    echo "[docs] built $out in $(( $(date +%s) - start )) s"
    ;;
  serve)
    python -m mkdocs serve --strict --dev-addr "${2:-127.0.0.1:8000}"
    ;;
  build-and-serve)
    python -m mkdocs build --strict --clean --site-dir "$root/site"
    echo "[docs] serving $root/site on http://127.0.0.1:8000 (Ctrl-C stops)"
    python -m http.server 8000 --bind 127.0.0.1 --directory "$root/site"
    ;;
  *)
    echo "usage: bash scripts/docs.sh [build [DIR] | serve [ADDR]]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The end-to-end demo: sets up the environment, then wraps, trains, saves, reloads and merges MiniLM.
#   bash scripts/demo.sh [ARGS...]   extra arguments go to `propulsion-ntk demo`
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$root/scripts/setup.sh"
cd "$root"
propulsion-ntk demo "$@"

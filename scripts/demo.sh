#!/usr/bin/env bash
# The main job: sets up the environment, then runs it on the embedded offline default.
#   bash scripts/demo.sh [ARGS...]   extra arguments go to `propulsion-ntk demo`
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$root/scripts/setup.sh"
cd "$root"
propulsion-ntk demo "$@"

#!/usr/bin/env bash
# The test suite: set up the environment (with test requirements) if needed, then run pytest.
# Extra arguments go to pytest (e.g. -m "not slow", -k adapters).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh" --dev
cd "$root"
exec "${CXR_DOLL_VENV:-$root/.venv}/bin/python" -m pytest "$@"

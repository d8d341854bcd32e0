#!/usr/bin/env bash
# The main job: set up the environment if needed, then run the whole pipeline on the synthetic phantom (CPU).
# Extra arguments go to scripts/run_pipeline.py (e.g. --quick, --stages data,classifier, --device cuda).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
exec "${CXR_DOLL_VENV:-$root/.venv}/bin/python" "$root/scripts/run_pipeline.py" "$@"

#!/usr/bin/env bash
# Create or update the bundle's virtual environment (.venv) idempotently.
#   bash scripts/setup_env.sh          runtime requirements
#   bash scripts/setup_env.sh --dev    runtime + test requirements
# A stamp file holds the hash of the requirement files: when nothing changed, this returns in well under a second.
# Python: $PYTHON, else python3.11, else python3 (3.11 or newer is required).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
req="requirements.txt"
[ "${1:-}" = "--dev" ] && req="requirements-dev.txt"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
fi
venv="${CXR_DOLL_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $($py --version 2>&1)"
  "$py" -m venv "$venv"
fi
hash=$(cat requirements.txt "$req" | sha256sum | cut -c1-16)
stamp="$venv/.cxr_doll_installed_$hash"
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  echo "[setup] installing $req into $venv (first run takes a few minutes)"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req" 2> >(grep -v "^WARNING: Location" >&2)
  # make `import bundle` work from any working directory
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$root" > "$site/cxr_doll_bundle.pth"
  touch "$stamp"
  echo "[setup] installed in $(( $(date +%s) - start )) s"
fi

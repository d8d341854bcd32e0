#!/usr/bin/env bash
# Check that this bundle works as a MONAI Label bundle model (MONAI Label 0.8.5), in a SEPARATE virtual environment.
#   bash scripts/check_monailabel.sh                 # infer + train checks (see scripts/check_monailabel.py --help)
#   bash scripts/check_monailabel.sh --skip-train    # arguments go to scripts/check_monailabel.py
# monailabel 0.8.5 pins numpy<2 (through pydicom-seg and numpymaxflow) and pulls many packages (ITK, OpenSlide,
# MLflow, TensorBoard, FastAPI, SAM2, ...): it is never installed into the bundle's .venv. The venv lives outside the
# repository: $MONAILABEL_VENV, default /tmp/monailabel-venv. It is created once (a stamp file holds the hash of the
# pins below); later runs go straight to the check.
# Pins: the CPU torch 2.13.0 wheel (pip's find-links /opt/wheels here; on another machine it comes from
#   https://download.pytorch.org/whl/cpu, set PIP_EXTRA_INDEX_URL to it), torchvision 0.28.0 (the release paired with
#   torch 2.13; monailabel imports torchvision.utils), monai 1.6.1 (the bundle's version), numpy<2, pydicom<3.
# sam2 (a monailabel dependency, only used by MONAI Label's optional SAM2 tasks) is published as a source archive
#   whose build needs torch: it is built first against the pinned CPU torch, without build isolation and without its
#   CUDA extension (SAM2_BUILD_CUDA=0), so pip never downloads a CUDA torch just to build it.
# Python: $PYTHON, else python3.11.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MONAILABEL_VENV:-/tmp/monailabel-venv}"
py="${PYTHON:-python3.11}"
case "$venv" in
  "$root"|"$root"/*) echo "[monailabel] MONAILABEL_VENV must lie outside the repository ($root)" >&2; exit 2 ;;
esac

# PyPI's torchvision 0.28.0 is built against PyPI's CUDA torch: beside the CPU torch its C extension does not load,
# and scripts/check_monailabel.py then declares the two operators torchvision needs to import (monailabel only uses
# torchvision.utils). With the PyTorch CPU index reachable, use the matching CPU build instead:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu MONAILABEL_TORCHVISION=torchvision==0.28.0+cpu bash ...
torchvision_pin="${MONAILABEL_TORCHVISION:-torchvision==0.28.0}"
pins=(
  "monailabel==0.8.5"
  "torch==2.13.0+cpu"
  "$torchvision_pin"
  "monai==1.6.1"
  "numpy<2"
  # the bundle's own imports (bundle/*): not all are monailabel dependencies
  "pandas"
  "matplotlib"
  # monailabel's DICOM code (pydicom-seg 0.4.1) imports pydicom._storage_sopclass_uids, gone in pydicom 3
  "pydicom<3"
  "nibabel"
  "scipy"
  "captum==0.9.0"
)
sam2_pin="sam2==1.1.0"
hash=$(printf '%s\n' "${pins[@]}" "$sam2_pin" | sha256sum | cut -c1-16)
stamp="$venv/.cxr_doll_monailabel_$hash"

if [ ! -x "$venv/bin/python" ]; then
  echo "[monailabel] creating $venv with $("$py" --version 2>&1)"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
quiet() { "$@" 2> >(grep -v -e "is ignored: it is neither a file nor a directory" -e "^WARNING: Location" >&2); }
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  echo "[monailabel] installing ${pins[0]} into $venv (first run: several minutes)"
  quiet "${pip[@]}" install -q --upgrade pip "setuptools>=70.1" wheel
  # 1. torch first (CPU wheel), so that sam2 can be built against it
  quiet "${pip[@]}" install -q "torch==2.13.0+cpu" "$torchvision_pin" "numpy<2"
  # 2. sam2 from its source archive, against that torch (no build isolation, no CUDA extension)
  quiet env SAM2_BUILD_CUDA=0 "${pip[@]}" install -q --no-build-isolation "$sam2_pin" "torch==2.13.0+cpu" "numpy<2"
  # 3. monailabel and the rest, with the same pins
  quiet "${pip[@]}" install -q "${pins[@]}" "$sam2_pin"
  rm -f "$venv"/.cxr_doll_monailabel_*
  touch "$stamp"
  echo "[monailabel] installed in $(( $(date +%s) - start )) s"
fi
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
print("[monailabel] versions: " + ", ".join(f"{p} {md.version(p)}" for p in
      ("monailabel", "monai", "torch", "torchvision", "numpy", "itk", "pydicom", "sam2")))
EOF
# the bundle is imported from the temporary app copy only (MONAI Label puts the bundle folder on sys.path)
cd "$root"
exec env -u PYTHONPATH "$venv/bin/python" "$root/scripts/check_monailabel.py" "$@"

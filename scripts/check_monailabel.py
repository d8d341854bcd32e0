#!/usr/bin/env python3
"""Check this bundle as a MONAI Label bundle model (run by scripts/check_monailabel.sh, in its own venv).

The bundle (configs/, bundle/, models/, docs/, LICENSE) is copied into a temporary copy of MONAI Label's own,
unmodified ``monaibundle`` sample app under ``model/cxr_doll_segmentation``, with a local datastore (``studies/``) of
real radiographs and bit-mask labels. Nothing is written into the repository. Every check is required:

- ``bundle_run``: the bundle's own ``monai.bundle run`` of configs/inference.yaml in this venv (reference masks).
- ``stock_app``: the stock app lists the model and its trainer, labels {lungs: 1, heart: 2, clavicles: 4} (from
  metadata.json's ``outputs.pred.channel_def``), dimension 2.
- ``stock_infer``: MONAI Label's stock ``BundleInferTask`` (``app.infer``) writes one bit-mask label per image, in the
  input's geometry (square and non-square inputs), equal to the bundle's own mask, and nothing into the model folder.
- ``stock_train``: MONAI Label's stock ``BundleTrainTask`` (``app.train``, configs/train.yaml alone, the datastore's
  labels) trains one epoch and saves the run's checkpoints.

If the repository has no models/model.pt, a random-weights one is written in the temporary copy only (the report
says so).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
NAME = "cxr_doll_segmentation"
COPIED = ("configs", "bundle", "models", "docs", "LICENSE")
LABELS = {"lungs": 1, "heart": 2, "clavicles": 4}

RESULTS: list[dict[str, Any]] = []
TRACEBACKS: list[str] = []

# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------
def record(check: str, ok: bool | None, detail: str, required: bool = False) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    RESULTS.append({"check": check, "status": status, "required": required, "detail": detail})
    print(f"[{status}]{' (required)' if required else ''} {check}: {detail}", flush=True)


def guarded(check: str, required: bool = False) -> Callable:
    """Run a check; an exception is a FAIL with its message (tracebacks go to <work>/tracebacks.txt, since
    monai.bundle.run reconfigures logging)."""
    def deco(fn: Callable) -> Callable:
        def run(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - every failure is a result here
                TRACEBACKS.append(f"==== {check}\n{traceback.format_exc()}")
                record(check, False, f"{type(e).__name__}: {_short(str(e))}", required)
                return None
        return run
    return deco


def _short(text: str, n: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------------
_TV_LIB = None


def torchvision_shim() -> str:
    """Make ``import torchvision`` work when its C extension cannot load (monailabel imports torchvision.utils only).

    PyPI's Linux torchvision wheels are built against PyPI's CUDA torch; beside a CPU torch (torch 2.13.0+cpu from
    /opt/wheels here) their ``_C`` extension does not load and torchvision 0.28 then fails on import ("operator
    torchvision::nms does not exist"). With the matching CPU wheel (torchvision==0.28.0+cpu from the PyTorch CPU
    index) or with CUDA torch nothing is done. The shim declares the two operators torchvision registers fake
    kernels for, so that its pure-Python parts import; its C operators stay unavailable (unused here)."""
    global _TV_LIB
    try:
        import torchvision  # noqa: F401
        return "not needed"
    except RuntimeError as e:
        if "does not exist" not in str(e):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _TV_LIB = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _TV_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811

    return f"used (torchvision {torchvision.__version__} without its C extension, beside torch {torch.__version__})"


# ----------------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------------
def copy_bundle(dst: Path, model: Path | None = None) -> list[str]:
    """Copy the bundle to ``dst``; models/model.pt from ``model``, the repository, or random weights."""
    notes = []
    dst.mkdir(parents=True)
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst / name)
        else:
            notes.append(f"{name} missing in the repository")
    (dst / "models").mkdir(exist_ok=True)
    target = dst / "models" / "model.pt"
    if model is not None:
        shutil.copyfile(model, target)
    elif not target.exists():
        notes.append("no models/model.pt in the repository: random weights written in the temporary copies only")
        code = ("import torch, bundle.networks.segmentation as s; torch.manual_seed(0); torch.save("
                f"s.build_segmenter('segresnet', in_channels=1, out_channels=3).state_dict(), {str(target)!r})")
        subprocess.run([sys.executable, "-c", code], cwd=dst, check=True)
    return notes


def make_app(sample: Path, app_dir: Path, model: Path | None = None) -> list[str]:
    """A copy of the unmodified monaibundle sample app with the bundle as model/<NAME>."""
    shutil.copytree(sample, app_dir)
    return copy_bundle(app_dir / "model" / NAME, model)


def load_app(app_dir: Path, studies: Path) -> Any:
    """Instantiate the app of ``app_dir/main.py`` as MONAI Label's server would (app folder first on sys.path)."""
    # like a fresh server: MONAI Label unloads only a bundle's `scripts` package, this bundle's package is `bundle`
    for m in [m for m in sys.modules if m.split(".")[0] in ("lib", "bundle")]:
        del sys.modules[m]
    sys.path.insert(0, str(app_dir))
    spec = importlib.util.spec_from_file_location(f"main_{app_dir.parent.name}", app_dir / "main.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    conf = {"models": NAME, "preload": "false", "sam2": "false", "zoo_source": "ngc"}
    return mod.MyApp(str(app_dir), str(studies), conf)


def make_studies(studies: Path, images_dir: Path, masks_dir: Path | None, n: int) -> tuple[list[Path], Path]:
    """Datastore: ``n`` radiographs with bit-mask labels in labels/final (lungs bit from the lung masks; heart and
    clavicles not annotated), and, outside it, one non-square crop (H 256 x W 200) to catch row/column mix-ups."""
    import numpy as np
    from PIL import Image

    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() == ".png")[:n]
    if not images:
        raise FileNotFoundError(f"{images_dir}: no PNG radiograph")
    out = []
    for p in images:
        shutil.copy2(p, studies / p.name)
        out.append(studies / p.name)
        m = masks_dir / p.name if masks_dir else None
        if m is not None and m.exists():
            lungs = (np.asarray(Image.open(m).convert("L")) > 0).astype(np.uint8)
            Image.fromarray(lungs * LABELS["lungs"]).save(final / p.name)
    img = np.asarray(Image.open(images[0]).convert("L"))
    crop = img[:, 28:228] if img.shape[1] >= 228 else img[:, : max(8, img.shape[1] * 3 // 4)]
    ns = studies.parent / "nonsquare" / f"crop_{images[0].name}"
    ns.parent.mkdir(parents=True)
    Image.fromarray(np.ascontiguousarray(crop)).save(ns)
    return out, ns


def bundle_run(bundle: Path, image_dir: Path, out_dir: Path) -> None:
    """The bundle's own inference (``python -m monai.bundle run``) from the bundle folder."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.yaml"),
           "--meta_file", str(bundle / "configs" / "metadata.json"), "--dataset_dir", str(image_dir),
           "--output_dir", str(out_dir), "--device", "$torch.device('cpu')"]
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"monai.bundle run failed ({proc.returncode}): {proc.stderr[-1500:]}")


def read_png(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path))


def _bundle_files(bundle: Path) -> set[tuple[Path, int]]:
    """Files under the bundle's eval/ with their modification times (a rewritten file counts as written)."""
    root = bundle / "eval"
    return {(p, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _written(bundle: Path, before: set[tuple[Path, int]]) -> list[str]:
    return sorted({str(p.relative_to(bundle)) for p, _ in _bundle_files(bundle) - before})


# ----------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------
def check_bundle_run(bundle: Path, inputs: Path, out: Path, name: str, ref: Path | None = None) -> None:
    import numpy as np

    bundle_run(bundle, inputs, out)
    shapes = {p.name: read_png(p).shape for p in sorted(out.glob("*_seg.png"))}
    ok = bool(shapes) and all(shapes.get(f"{p.stem}_seg.png") == read_png(p).shape[:2] for p in inputs.iterdir())
    detail = f"python -m monai.bundle run (configs/inference.yaml) in this venv: masks {shapes} (input geometry: {ok})"
    if ref is not None:
        same = {p.name: bool(np.array_equal(read_png(p), read_png(out / p.name))) for p in sorted(ref.glob("*_seg.png"))}
        ok = ok and all(same.values())
        detail += f"; identical to the current inference.yaml's masks: {same}"
    record(name, ok, detail, required=True)


def check_stock_app(app: Any) -> bool:
    info = app.info()
    model = info["models"].get(NAME, {})
    task = app._infers.get(NAME)
    ok = (NAME in info["trainers"] and type(task).__name__ == "BundleInferTask" and model.get("labels") == LABELS
          and model.get("dimension") == 2)
    record("stock_app", ok, f"models {list(info['models'])} ({type(task).__name__}), trainers "
           f"{list(info['trainers'])} ({type(app._trainers.get(NAME)).__name__}), labels {model.get('labels')}, "
           f"dimension {model.get('dimension')}, datastore {info['datastore'].get('total')} images / "
           f"{info['datastore'].get('completed')} labelled", required=True)
    return ok


def check_stock_infer(app: Any, bundle: Path, sources: list[Path], ref_dir: Path) -> None:
    msgs, ok = [], True
    before = _bundle_files(bundle)
    names = None
    for src in sources:
        # datastore images by id; the non-square crop (outside the datastore) by path
        image = src.stem if src.parent.name == "studies" else str(src)
        res = app.infer({"model": NAME, "image": image, "device": "cpu"})
        out = read_png(Path(res["file"]))
        shape = read_png(src).shape[:2]
        mask = read_png(ref_dir / f"{src.stem}_seg.png")
        agree = float((out == mask).mean()) if out.shape == mask.shape else 0.0
        names = res["params"].get("label_names")
        ok &= out.shape == shape and agree == 1.0 and names == LABELS
        msgs.append(f"{src.name} {shape} -> {Path(res['file']).suffix} {out.shape} {out.dtype}, values "
                    f"{sorted(set(out.ravel().tolist()))}, equal to the bundle's own mask: {agree:.4f}")
    new = _written(bundle, before)
    ok &= not new
    msgs.append(f"label_names {names}; written into the model folder: {new or 'nothing'}")
    record("stock_infer", ok, "; ".join(msgs), required=True)


def check_stock_train(app: Any, bundle: Path, epochs: int) -> None:
    req = {"model": NAME, "max_epochs": epochs, "device": "cpu", "val_split": 0.5, "multi_gpu": False,
           "tracking": "None", "pretrained": True}
    t0 = time.time()
    app.train(req)
    dt = time.time() - t0
    runs = sorted((bundle / "models" / "segmentation").glob("*/last.pt"))
    import torch

    states = [torch.load(p, map_location="cpu", weights_only=False)["trainer"] for p in runs]
    epochs_done = [int(s["iteration"]) // max(1, int(s["epoch_length"])) for s in states]
    ok = bool(runs) and all(e == epochs for e in epochs_done) and all((p.parent / "model.pt").is_file() for p in runs)
    record("stock_train", ok, f"app.train {req} ({len(app.datastore().datalist())} labelled images) took {dt:.0f} s; "
           f"checkpoints {[str(p.relative_to(bundle)) for p in runs]} at epochs {epochs_done} (asked {epochs}), "
           "model.pt beside each", required=True)


# ----------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = ROOT.parent / "shared" / "data" / "real-cxr-lungs"
    ap.add_argument("--images", type=Path, default=data / "images", help="folder of PNG radiographs")
    ap.add_argument("--masks", type=Path, default=data / "masks", help="their lung masks (same names)")
    ap.add_argument("--n", type=int, default=4, help="radiographs in the datastore (default 4)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (removed after a passing run)")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxr_doll_monailabel_"))
    work.mkdir(parents=True, exist_ok=True)
    # before monailabel is imported: local bundles only (no model-zoo look-up), sessions in the work folder
    os.environ.setdefault("BUNDLE_DOWNLOAD_SRC", "ngc")
    os.environ["MONAI_LABEL_SESSION_PATH"] = str(work / "sessions")
    os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    logging.basicConfig(level=logging.INFO, filename=str(work / "check.log"), filemode="w",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    shim = torchvision_shim()
    import monai
    import monailabel
    import numpy as np
    import torch

    t_start = time.time()
    versions = {"monailabel": monailabel.__version__, "monai": monai.__version__, "torch": torch.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0], "torchvision_shim": shim}
    print(f"work folder: {work}\nversions: {versions}", flush=True)

    sample = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
    if not sample.is_dir():
        raise SystemExit(f"{sample}: monailabel's monaibundle sample app not found")
    app_dir = work / "stock" / "monaibundle"
    notes = make_app(sample, app_dir)
    bundle = app_dir / "model" / NAME
    for note in notes:
        print(f"note: {note}", flush=True)

    studies = work / "studies"
    images, nonsquare = make_studies(studies, args.images, args.masks if args.masks.is_dir() else None, args.n)
    inputs = work / "inputs"
    inputs.mkdir()
    for p in [*images[:2], nonsquare]:
        shutil.copy2(p, inputs / p.name)

    # 1. the bundle's own inference in this venv: the reference masks
    ref_dir = work / "masks_bundle"
    guarded("bundle_run", required=True)(check_bundle_run)(bundle, inputs, ref_dir, "bundle_run")
    # 2. the stock monaibundle app, unmodified
    app = guarded("stock_app", required=True)(load_app)(app_dir, studies)
    if app is not None and guarded("stock_app", required=True)(check_stock_app)(app):
        guarded("stock_infer", required=True)(check_stock_infer)(app, bundle, [*images[:2], nonsquare], ref_dir)
        # 3. training through the stock trainer
        if args.skip_train:
            record("stock_train", None, "--skip-train", required=True)
        else:
            guarded("stock_train", required=True)(check_stock_train)(app, bundle, args.epochs)

    failed = [r["check"] for r in RESULTS if r["required"] and r["status"] == "FAIL"]
    report = {"versions": versions, "notes": notes, "seconds": round(time.time() - t_start), "results": RESULTS}
    (work / "report.json").write_text(json.dumps(report, indent=2))
    (work / "tracebacks.txt").write_text("\n".join(TRACEBACKS))
    print("\n==== summary ====")
    for r in RESULTS:
        print(f"{r['status']:4} {'required' if r['required'] else 'info    '} {r['check']}")
    print(f"checks took {report['seconds']} s; report: {work / 'report.json'}")
    if not failed and not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
        print("(work folder removed; --keep keeps it)")
    print("RESULT:", "OK (every required check passed)" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Check this bundle as a MONAI Label bundle model (run by scripts/check_monailabel.sh, in its own venv).

The bundle (configs/, bundle/, models/, docs/, LICENSE) is copied into a temporary MONAI Label app: a copy of MONAI
Label's own ``monaibundle`` sample app with the bundle under ``model/cxr_doll_segmentation``, and a local datastore
(``studies/``) of real radiographs with bit-mask labels. Nothing is written into the repository. Checks:

stock (what MONAI Label's ``monaibundle`` app does with the bundle as it is; informational):
  - ``bundle_run``: the bundle's own ``monai.bundle run`` of configs/inference.yaml in this venv (monai, numpy<2).
  - ``stock_infer_*``: MONAI Label's ``BundleInferTask`` (what it reads from the configs and metadata, the label
    file it writes, files the bundle's writer leaves in the model folder).
  - ``stock_app``: the ``monaibundle`` sample app: the bundle is found and listed as a model and a trainer.
  - ``stock_train``: MONAI Label's ``BundleTrainTask`` for 1 epoch on the datastore.
recommended integration (must pass; the exit status says whether they did):
  - ``recommended_infer``: :class:`CXRDollInferTask` (a 15-line ``BundleInferTask`` subclass, see
    docs/MONAI_LABEL.md) on the bundle with the recommended configs/inference.yaml (writer split from
    ``postprocessing``): one bit-mask label per image, in the input's geometry (square and non-square inputs), equal
    to the bundle's own output, label names {lungs: 1, heart: 2, clavicles: 4}, nothing written in the bundle.
  - ``recommended_run_unchanged``: ``monai.bundle run`` with the recommended inference.yaml writes the same masks.
  - ``recommended_train``: :class:`CXRDollTrainTask` (a ``BundleTrainTask`` subclass reading
    configs/common.yaml + configs/train.yaml, labels as bit-mask PNGs) trains 1 epoch from the datastore and
    publishes models/model.pt, which the infer task then uses.

If the repository has no models/model.pt, a random-weights one is written in the temporary copy only (said in the
report). Usage: ``python scripts/check_monailabel.py [--workdir DIR] [--keep] [--skip-train] [--images DIR]``.
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
STRUCTURES = ("lungs", "heart", "clavicles")
COPIED = ("configs", "bundle", "models", "docs", "LICENSE")

logger = logging.getLogger("check_monailabel")
RESULTS: list[dict[str, Any]] = []


def record(check: str, ok: bool | None, detail: str, required: bool = False) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    RESULTS.append({"check": check, "status": status, "required": required, "detail": detail})
    print(f"[{status}]{' (required)' if required else ''} {check}: {detail}", flush=True)


def guarded(check: str, required: bool = False) -> Callable:
    """Run a check function; an exception is recorded as a FAIL with its last line (traceback in the log)."""
    def deco(fn: Callable) -> Callable:
        def run(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - every failure is a result here
                logger.error("%s failed:\n%s", check, traceback.format_exc())
                record(check, False, f"{type(e).__name__}: {_short(str(e))}", required)
                return None
        return run
    return deco


def _short(text: str, n: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------
# the recommended MONAI Label integration (the same code is in docs/MONAI_LABEL.md)
# ----------------------------------------------------------------------------------------------------------------
def integration_classes():
    """Build the two task classes (imported lazily: monailabel is only in this venv)."""
    import numpy as np
    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import MapTransform, SaveImaged

    from monailabel.tasks.infer.bundle import BundleInferTask
    from monailabel.tasks.train.bundle import BundleTrainTask

    class BitmaskLabeld(MapTransform):
        """Binary multi-label masks ``(C, H, W)`` -> one uint8 bit-mask label (channel ``k`` -> bit ``k``), given in
        MONAI's ``(x, y)`` array order: MONAI Label's writer transposes arrays back to the image's rows and columns."""

        def __call__(self, data):
            d = dict(data)
            for key in self.key_iterator(d):
                masks = torch.as_tensor(d[key]).detach().cpu().numpy() > 0.5
                label = np.zeros(masks.shape[1:], dtype=np.uint8)
                for k in range(masks.shape[0]):
                    label |= masks[k].astype(np.uint8) << k
                d[key] = np.ascontiguousarray(label.T)
            return d

    class CXRDollInferTask(BundleInferTask):
        """cxr_doll_segmentation in MONAI Label: 3 sigmoid channels -> one bit-mask label (lungs 1, heart 2,
        clavicles 4; overlaps add up, e.g. 5 = lungs + clavicles) in the input's geometry."""

        def __init__(self, path, conf, **kwargs):
            kwargs.setdefault("post_filter", [SaveImaged])
            # the bundle's Invertd already restores the input's size; MONAI Label's Restored assumes (x, y) arrays
            super().__init__(path, conf, type="segmentation", add_post_restore=False, **kwargs)
            self.labels = {name: 1 << int(k) for name, k in self.labels.items()}

        def post_transforms(self, data=None):
            post = [t for t in super().post_transforms(data) if type(t).__name__ != "SaveMasksd"]
            return post + [BitmaskLabeld(keys=self.key_pred)]

    class CXRDollTrainTask(BundleTrainTask):
        """cxr_doll_segmentation's fine-tuning (configs/common.yaml + configs/train.yaml) on MONAI Label's datastore:
        labels are bit-mask PNGs (lungs 1, heart 2, clavicles 4), each request trains a fresh run from the current
        models/model.pt and publishes its best network as models/model.pt."""

        def _configs(self, path):
            return [os.path.join(path, "configs", "common.yaml"), os.path.join(path, "configs", "train.yaml")]

        def _load_bundle_config(self, path, config):
            parser = ConfigParser()
            parser.read_config(self._configs(path))
            parser.config.update({self.const.key_bundle_root(): path})
            return parser

        def _update_overrides(self, overrides):
            self._run_dir = os.path.join(self.bundle_path, "eval", "monailabel", time.strftime("%Y%m%d_%H%M%S"))
            overrides.update({
                "task": "scr",                     # 3 channels: lungs, heart, clavicles
                "init": "scratch",                 # the weights come from models/model.pt (MONAI Label's loader)
                "load_transforms#3#union_groups": None,
                "load_transforms#3#num_bitmask_channels": len(STRUCTURES),
                "ckpt_dir": self._run_dir,
                "show_progress": False,
            })
            overrides.update(self.extra_overrides)
            return overrides

        extra_overrides: dict = {}

        def run_single_gpu(self, request, overrides):
            import monai.bundle

            monai.bundle.run(run_id=request.get("run_id", "run"), init_id=None, final_id=None,
                             meta_file=self.bundle_metadata_path, config_file=self._configs(self.bundle_path),
                             **overrides)
            best = os.path.join(self._run_dir, "model.pt")
            if os.path.exists(best):
                target = os.path.join(self.bundle_path, "models", "model.pt")
                shutil.copyfile(best, target + ".tmp")
                os.replace(target + ".tmp", target)

    return BitmaskLabeld, CXRDollInferTask, CXRDollTrainTask


# ----------------------------------------------------------------------------------------------------------------
# the recommended configs/inference.yaml change (applied to a temporary copy only)
# ----------------------------------------------------------------------------------------------------------------
WRITER_BLOCK = """    - _target_: bundle.workflows.inference.SaveMasksd
      keys: pred
      output_dir: "@output_dir"
      output_ext: "@output_ext"
      overlay: "@save_overlay"
"""
RECOMMENDED_WRITER = """# the bundle's writer, used by `run` only (MONAI Label and other apps write their own label files)
writer:
  _target_: bundle.workflows.inference.SaveMasksd
  keys: pred
  output_dir: "@output_dir"
  output_ext: "@output_ext"
  overlay: "@save_overlay"
"""


def recommended_inference_yaml(text: str) -> str:
    """configs/inference.yaml with the writer moved out of ``postprocessing`` (see docs/MONAI_LABEL.md)."""
    if "\nwriter:" in text:
        return text  # already applied upstream
    if WRITER_BLOCK not in text:
        raise ValueError("configs/inference.yaml: the SaveMasksd block of postprocessing was not found as expected")
    text = text.replace(WRITER_BLOCK, "")
    text = text.replace("checkpointloader:\n", RECOMMENDED_WRITER + "checkpointloader:\n", 1)
    old = '  postprocessing: "@postprocessing"\n'
    if text.count(old) != 1:
        raise ValueError("configs/inference.yaml: evaluator's postprocessing line not found as expected")
    return text.replace(old, '  postprocessing: "$monai.transforms.Compose([@postprocessing, @writer])"\n')


# ----------------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------------
def copy_bundle(dst: Path) -> list[str]:
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
    if not (dst / "models" / "model.pt").exists():
        notes.append("no models/model.pt in the repository: random weights written in the temporary copy only")
        code = ("import torch, bundle.networks.segmentation as s; torch.manual_seed(0); "
                f"torch.save(s.build_segmenter('segresnet', out_channels=3).state_dict(), {str(dst / 'models' / 'model.pt')!r})")
        subprocess.run([sys.executable, "-c", code], cwd=dst, check=True)
    return notes


def make_studies(studies: Path, images_dir: Path, masks_dir: Path | None, n: int) -> tuple[list[Path], Path]:
    """Datastore folder: ``n`` radiographs + bit-mask labels in ``labels/final`` (lungs bit from the lung masks), and
    one non-square crop (H 256 x W 200) to catch row/column mix-ups. Returns (images, non-square image)."""
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
            Image.fromarray(lungs * 1).save(final / p.name)   # bit 0 = lungs; heart/clavicles not annotated here
    img = np.asarray(Image.open(images[0]).convert("L"))
    crop = img[:, 28:228] if img.shape[1] >= 228 else img[:, : max(8, img.shape[1] * 3 // 4)]
    ns = studies.parent / "nonsquare" / f"crop_{images[0].name}"   # outside the datastore (no label)
    ns.parent.mkdir(parents=True)
    Image.fromarray(np.ascontiguousarray(crop)).save(ns)
    return out, ns


def bundle_run(bundle: Path, image_dir: Path, out_dir: Path) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------
def check_stock_infer(bundle: Path, images: list[Path], ref_dir: Path) -> None:
    from monailabel.tasks.infer.bundle import BundleInferTask

    task = guarded("stock_infer_load")(BundleInferTask)(str(bundle), {})
    if task is None:
        return
    record("stock_infer_load", task.is_valid(),
           f"valid={task.is_valid()}, type={task.type}, dimension={task.dimension}, labels={task.labels} "
           f"(from metadata outputs.pred.channel_def: label value 0 = lungs, which label maps use for background), "
           f"keys image={task.key_image!r} pred={task.key_pred!r}, model_filename={task.config().get('model_filename')}")

    @guarded("stock_infer_run")
    def run():
        before = set((bundle / "eval").rglob("*")) if (bundle / "eval").exists() else set()
        src = images[0]
        path, res = task({"image": str(src), "device": "cpu"})
        ref = read_png(src)
        detail = f"input {src.name} {ref.shape}: "
        ok = False
        if not path or not os.path.exists(path):
            detail += f"no label file (result {type(path).__name__})"
        else:
            try:
                out = read_png(Path(path))
                detail += f"label file {Path(path).suffix} shape {out.shape} dtype {out.dtype}, values {sorted(set(out.ravel().tolist()))[:8]}"
                ok = out.shape == ref.shape
                if not ok:
                    detail += " (not the input's geometry: MONAI Label's writer got the 3 channels as a 3-D volume)"
            except Exception as e:  # noqa: BLE001
                detail += f"label file {path} unreadable as PNG: {e}"
        after = set((bundle / "eval").rglob("*")) if (bundle / "eval").exists() else set()
        new = sorted(str(p.relative_to(bundle)) for p in after - before if p.is_file())
        record("stock_infer_run", ok, detail + f"; label_names={res.get('label_names') if isinstance(res, dict) else None}")
        record("stock_infer_side_effects", not new,
               f"files written into the bundle folder by postprocessing's SaveMasksd: {new}" if new
               else "no file written into the bundle folder")
    run()


def check_recommended_infer(bundle: Path, images: list[Path], nonsquare: Path, ref_dir: Path) -> Any:
    import numpy as np

    _, CXRDollInferTask, _ = integration_classes()
    task = CXRDollInferTask(str(bundle), {})
    assert task.is_valid(), "CXRDollInferTask not valid"
    msgs, ok = [], task.labels == {"lungs": 1, "heart": 2, "clavicles": 4} and task.dimension == 2
    msgs.append(f"labels={task.labels}, dimension={task.dimension}")
    before = set((bundle / "eval").rglob("*")) if (bundle / "eval").exists() else set()
    for src in [*images[:2], nonsquare]:
        path, res = task({"image": str(src), "device": "cpu"})
        out = read_png(Path(path))
        ref_in = read_png(src)
        ref = read_png(ref_dir / f"{src.stem}_seg.png")
        same_geom = out.shape == ref_in.shape[:2]
        agree = float((out == ref).mean()) if out.shape == ref.shape else 0.0
        ok &= same_geom and agree == 1.0 and res.get("label_names") == task.labels
        msgs.append(f"{src.name} {ref_in.shape[:2]} -> {Path(path).suffix} {out.shape} {out.dtype} "
                    f"values {sorted(set(out.ravel().tolist()))}, equal to the bundle's own mask: {agree:.4f}")
    after = set((bundle / "eval").rglob("*")) if (bundle / "eval").exists() else set()
    new = sorted(str(p.relative_to(bundle)) for p in after - before if p.is_file())
    ok &= not new
    msgs.append(f"files written into the bundle folder: {new or 'none'}")
    record("recommended_infer", ok, "; ".join(msgs), required=True)
    return task


def check_stock_app(app_dir: Path, studies: Path) -> Any:
    spec = importlib.util.spec_from_file_location("monaibundle_main", app_dir / "main.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(app_dir))
    spec.loader.exec_module(mod)
    conf = {"models": NAME, "preload": "false", "sam2": "false", "zoo_source": "ngc"}
    app = mod.MyApp(str(app_dir), str(studies), conf)
    info = app.info()
    ok = NAME in info["models"] and NAME in info["trainers"]
    record("stock_app", ok, f"monaibundle app (conf {conf}): models={list(info['models'])}, "
           f"trainers={list(info['trainers'])}, labels={info['models'].get(NAME, {}).get('labels')}, "
           f"datastore: {info['datastore'].get('total')} images, {info['datastore'].get('completed')} labelled")
    return app


def check_stock_train(app: Any, bundle: Path) -> None:
    req = {"model": NAME, "max_epochs": 1, "device": "cpu", "val_split": 0.5, "multi_gpu": False,
           "tracking": "None", "pretrained": True}

    @guarded("stock_train")
    def run():
        before = (bundle / "models" / "model.pt").stat().st_mtime
        app.train(req)
        after = (bundle / "models" / "model.pt").stat().st_mtime
        record("stock_train", after != before, f"request {req}: finished; models/model.pt "
               f"{'updated' if after != before else 'not updated'}")
    run()


def check_recommended_train(bundle: Path, studies: Path, infer_task: Any, images: list[Path], epochs: int) -> None:
    import torch
    from monailabel.datastore.local import LocalDatastore

    _, _, CXRDollTrainTask = integration_classes()
    task = CXRDollTrainTask(str(bundle), {})
    assert task.is_valid(), "CXRDollTrainTask not valid (no configs/train.yaml?)"
    # small and fast on a CPU: 2 steps of 2 images per epoch
    task.extra_overrides = {"batch_size": 2, "epoch_length": 2, "num_iterations": 2 * epochs,
                            "validate#dataloader#batch_size": 2}
    ds = LocalDatastore(str(studies), extensions=["*.png"], auto_reload=False)
    n = len(ds.datalist())
    model = bundle / "models" / "model.pt"
    before = torch.load(model, map_location="cpu", weights_only=False)
    t0 = time.time()
    task({"model": NAME, "max_epochs": epochs, "device": "cpu", "val_split": 0.5, "multi_gpu": False,
          "tracking": "None", "pretrained": True}, ds)
    dt = time.time() - t0
    after = torch.load(model, map_location="cpu", weights_only=False)
    changed = any(not torch.equal(before[k], after[k]) for k in before if k in after)
    same_keys = set(before) == set(after)
    run_dir = Path(task._run_dir)
    files = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    # the infer task reloads models/model.pt when its mtime changes
    path, _ = infer_task({"image": str(images[0]), "device": "cpu"})
    ok = changed and same_keys and os.path.exists(path)
    record("recommended_train", ok, f"{n} labelled images (val_split 0.5), {epochs} epoch(s) in {dt:.0f} s; run dir "
           f"{run_dir.relative_to(bundle)}: {files}; models/model.pt updated: {changed} (same keys as before: "
           f"{same_keys}); inference with the new weights: {'ok' if path and os.path.exists(path) else 'failed'}",
           required=True)


# ----------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_images = ROOT.parent / "shared" / "data" / "real-cxr-lungs"
    ap.add_argument("--images", type=Path, default=default_images / "images", help="folder of PNG radiographs")
    ap.add_argument("--masks", type=Path, default=default_images / "masks", help="lung masks, same names (labels)")
    ap.add_argument("--n", type=int, default=4, help="radiographs in the datastore")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxr_doll_monailabel_"))
    work.mkdir(parents=True, exist_ok=True)
    # before monailabel is imported: no model-zoo look-up (local bundle), sessions and tracking in the work folder
    os.environ.setdefault("BUNDLE_DOWNLOAD_SRC", "ngc")
    os.environ["MONAI_LABEL_SESSION_PATH"] = str(work / "sessions")
    os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    logging.basicConfig(level=logging.INFO, filename=str(work / "check.log"), filemode="w",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().addHandler(_console())

    import monai
    import monailabel
    import numpy as np
    import torch

    t_start = time.time()
    versions = {"monailabel": monailabel.__version__, "monai": monai.__version__, "torch": torch.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0]}
    print(f"work folder: {work}\nversions: {versions}", flush=True)

    # the app: MONAI Label's monaibundle sample app, with the bundle as model/cxr_doll_segmentation
    sample = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
    app_dir = work / "apps" / "monaibundle"
    if sample.is_dir():
        shutil.copytree(sample, app_dir)
    else:
        (app_dir / "model").mkdir(parents=True)
        record("stock_app", None, f"{sample} not shipped with this monailabel")
    bundle = app_dir / "model" / NAME
    notes = copy_bundle(bundle)
    for note in notes:
        print(f"note: {note}", flush=True)
    rec_bundle = work / "recommended" / NAME          # a second copy with the recommended inference.yaml
    copy_bundle(rec_bundle)
    shutil.copyfile(bundle / "models" / "model.pt", rec_bundle / "models" / "model.pt")
    cfg = rec_bundle / "configs" / "inference.yaml"
    cfg.write_text(recommended_inference_yaml(cfg.read_text()))

    studies = work / "studies"
    images, nonsquare = make_studies(studies, args.images, args.masks if args.masks.is_dir() else None, args.n)
    inputs = work / "inputs"                           # the images the bundle itself runs on
    inputs.mkdir()
    for p in [*images[:2], nonsquare]:
        shutil.copy2(p, inputs / p.name)

    # 1. the bundle's own inference in this venv (reference masks)
    ref_dir = work / "ref_stock"
    ok_run = guarded("bundle_run", required=True)(bundle_run)(bundle, inputs, ref_dir)
    if (ref_dir / f"{images[0].stem}_seg.png").exists():
        shapes = {p.name: read_png(p).shape for p in sorted(ref_dir.glob("*_seg.png"))}
        record("bundle_run", all(shapes[f"{p.stem}_seg.png"] == read_png(p).shape[:2] for p in inputs.iterdir()),
               f"monai.bundle run configs/inference.yaml in the monailabel venv: {shapes}", required=True)
    del ok_run

    # 2. stock MONAI Label tasks
    check_stock_infer(bundle, images, ref_dir)

    # 3. recommended integration
    @guarded("recommended_run_unchanged", required=True)
    def rec_run():
        out = work / "ref_recommended"
        bundle_run(rec_bundle, inputs, out)
        same = {p.name: bool(np.array_equal(read_png(p), read_png(out / p.name))) for p in sorted(ref_dir.glob("*_seg.png"))}
        record("recommended_run_unchanged", bool(same) and all(same.values()),
               f"monai.bundle run with the recommended inference.yaml: same masks as the current one: {same}",
               required=True)
    rec_run()
    infer_task = guarded("recommended_infer", required=True)(check_recommended_infer)(rec_bundle, images, nonsquare,
                                                                                         ref_dir)

    # 4. the stock app (discovery, infer through the app) and training
    app = guarded("stock_app")(check_stock_app)(app_dir, studies) if sample.is_dir() else None
    if app is not None:
        @guarded("stock_app_infer")
        def app_infer():
            res = app.infer({"model": NAME, "image": images[0].stem, "device": "cpu"})
            record("stock_app_infer", bool(res.get("file")) and os.path.exists(res["file"]),
                   f"app.infer -> file {res.get('file')}, label_names {res.get('params', {}).get('label_names')}")
        app_infer()
    if args.skip_train:
        record("stock_train", None, "--skip-train")
        record("recommended_train", None, "--skip-train", required=True)
    else:
        if app is not None:
            check_stock_train(app, bundle)
        if infer_task is not None:
            guarded("recommended_train", required=True)(check_recommended_train)(
                rec_bundle, studies, infer_task, images, args.epochs)
        else:
            record("recommended_train", None, "skipped: recommended_infer failed", required=True)

    # report
    failed = [r for r in RESULTS if r["required"] and r["status"] != "PASS" and r["status"] != "SKIP"]
    report = {"versions": versions, "notes": notes, "seconds": round(time.time() - t_start), "results": RESULTS,
              "work": str(work)}
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print("\n==== summary ====")
    for r in RESULTS:
        print(f"{r['status']:4} {'required ' if r['required'] else 'info     '} {r['check']}")
    print(f"checks took {report['seconds']} s; report: {work / 'report.json'}; log: {work / 'check.log'}")
    if not args.keep and args.workdir is None and not failed:
        shutil.rmtree(work, ignore_errors=True)
        print("(work folder removed; --keep keeps it)")
    print("RESULT:", "OK (every required check passed)" if not failed else f"FAILED: {[r['check'] for r in failed]}")
    return 1 if failed else 0


def _console() -> logging.Handler:
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(logging.WARNING)
    h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    return h


if __name__ == "__main__":
    sys.exit(main())

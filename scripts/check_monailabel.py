#!/usr/bin/env python3
"""Check this bundle as a MONAI Label bundle model (run by scripts/check_monailabel.sh, in its own venv).

The bundle (configs/, bundle/, models/, docs/, LICENSE) is copied into temporary MONAI Label apps: copies of MONAI
Label's own ``monaibundle`` sample app with the bundle under ``model/cxr_doll_segmentation``, sharing a local
datastore (``studies/``) of real radiographs with bit-mask labels. Nothing is written into the repository.

Checks named ``stock_*`` show what MONAI Label does with the bundle as it is (informational). Checks marked
*required* decide the exit status:

- ``bundle_run``: the bundle's own ``monai.bundle run`` of configs/inference.yaml in this venv (reference masks).
- ``recommended_run_unchanged``: the same with the recommended configs/inference.yaml (writer split out of
  ``postprocessing``, see docs/MONAI_LABEL.md): identical masks.
- ``recommended_app``: the monaibundle app edited as docs/MONAI_LABEL.md says (``CXRDollInferTask`` and
  ``CXRDollTrainTask`` from ``lib/cxr_doll_monailabel.py``, the module this script writes with --export-module)
  lists the model and trainer with labels {lungs: 1, heart: 2, clavicles: 4}.
- ``recommended_infer``: ``app.infer`` writes one bit-mask label per image, in the input's geometry (square and
  non-square inputs), equal to the bundle's own mask, and writes nothing into the bundle folder.
- ``recommended_train``: ``app.train`` fine-tunes 1 epoch on the datastore labels and publishes models/model.pt,
  which the next ``app.infer`` uses.

If the repository has no models/model.pt, a random-weights one is written in the temporary copies only (the report
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
# the recommended MONAI Label integration: an app-side module (docs/MONAI_LABEL.md shows the same code)
# ----------------------------------------------------------------------------------------------------------------
MODULE_SOURCE = '''"""MONAI Label (0.8.5) tasks for the cxr_doll_segmentation bundle: put this file in <app>/lib/.

Written by ``python scripts/check_monailabel.py --export-module <app>/lib/cxr_doll_monailabel.py`` (bundle repository).
The bundle predicts 3 overlapping structures (sigmoid channels: lungs, heart, clavicles); MONAI Label's stock bundle
tasks expect one label map whose value 0 is background. Labels here are bit masks, the bundle's own format:
lungs = 1, heart = 2, clavicles = 4, overlaps add up (5 = lungs + clavicles).
"""

import os
import shutil
import time

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import MapTransform

from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask


class BitmaskLabeld(MapTransform):
    """Binary masks (C, H, W) -> one uint8 bit-mask label (channel k -> bit k), in MONAI's (x, y) array order:
    MONAI Label's writer transposes arrays back into the image's rows and columns."""

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
    """The bundle's configs/inference.yaml (preprocessing, network, postprocessing), one bit-mask label per image in
    the image's geometry; label names {lungs: 1, heart: 2, clavicles: 4}."""

    def __init__(self, path, conf, **kwargs):
        # the bundle's Invertd already restores the input's size (MONAI Label's Restored assumes (x, y) arrays)
        super().__init__(path, conf, type="segmentation", add_post_restore=False, **kwargs)
        self.labels = {name: 1 << int(k) for name, k in self.labels.items()}

    def post_transforms(self, data=None):
        # the bundle's own file writer (SaveMasksd) is skipped: MONAI Label writes the label file
        post = [t for t in super().post_transforms(data) if type(t).__name__ != "SaveMasksd"]
        return post + [BitmaskLabeld(keys=self.key_pred)]


class CXRDollTrainTask(BundleTrainTask):
    """The bundle's fine-tuning (configs/common.yaml + configs/train.yaml) on the datastore's final labels (bit-mask
    PNGs). Each request trains a new run under <bundle>/eval/monailabel/<time>/, starting from models/model.pt
    (MONAI Label's "pretrained"), and publishes its best network as models/model.pt (the infer task reloads it)."""

    overrides = {}  # more config overrides, e.g. {"batch_size": 4, "epoch_length": 10, "learning_rate": 0.001}

    def _configs(self, path):
        return [os.path.join(path, "configs", "common.yaml"), os.path.join(path, "configs", "train.yaml")]

    def _load_bundle_config(self, path, config):
        parser = ConfigParser()
        parser.read_config(self._configs(path))
        parser.config.update({self.const.key_bundle_root(): path})
        return parser

    def _update_overrides(self, overrides):
        self._run_dir = os.path.join(self.bundle_path, "eval", "monailabel", time.strftime("%Y%m%d_%H%M%S"))
        loaders = self.bundle_config["load_transforms"]
        i = next(i for i, t in enumerate(loaders) if str(t.get("_target_", "")).endswith("LoadMaskd"))
        overrides.update({
            "task": "scr",          # 3 output channels: lungs, heart, clavicles
            "init": "scratch",      # the weights come from models/model.pt through MONAI Label's CheckpointLoader
            f"load_transforms#{i}#num_bitmask_channels": 3,       # one bit-mask label file per image
            f"load_transforms#{i}#union_groups": [[0], [1], [2]],  # (a None override would be dropped)
            "ckpt_dir": self._run_dir,
            "show_progress": False,
        })
        overrides.update(self.overrides)
        return overrides

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
'''

# the two edits of the monaibundle app's main.py (docs/MONAI_LABEL.md): (old, new), each old text found once
MAIN_PY_EDITS = (
    ("from monailabel.tasks.train.bundle import BundleTrainTask\n",
     "from monailabel.tasks.train.bundle import BundleTrainTask\n"
     "from lib.cxr_doll_monailabel import CXRDollInferTask, CXRDollTrainTask\n"),
    ("                i = BundleInferTask(b, self.conf)\n",
     "                i = (CXRDollInferTask if n.startswith(\"cxr_doll\") else BundleInferTask)(b, self.conf)\n"),
    ("            t = BundleTrainTask(b, self.conf)\n",
     "            t = (CXRDollTrainTask if n.startswith(\"cxr_doll\") else BundleTrainTask)(b, self.conf)\n"),
)

# ----------------------------------------------------------------------------------------------------------------
# the recommended configs/inference.yaml change (applied to a temporary copy only)
# ----------------------------------------------------------------------------------------------------------------
WRITER_BLOCK = """    - _target_: bundle.workflows.inference.SaveMasksd
      keys: pred
      output_dir: "@output_dir"
      output_ext: "@output_ext"
      overlay: "@save_overlay"
"""
RECOMMENDED_WRITER = """# the bundle's mask writer, used by `run` only (MONAI Label and other apps write their own label files)
writer:
  _target_: bundle.workflows.inference.SaveMasksd
  keys: pred
  output_dir: "@output_dir"
  output_ext: "@output_ext"
  overlay: "@save_overlay"
"""
EVALUATOR_POST = '  postprocessing: "@postprocessing"\n'
EVALUATOR_POST_NEW = '  postprocessing: "$monai.transforms.Compose([@postprocessing, @writer])"\n'


def recommended_inference_yaml(text: str) -> str:
    """configs/inference.yaml with the writer moved out of ``postprocessing`` (see docs/MONAI_LABEL.md)."""
    if "\nwriter:" in text:
        return text  # already applied upstream
    if WRITER_BLOCK not in text or text.count(EVALUATOR_POST) != 1 or "\ncheckpointloader:\n" not in text:
        raise ValueError("configs/inference.yaml changed: the recommended edit no longer applies as written")
    text = text.replace(WRITER_BLOCK, "")
    text = text.replace("\ncheckpointloader:\n", "\n" + RECOMMENDED_WRITER + "checkpointloader:\n", 1)
    return text.replace(EVALUATOR_POST, EVALUATOR_POST_NEW)


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


def make_app(sample: Path, app_dir: Path, recommended: bool, model: Path | None = None) -> list[str]:
    """A copy of the monaibundle sample app with the bundle as model/<NAME> (recommended: edited main.py, the
    lib/ module, the recommended inference.yaml)."""
    shutil.copytree(sample, app_dir)
    notes = copy_bundle(app_dir / "model" / NAME, model)
    if recommended:
        (app_dir / "lib" / "cxr_doll_monailabel.py").write_text(MODULE_SOURCE)
        main = app_dir / "main.py"
        text = main.read_text()
        for old, new in MAIN_PY_EDITS:
            if text.count(old) != 1:
                raise ValueError(f"{main}: the documented edit does not apply ({old.strip()!r})")
            text = text.replace(old, new)
        main.write_text(text)
        cfg = app_dir / "model" / NAME / "configs" / "inference.yaml"
        cfg.write_text(recommended_inference_yaml(cfg.read_text()))
    return notes


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


def check_stock_infer(app: Any, bundle: Path, src: Path) -> None:
    """MONAI Label's stock BundleInferTask through the stock monaibundle app, as a client asks by default and with
    ``result_dtype: uint8``; and what the bundle's own writer leaves in the model folder."""
    task = app._infers[NAME]
    record("stock_infer_load", task.is_valid(),
           f"BundleInferTask: valid={task.is_valid()}, type={task.type}, dimension={task.dimension} (from "
           f"inputs.image.spatial_shape), labels={task.labels} (from outputs.pred.channel_def; in a label map 0 is "
           f"background, so 'lungs': 0 cannot be shown), image key {task.key_image!r}, pred key {task.key_pred!r}, "
           f"pre={[type(t).__name__ for t in task.pre_transforms({})]}, "
           f"post={[type(t).__name__ for t in task.post_transforms({})]}")
    ref = read_png(src)
    for tag, extra in (("", {}), ("_uint8", {"result_dtype": "uint8"})):
        name = f"stock_infer{tag}"
        before = _bundle_files(bundle)

        @guarded(name)
        def run():
            res = app.infer({"model": NAME, "image": src.stem, "device": "cpu", **extra})
            path = res.get("file")
            detail = f"app.infer {extra or '(default request)'}, input {src.name} {ref.shape}: "
            ok = False
            if not path or not os.path.exists(path):
                detail += f"no label file ({res.get('file')!r})"
            else:
                out = read_png(Path(path))
                ok = out.shape == ref.shape
                detail += (f"label {Path(path).suffix} of shape {out.shape} {out.dtype} (values "
                           f"{sorted(set(out.ravel().tolist()))[:8]})")
                if not ok:
                    detail += ", not the input's geometry: the (3, H, W) masks were written as a 3-D image"
            record(name, ok, detail + f"; label_names {res.get('params', {}).get('label_names')}")
        run()
        new = _written(bundle, before)
        record(f"stock_infer_side_effects{tag}", not new,
               f"the bundle's SaveMasksd wrote into the model folder: {new}" if new
               else "nothing written into the model folder")


def check_stock_train(app: Any, bundle: Path) -> None:
    req = {"model": NAME, "max_epochs": 1, "device": "cpu", "val_split": 0.5, "multi_gpu": False,
           "tracking": "None", "pretrained": True}

    @guarded("stock_train")
    def run():
        before = (bundle / "models" / "model.pt").stat().st_mtime_ns
        app.train(req)
        changed = (bundle / "models" / "model.pt").stat().st_mtime_ns != before
        record("stock_train", changed, f"app.train {req}: returned; models/model.pt updated: {changed}")
    run()


def check_recommended_app(app: Any) -> bool:
    info = app.info()
    model = info["models"].get(NAME, {})
    ok = (type(app._infers.get(NAME)).__name__ == "CXRDollInferTask"
          and type(app._trainers.get(NAME)).__name__ == "CXRDollTrainTask"
          and model.get("labels") == LABELS and model.get("dimension") == 2)
    record("recommended_app", ok, f"models {list(info['models'])} ({type(app._infers.get(NAME)).__name__}), "
           f"trainers {list(info['trainers'])} ({type(app._trainers.get(NAME)).__name__}), labels "
           f"{model.get('labels')}, dimension {model.get('dimension')}, datastore {info['datastore'].get('total')} "
           f"images / {info['datastore'].get('completed')} labelled", required=True)
    return ok


def check_recommended_infer(app: Any, bundle: Path, sources: list[Path], ref_dir: Path) -> None:
    msgs, ok = [], True
    before = _bundle_files(bundle)
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
    record("recommended_infer", ok, "; ".join(msgs), required=True)


def check_recommended_train(app: Any, bundle: Path, src: Path, epochs: int) -> None:
    import torch

    trainer = app._trainers[NAME]
    # small and quick on a CPU: 2 steps of 2 images per epoch
    trainer.overrides = {"batch_size": 2, "epoch_length": 2, "num_iterations": 2 * epochs,
                         "validate#dataloader#batch_size": 2}
    model = bundle / "models" / "model.pt"
    before = torch.load(model, map_location="cpu", weights_only=True)
    req = {"model": NAME, "max_epochs": epochs, "device": "cpu", "val_split": 0.5, "multi_gpu": False,
           "tracking": "None", "pretrained": True}
    t0 = time.time()
    app.train(req)
    dt = time.time() - t0
    after = torch.load(model, map_location="cpu", weights_only=True)
    changed = set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    run_dir = Path(trainer._run_dir)
    files = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    res = app.infer({"model": NAME, "image": src.stem, "device": "cpu"})  # reloads models/model.pt (new mtime)
    inferred = bool(res.get("file")) and os.path.exists(res["file"])
    record("recommended_train", changed and inferred,
           f"app.train {req} ({len(app.datastore().datalist())} labelled images) took {dt:.0f} s; run folder "
           f"{run_dir.relative_to(bundle)}: {files}; models/model.pt replaced by the new weights (same keys): "
           f"{changed}; app.infer with them: {'ok' if inferred else 'failed'}", required=True)


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
    ap.add_argument("--export-module", type=Path, default=None, metavar="PATH",
                    help="only write the MONAI Label module (CXRDollInferTask, CXRDollTrainTask) to PATH and exit")
    args = ap.parse_args()
    if args.export_module is not None:
        args.export_module.write_text(MODULE_SOURCE)
        print(f"wrote {args.export_module}")
        return 0

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
    stock_dir, rec_dir = work / "stock" / "monaibundle", work / "recommended" / "monaibundle"
    notes = make_app(sample, stock_dir, recommended=False)
    stock_bundle = stock_dir / "model" / NAME
    make_app(sample, rec_dir, recommended=True, model=stock_bundle / "models" / "model.pt")
    rec_bundle = rec_dir / "model" / NAME
    for note in notes:
        print(f"note: {note}", flush=True)

    studies = work / "studies"
    images, nonsquare = make_studies(studies, args.images, args.masks if args.masks.is_dir() else None, args.n)
    inputs = work / "inputs"
    inputs.mkdir()
    for p in [*images[:2], nonsquare]:
        shutil.copy2(p, inputs / p.name)

    # 1. the bundle's own inference in this venv: reference masks; the recommended inference.yaml gives the same
    ref_dir = work / "masks_current_yaml"
    guarded("bundle_run", required=True)(check_bundle_run)(stock_bundle, inputs, ref_dir, "bundle_run")
    guarded("recommended_run_unchanged", required=True)(check_bundle_run)(
        rec_bundle, inputs, work / "masks_recommended_yaml", "recommended_run_unchanged", ref_dir)

    # 2. the stock monaibundle app with the bundle as it is
    stock = guarded("stock_app")(load_app)(stock_dir, studies)
    if stock is not None:
        info = stock.info()
        record("stock_app", NAME in info["models"] and NAME in info["trainers"],
               f"monaibundle app: models {list(info['models'])}, trainers {list(info['trainers'])}")
        check_stock_infer(stock, stock_bundle, images[0])

    # 3. the app edited as docs/MONAI_LABEL.md says, with the recommended inference.yaml
    rec = guarded("recommended_app", required=True)(load_app)(rec_dir, studies)
    if rec is not None and check_recommended_app(rec):
        guarded("recommended_infer", required=True)(check_recommended_infer)(
            rec, rec_bundle, [*images[:2], nonsquare], ref_dir)

    # 4. training
    if args.skip_train:
        record("stock_train", None, "--skip-train")
        record("recommended_train", None, "--skip-train", required=True)
    else:
        if stock is not None:
            check_stock_train(stock, stock_bundle)
        if rec is not None and NAME in rec._trainers:
            guarded("recommended_train", required=True)(check_recommended_train)(rec, rec_bundle, images[0],
                                                                                 args.epochs)
        else:
            record("recommended_train", False, "no recommended app/trainer", required=True)

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

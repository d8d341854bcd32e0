"""Small datasets in the exact on-disk formats users download (for the adapter tests and the end-to-end ``--data``
run): JSRT ``.IMG`` (headerless 12-bit big-endian, values growing toward black) with SCR GIF masks at half the
image's size under the archive's ``scratch/fold<k>/masks/<structure>/`` folders, QaTa-COV19-v2, COVID-QU-Ex's
``Infection Segmentation Data``, a CheXpert-v1.0-small tree and a CheXlocalize release folder for it (the ground truth
of its valid.csv and of a small CheXpert test set, COCO RLE by pycocotools as the release was written, and that test
set's ``test_labels.csv`` and images). The pictures are simple chest-like drawings whose
masks agree with them (lungs dark, heart and clavicles bright), so a few training steps have something to learn.

As a script, writes every dataset and a data file for ``scripts/run_pipeline.py --data``::

    python tests/data_formats.py <out folder>      # -> <out>/data.yaml
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bundle.constants import CHEXPERT_COLUMNS, OBSERVATIONS, SCR_STRUCTURES  # noqa: E402

JSRT_CASES: tuple[str, ...] = ("JPCLN001", "JPCLN002", "JPCLN003", "JPCLN004", "JPCLN005", "JPCLN006", "JPCNN001",
                               "JPCNN002", "JPCNN003", "JPCNN004", "JPCNN005", "JPCNN006")


def _save(path: Path, arr: np.ndarray, **kwargs: object) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(arr))
    if path.suffix.lower() == ".gif":
        im = im.convert("L").convert("P")
    im.save(path, **kwargs)
    return path


def chest(side: int, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A chest-like attenuation image in ``[0, 1]`` (bone and heart bright, lungs dark) and its SCR masks
    (``{structure: bool (side, side)}``; patient's left on the image's right), varied by ``k``."""
    y, x = np.mgrid[0:side, 0:side] / side
    shift = 0.02 * ((k % 5) - 2)
    masks = {
        "right lung": ((x - 0.30 - shift) / 0.14) ** 2 + ((y - 0.52) / 0.30) ** 2 < 1,
        "left lung": ((x - 0.70 - shift) / 0.14) ** 2 + ((y - 0.52) / 0.30) ** 2 < 1,
        "heart": ((x - 0.58 - shift) / (0.13 + 0.01 * (k % 3))) ** 2 + ((y - 0.66) / 0.13) ** 2 < 1,
        "right clavicle": (np.abs(y - 0.20 - 0.15 * (x - 0.30)) < 0.035) & (x > 0.14) & (x < 0.46),
        "left clavicle": (np.abs(y - 0.20 + 0.15 * (x - 0.70)) < 0.035) & (x > 0.54) & (x < 0.86),
    }
    masks["left lung"] &= ~masks["heart"]
    img = np.full((side, side), 0.55)
    img[masks["left lung"] | masks["right lung"]] = 0.2
    img[masks["heart"]] = 0.7
    img[masks["left clavicle"] | masks["right clavicle"]] = 0.9
    img += np.random.default_rng(k).normal(0, 0.03, img.shape)
    return np.clip(img, 0, 1), masks


def _downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)) >= 0.5


def make_jsrt_scr(root: Path, cases: Sequence[str] = JSRT_CASES, side: int = 64, mask_factor: int = 2,
                  folder_names: dict[str, str] | None = None, png_cases: Sequence[str] = ()) -> dict[str, Path]:
    """The official JSRT + SCR archives as downloaded: ``All247images/<case>.IMG`` (``side`` x ``side``, 12-bit
    big-endian, film density) and ``scratch/fold1|fold2/masks/<structure>/<case>.gif`` (binary GIF at ``side /
    mask_factor``; odd cases in fold 1, even in fold 2). ``folder_names`` renames structure folders (e.g. ``{"left
    lung": "Left_Lung"}``); ``png_cases`` get an 8-bit PNG conversion beside the ``.IMG`` (which must win).

    Returns ``{"images": ..., "masks": ...}``: the two top folders.
    """
    from bundle.data.io import JSRT_MAX_VALUE, write_jsrt_img

    names = {s: s for s in SCR_STRUCTURES}
    names.update(folder_names or {})
    for k, case in enumerate(cases):
        img, masks = chest(side, k)
        density = np.round((1.0 - img) * JSRT_MAX_VALUE).astype(np.int64)  # values grow toward black
        write_jsrt_img(root / "All247images" / f"{case}.IMG", density)
        if case in png_cases:
            _save(root / "All247images" / f"{case}.png", (img * 255).astype(np.uint8))
        fold = "fold1" if k % 2 == 0 else "fold2"
        for s in SCR_STRUCTURES:
            m = _downsample_mask(masks[s], mask_factor) if mask_factor > 1 else masks[s]
            _save(root / "scratch" / fold / "masks" / names[s] / f"{case}.gif", m.astype(np.uint8) * 255)
    return {"images": root / "All247images", "masks": root / "scratch"}


def _blob(side: int, k: int) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side] / side
    cx = 0.3 if k % 2 else 0.7
    return ((x - cx) / 0.1) ** 2 + ((y - 0.5 - 0.03 * (k % 4)) / 0.14) ** 2 < 1


def qata_names(n: int, offset: int = 0) -> list[str]:
    """QaTa-COV19-v2 style names: ``covid_<n>`` (no patient id) and BIMCV ``sub-S<id>_ses-E<id>_run-1_bp-chest_vp-ap_cr``
    (two images per subject)."""
    return [f"covid_{offset + i}" if i % 3 == 0 else
            f"sub-S{(offset + i) // 2:05d}_ses-E{offset + i:05d}_run-1_bp-chest_vp-ap_cr" for i in range(n)]


def make_qata_v2(root: Path, n_train: int = 10, n_test: int = 4, side: int = 48) -> Path:
    """``QaTa-COV19-v2/{Train Set,Test Set}/Images/<name>.png`` + ``Ground-truths/mask_<name>.png`` (8-bit, 0/255);
    returns the ``QaTa-COV19-v2`` folder."""
    top = root / "QaTa-COV19-v2"
    for subset, names in (("Train Set", qata_names(n_train)), ("Test Set", qata_names(n_test, offset=1000))):
        for k, name in enumerate(names):
            img, _ = chest(side, k)
            blob = _blob(side, k) if k % 4 else np.zeros((side, side), bool)  # some controls with empty masks
            img = np.clip(img + 0.25 * blob, 0, 1)
            _save(top / subset / "Images" / f"{name}.png", (img * 255).astype(np.uint8))
            _save(top / subset / "Ground-truths" / f"mask_{name}.png", blob.astype(np.uint8) * 255)
    return top


def make_covid_qu_ex(root: Path, per_class: int = 2, side: int = 32) -> Path:
    """``Infection Segmentation Data/{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/{images,infection masks,lung
    masks}/<name>.png`` (same names in the three folders; infection masks empty outside COVID-19); returns the
    ``Infection Segmentation Data`` folder."""
    top = root / "Infection Segmentation Data"
    k = 0
    for split in ("Train", "Val", "Test"):
        for cls in ("COVID-19", "Non-COVID", "Normal"):
            for i in range(per_class):
                k += 1
                name = {"COVID-19": f"covid_{k}", "Non-COVID": f"Non_COVID ({k})", "Normal": f"Normal ({k})"}[cls]
                img, masks = chest(side, k)
                inf = _blob(side, k) if cls == "COVID-19" else np.zeros((side, side), bool)
                _save(top / split / cls / "images" / f"{name}.png", (img * 255).astype(np.uint8))
                _save(top / split / cls / "infection masks" / f"{name}.png", inf.astype(np.uint8) * 255)
                lungs = masks["left lung"] | masks["right lung"]
                _save(top / split / cls / "lung masks" / f"{name}.png", lungs.astype(np.uint8) * 255)
    return top


def make_chexpert_small(root: Path, n_train: int = 16, n_valid: int = 8, side: int = 64,
                        dirname: str = "CheXpert-v1.0-small") -> Path:
    """``<dirname>/train.csv``, ``valid.csv`` (the 19 columns) and ``train|valid/patientNNNNN/study1/
    view1_frontal.jpg`` (8-bit JPEG); every observation has both classes in ``valid.csv``. Returns the dataset
    folder."""
    top = root / dirname
    for split, n, first in (("train", n_train, 1), ("valid", n_valid, 64541)):
        rows = []
        for i in range(n):
            rel = f"{dirname}/{split}/patient{first + i:05d}/study1/view1_frontal.jpg"
            img, _ = chest(side, i)
            _save(root / rel, (img * 255).astype(np.uint8), quality=95)
            if split == "valid":
                labels = ["1.0" if (i + j) % 2 == 0 else "0.0" for j in range(len(OBSERVATIONS))]
            else:
                labels = [("1.0", "0.0", "", "-1.0")[(i + j) % 4] for j in range(len(OBSERVATIONS))]
            rows.append([rel, "Female", "50", "Frontal", "PA", *labels])
        with open(top / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CHEXPERT_COLUMNS)
            writer.writerows(rows)
    return top


#: The 10 observations CheXlocalize segments, as its release names them (README of rajpurkarlab/cheXlocalize).
CHEXLOCALIZE_TASKS: tuple[str, ...] = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity",
                                       "Edema", "Consolidation", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                                       "Support Devices")


def coco_rle(mask: np.ndarray) -> dict[str, object]:
    """``{"size": [h, w], "counts": str}``: pycocotools' compressed RLE, as CheXlocalize's JSON stores it."""
    from pycocotools import mask as coco_mask

    enc = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in enc["size"]], "counts": enc["counts"].decode("ascii")}


def chexlocalize_mask(task: str, shape: Sequence[int], k: int) -> np.ndarray:
    """A disc for ``task`` on radiograph ``k``: placed by the task, so each observation's mask is somewhere else."""
    h, w = shape
    j = CHEXLOCALIZE_TASKS.index(task)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = h * (0.25 + 0.5 * ((j + k) % 3) / 2), w * (0.25 + 0.5 * (j % 4) / 3)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= (min(h, w) * (0.08 + 0.02 * (j % 3))) ** 2


def make_chexlocalize(dataset_dir: Path, out: Path, scale: int = 2, lateral: bool = True) -> Path:
    """``out/gt_segmentations_val.json`` for the ``valid.csv`` of a :func:`make_chexpert_small` tree, in the release's
    format: every radiograph, all 10 tasks, an RLE at the full-size image's size (``scale`` x the small image's, as
    CheXpert-v1.0 is to CheXpert-v1.0-small), non-empty exactly where the label is positive; plus (``lateral``) one
    lateral view that the frontal-only datalist does not hold. Returns the JSON path."""
    import json

    from PIL import Image

    gt: dict[str, dict[str, object]] = {}
    with open(dataset_dir / "valid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for k, row in enumerate(rows):
        rel = Path(row["Path"])
        with Image.open(dataset_dir.parent / rel) as im:
            w, h = im.size
        shape = (h * scale, w * scale)
        cxr_id = "_".join(rel.with_suffix("").parts[-3:])
        gt[cxr_id] = {t: coco_rle(chexlocalize_mask(t, shape, k) if row[t] == "1.0" else np.zeros(shape, bool))
                      for t in CHEXLOCALIZE_TASKS}
    if lateral:
        first = next(iter(gt))
        gt[first.replace("view1_frontal", "view2_lateral")] = dict(gt[first])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gt_segmentations_val.json"
    path.write_text(json.dumps(gt))
    return path


#: The columns of CheXpert's ``test_labels.csv`` as the CheXlocalize release ships it: ``Path`` (relative to the CSV's
#: folder) and the 14 labels; no Sex, Age, Frontal/Lateral or AP/PA.
TEST_LABELS_COLUMNS: tuple[str, ...] = ("Path", *OBSERVATIONS)


def make_chexlocalize_release(dataset_dir: Path, out: Path, n_test: int = 6, side: int = 64) -> Path:
    """The CheXlocalize release folder as downloaded, for the ``valid.csv`` of a :func:`make_chexpert_small` tree::

        out/CheXlocalize/gt_segmentations_val.json      (:func:`make_chexlocalize`: valid.csv, full-size masks)
        out/CheXlocalize/gt_segmentations_test.json     (the test radiographs, masks at the image's size)
        out/CheXpert/test_labels.csv                    (:data:`TEST_LABELS_COLUMNS`; 0/1 labels, every observation
                                                         both positive and negative)
        out/CheXpert/test/patient647NN/study1/view1_frontal.jpg   (+ one lateral view, listed in the CSV)

    Test patients are patient64741 on, as in CheXpert. Returns ``out``."""
    import json

    make_chexlocalize(dataset_dir, out / "CheXlocalize", scale=2, lateral=True)
    test_dir = out / "CheXpert"
    rows, gt = [], {}
    for i in range(n_test):
        rel = f"test/patient{64741 + i:05d}/study1/view1_frontal.jpg"
        img, _ = chest(side, 50 + i)
        _save(test_dir / rel, (img * 255).astype(np.uint8), quality=95)
        labels = ["1.0" if (i + j) % 2 else "0.0" for j in range(len(OBSERVATIONS))]
        rows.append([rel, *labels])
        gt["_".join(Path(rel).with_suffix("").parts[-3:])] = {
            t: coco_rle(chexlocalize_mask(t, (side, side), i) if labels[OBSERVATIONS.index(t)] == "1.0"
                        else np.zeros((side, side), bool)) for t in CHEXLOCALIZE_TASKS}
    lateral = "test/patient64741/study1/view2_lateral.jpg"
    _save(test_dir / lateral, (chest(side, 50)[0] * 255).astype(np.uint8), quality=95)
    rows.append([lateral, *rows[0][1:]])
    with open(test_dir / "test_labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TEST_LABELS_COLUMNS)
        writer.writerows(rows)
    (out / "CheXlocalize" / "gt_segmentations_test.json").write_text(json.dumps(gt))
    return out


def make_all(out: Path, chexpert: bool = True) -> Path:
    """Every dataset the end-to-end ``--data`` run uses, under ``out``, and its data file ``out/data.yaml`` (JSRT/SCR
    as two folders, QaTa-COV19-v2 by its folder, CheXpert-v1.0-small by its parent with the CheXlocalize release by
    its top folder: the segmentations of valid.csv and of CheXpert's test set, which it also holds); returns the data
    file."""
    import yaml

    scr = make_jsrt_scr(out / "jsrt_scr")
    qata = make_qata_v2(out / "qata")
    spec: dict[str, object] = {"jsrt_scr": {"images": str(scr["images"]), "masks": str(scr["masks"])},
                               "qata": str(qata)}
    if chexpert:
        top = make_chexpert_small(out / "chexpert")
        spec["chexpert"] = {"root": str(out / "chexpert"),
                            "localize": str(make_chexlocalize_release(top, out / "chexlocalize"))}
    path = out / "data.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(make_all(Path(sys.argv[1]).absolute()))

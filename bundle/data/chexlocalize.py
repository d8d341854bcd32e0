"""CheXlocalize adapter: radiologists' segmentations of CheXpert radiographs as the judge of the DoLL on real data.

CheXlocalize (Saporta et al., *Benchmarking saliency methods for chest X-ray interpretation*, Nature Machine
Intelligence 2022) holds pixel-level segmentations drawn by board-certified radiologists for 10 of the 14 CheXpert
observations on CheXpert's validation set (234 radiographs of 200 patients) and test set (668 of 500). The release
ships them as JSON files of COCO run-length encodings, exactly as downloaded::

    <chexlocalize>/gt_segmentations_val.json       (and gt_segmentations_test.json)
    {
      "patient64622_study1_view1_frontal": {
        "Enlarged Cardiomediastinum": {"size": [2320, 2828], "counts": "`Vej1Y2iU2c0B?F9G7I6J5..."},
        ...
        "Support Devices": {"size": [2320, 2828], "counts": "..."}
      },
      ...
    }

``size`` is ``[height, width]`` of the full-size image; ``counts`` is pycocotools' compressed RLE string (column-major
runs, starting with background), or the uncompressed list of run lengths; an absent finding is an all-zero mask. The
observation "Lung Opacity" is also named "Airspace Opacity" in some CheXlocalize files; both map to "Lung Opacity".

With ``chexpert: {root: ..., localize: <file or folder>}`` in the data file (:mod:`bundle.data.userdata`) the data
stage reads the JSON, matches every radiograph to the CheXpert datalist item of the same ``patient/study/view``
(CheXpert's patient ids are unique across its splits: the validation set's are patient64541-64740), and writes one
lesion bit mask per matched radiograph (uint16 PNG at the mask's own size, bit ``k`` = ``OBSERVATIONS[k]``, the
phantom's lesion format) under ``<datalists>/chexlocalize/``; the items get ``lesion`` and ``lesion_source``. The
DoLL quality stage (``configs/evaluate_doll.yaml``) then scores DoLL, Grad-CAM and single-classifier IG against the
radiologists on the split that holds them (CheXpert's ``valid.csv`` is the datalist's ``test`` section). Masks are
resized to the network's grid with the image (both span the whole radiograph), so a downsampled
``CheXpert-v1.0-small`` image is matched to its full-size mask.

The RLE decoder is this module's own (numpy; no C extension at run time); the tests check it against pycocotools,
the library CheXlocalize encoded its files with.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import OBSERVATIONS
from ..utils import BundleInputError, PathLike

__all__ = [
    "CHEXLOCALIZE_TASKS", "GT_FILES", "LESION_SOURCE", "rle_counts", "decode_rle", "parse_cxr_id", "cxr_key",
    "CheXlocalize", "find_chexlocalize_files", "find_release_test", "read_chexlocalize",
    "attach_chexlocalize", "write_chexlocalize_masks",
]

logger = logging.getLogger(__name__)

#: CheXlocalize task name -> CheXpert observation (the 10 localised observations; "Airspace Opacity" is the name
#: some CheXlocalize files use for CheXpert's "Lung Opacity").
CHEXLOCALIZE_TASKS: dict[str, str] = {
    "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
    "Cardiomegaly": "Cardiomegaly",
    "Lung Opacity": "Lung Opacity",
    "Airspace Opacity": "Lung Opacity",
    "Lung Lesion": "Lung Lesion",
    "Edema": "Edema",
    "Consolidation": "Consolidation",
    "Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax",
    "Pleural Effusion": "Pleural Effusion",
    "Support Devices": "Support Devices",
}
#: The ground-truth files of the CheXlocalize release, searched in this order when a folder is given.
GT_FILES: tuple[str, ...] = ("gt_segmentations_val.json", "gt_segmentations_test.json")
#: The ``lesion_source`` of the items whose lesion masks come from CheXlocalize.
LESION_SOURCE = "CheXlocalize"
_ID_RE = re.compile(r"^(patient\d+)_(study\d+)_(view\d+_[A-Za-z]+)$")
_PATH_RE = re.compile(r"(patient\d+)[/\\](study\d+)[/\\](view\d+_[A-Za-z]+)\.[^/\\]+$")


def rle_counts(counts: str | Sequence[int]) -> np.ndarray:
    """Run lengths of a COCO RLE: the compressed string of pycocotools (``rleFrString`` of its ``maskApi.c``: each
    count in 5-bit groups, least significant first, as characters from ``'0'``, bit 5 = more groups follow, the
    last group's bit 4 = negative; from the third count on each is stored as the difference to the count two
    before) or an uncompressed list of ints.

    Raises:
        ValueError: on a character outside the code, a string that ends inside a count, or a negative run.
    """
    if not isinstance(counts, str):
        out = np.asarray(list(counts), dtype=np.int64)
        if out.ndim != 1 or (out < 0).any():
            raise ValueError("uncompressed RLE counts must be a flat list of non-negative ints")
        return out
    values: list[int] = []
    x = shift = 0
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise ValueError(f"character {ch!r} is not in the COCO RLE code")
        x |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            x |= -1 << shift
        if len(values) > 2:
            x += values[-2]
        values.append(x)
        x = shift = 0
    if shift:
        raise ValueError("the RLE string ends inside a count")
    out = np.asarray(values, dtype=np.int64)
    if (out < 0).any():
        raise ValueError("the RLE string decodes to a negative run length")
    return out


def _checked_runs(rle: Mapping[str, Any]) -> tuple[tuple[int, int], np.ndarray]:
    """``((h, w), runs)`` of a COCO RLE, checked: ``size`` is two positive ints and the runs cover ``h * w``."""
    size = rle.get("size")
    if (not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"size must be [height, width] as two positive ints, got {size!r}")
    if "counts" not in rle:
        raise ValueError("no counts")
    h, w = int(size[0]), int(size[1])
    runs = rle_counts(rle["counts"])
    if int(runs.sum()) != h * w:
        raise ValueError(f"the runs cover {int(runs.sum())} pixels, size {h} x {w} has {h * w}")
    return (h, w), runs


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """A COCO RLE ``{"size": [h, w], "counts": ...}`` as a ``bool`` ``(h, w)`` mask (runs in column-major order,
    the first run background).

    Raises:
        ValueError: when ``size`` is not two positive ints or the runs do not cover ``h * w`` pixels exactly.
    """
    (h, w), runs = _checked_runs(rle)
    flat = np.repeat((np.arange(len(runs)) % 2).astype(bool), runs)
    return flat.reshape(w, h).T


def parse_cxr_id(cxr_id: str) -> tuple[str, str, str] | None:
    """``"patient64622_study1_view1_frontal"`` -> ``("patient64622", "study1", "view1_frontal")``; ``None`` if the
    id is not of that form."""
    m = _ID_RE.match(str(cxr_id))
    return (m.group(1), m.group(2), m.group(3)) if m else None


def cxr_key(image_path: str) -> tuple[str, str, str] | None:
    """``(patient, study, view)`` of a CheXpert image path (``.../patient64541/study1/view1_frontal.jpg``), or
    ``None``."""
    m = _PATH_RE.search(str(image_path))
    return (m.group(1), m.group(2), m.group(3)) if m else None


@dataclass
class CheXlocalize:
    """A checked CheXlocalize ground-truth file: per radiograph ``(patient, study, view)``, its mask size and the
    RLEs of each observation (index into :data:`~bundle.constants.OBSERVATIONS`) that has a non-empty mask (two when a
    file names Lung Opacity twice, as "Lung Opacity" and "Airspace Opacity": their union is the mask). ``path`` is the
    first file read, ``files`` all of them (the validation and test set's when a folder holds both)."""

    path: str
    files: list[str] = field(default_factory=list)
    masks: dict[tuple[str, str, str], dict[int, list[Mapping[str, Any]]]] = field(default_factory=dict)
    sizes: dict[tuple[str, str, str], tuple[int, int]] = field(default_factory=dict)
    radiographs: int = 0

    def __post_init__(self) -> None:
        self.files = list(self.files) or [self.path]

    def counts(self) -> dict[str, int]:
        """Radiographs with a non-empty mask, per observation name."""
        out: dict[str, int] = {}
        for obs in self.masks.values():
            for k in obs:
                out[OBSERVATIONS[k]] = out.get(OBSERVATIONS[k], 0) + 1
        return {n: out[n] for n in OBSERVATIONS if n in out}

    def bitmask(self, key: tuple[str, str, str]) -> np.ndarray:
        """The uint16 ``(h, w)`` lesion bit mask of one radiograph (:func:`bundle.data.io.encode_bitmask` layout)."""
        h, w = self.sizes[key]
        out = np.zeros((h, w), dtype=np.uint16)
        for k, rles in self.masks.get(key, {}).items():
            for rle in rles:
                out |= decode_rle(rle).astype(np.uint16) << k
        return out


def find_chexlocalize_files(path: PathLike) -> list[Path]:
    """The ground-truth JSON files: ``[path]`` when it is a file, else every one of :data:`GT_FILES` in the folder or
    in its ``CheXlocalize/`` subfolder (the release's top folder holds ``CheXlocalize/`` and ``CheXpert/``).

    Raises:
        BundleInputError: when there is none.
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return [p]
    if p.is_dir():
        for folder in (p, p / "CheXlocalize"):
            found = [folder / name for name in GT_FILES if (folder / name).is_file()]
            if found:
                return found
        raise BundleInputError(p, f"no CheXlocalize ground truth in the folder or its CheXlocalize/ subfolder "
                                  f"(expected {' and/or '.join(GT_FILES)})")
    raise BundleInputError(p, "CheXlocalize file or folder not found")


def find_release_test(path: PathLike) -> Path | None:
    """The folder of CheXpert's test set in the CheXlocalize release whose top folder, or ``CheXlocalize/`` folder,
    ``path`` is: ``<top>/CheXpert`` when it holds ``test_labels.csv``; else ``None``. A file (one ground-truth JSON
    named as ``chexpert.localize``) gives ``None``: it is taken as the user's choice of ground truth, and the test set
    is then added with ``chexpert.test``."""
    p = Path(os.path.expanduser(str(path))).absolute()
    if not p.is_dir():
        return None
    for top in (p, p.parent):
        if (top / "CheXpert" / "test_labels.csv").is_file():
            return top / "CheXpert"
    return None


def read_chexlocalize(path: PathLike) -> CheXlocalize:
    """Read and check CheXlocalize's ground truth: one JSON file, or every one in the folder given (the validation and
    the test set's, see :func:`find_chexlocalize_files`), merged (a radiograph in two files is an error: the sets are
    disjoint).

    Every entry is checked without painting a mask: the id is ``patient<N>_study<N>_view<N>_<frontal|lateral>``, the
    task names are known (:data:`CHEXLOCALIZE_TASKS`), each RLE decodes and covers its ``size`` exactly, and one
    radiograph's masks share a size. All-zero masks (the release's absent findings) are dropped.

    Raises:
        BundleInputError: naming the file, the radiograph and the task at fault.
    """
    files = find_chexlocalize_files(path)
    out = _read_one(files[0])
    for other in files[1:]:
        more = _read_one(other)
        both = sorted("_".join(k) for k in set(more.sizes) & set(out.sizes))
        if both:
            raise BundleInputError(other, f"radiograph {both[0]} is also in {out.path} ({len(both)} shared): the "
                                          "validation and test files must not share radiographs")
        out.masks.update(more.masks)
        out.sizes.update(more.sizes)
        out.radiographs += more.radiographs
        out.files.extend(more.files)
    return out


def _read_one(gt_path: Path) -> CheXlocalize:
    """One ground-truth JSON, checked (see :func:`read_chexlocalize`)."""
    try:
        raw = json.loads(gt_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleInputError(gt_path, f"not valid JSON ({e})") from None
    if not isinstance(raw, Mapping):
        raise BundleInputError(gt_path, f"expected a mapping of radiograph ids, got {type(raw).__name__}")
    index = {name: i for i, name in enumerate(OBSERVATIONS)}
    out = CheXlocalize(path=str(gt_path))
    for cxr_id, tasks in raw.items():
        key = parse_cxr_id(cxr_id)
        if key is None:
            raise BundleInputError(gt_path, f"radiograph id {cxr_id!r} is not of the form "
                                            "patient<N>_study<N>_view<N>_<frontal|lateral>")
        if not isinstance(tasks, Mapping):
            raise BundleInputError(gt_path, f"{cxr_id}: expected a mapping of tasks, got {type(tasks).__name__}")
        out.radiographs += 1
        size: tuple[int, int] | None = None
        for task, rle in tasks.items():
            if task not in CHEXLOCALIZE_TASKS:
                raise BundleInputError(gt_path, f"{cxr_id}: unknown task {task!r}; known: "
                                                f"{', '.join(CHEXLOCALIZE_TASKS)}")
            if not isinstance(rle, Mapping):
                raise BundleInputError(gt_path, f"{cxr_id} / {task}: expected an RLE mapping with size and counts")
            try:
                this, runs = _checked_runs(rle)
            except ValueError as e:
                raise BundleInputError(gt_path, f"{cxr_id} / {task}: bad RLE ({e})") from None
            if size is not None and this != size:
                raise BundleInputError(gt_path, f"{cxr_id} / {task}: size {list(this)} differs from the radiograph's "
                                                f"other masks ({list(size)})")
            size = this
            if int(runs[1::2].sum()) > 0:  # a non-empty mask (the odd runs are foreground)
                out.masks.setdefault(key, {}).setdefault(index[CHEXLOCALIZE_TASKS[task]], []).append(rle)
        if size is not None:
            out.sizes[key] = size
    return out


def attach_chexlocalize(datalist: Mapping[str, list[dict[str, Any]]], gt: CheXlocalize,
                        lesion_dir: PathLike) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Point the datalist items whose radiograph has a CheXlocalize mask at their lesion bit mask (``lesion``, a PNG
    under ``lesion_dir`` written by :func:`write_chexlocalize_masks`) and mark them (``lesion_source``).

    Items are matched by ``patient/study/view`` in their image path. Returns ``(summary, matched)``: the summary holds
    the file, the radiographs in it, the items matched per datalist section, the radiographs with masks that match no
    item (e.g. lateral views under the frontal-only datalist, or images not downloaded) and the masks per
    observation; ``matched`` lists the radiographs given to items (the masks :func:`write_chexlocalize_masks` must
    write)."""
    lesion_dir = Path(lesion_dir)
    matched: dict[str, int] = {}
    seen: set[tuple[str, str, str]] = set()
    for section, items in datalist.items():
        for item in items:
            key = cxr_key(item.get("image", ""))
            if key is None or key not in gt.masks:
                continue
            item["lesion"] = str(lesion_dir / key[0] / key[1] / f"{key[2]}.png")
            item["lesion_source"] = LESION_SOURCE
            matched[section] = matched.get(section, 0) + 1
            seen.add(key)
    unmatched = sorted("_".join(k) for k in gt.masks if k not in seen)
    if unmatched:
        logger.warning("%s: %d radiograph(s) with masks match no datalist item (first: %s)", gt.path, len(unmatched),
                       ", ".join(unmatched[:5]))
    if not seen:
        raise BundleInputError(gt.path, "no radiograph of this CheXlocalize file is in the CheXpert datalist (its "
                                        "ids are patient/study/view of CheXpert's valid or test images)")
    summary = {"file": gt.path, "files": list(gt.files), "radiographs": gt.radiographs,
               "with_masks": len(gt.masks), "matched": matched,
               "unmatched": len(unmatched), "unmatched_examples": unmatched[:10],
               "masks_per_observation": gt.counts(), "lesion_dir": str(lesion_dir)}
    return summary, sorted(seen)


def write_chexlocalize_masks(gt: CheXlocalize, lesion_dir: PathLike,
                             keys: Sequence[tuple[str, str, str]] | None = None) -> int:
    """Write the lesion bit mask PNG of each radiograph (``keys``; default all with masks) under ``lesion_dir``,
    each atomically. A PNG newer than the ground-truth file is kept (a re-run resumes). Returns how many were
    written."""
    from .io import save_png

    lesion_dir = Path(lesion_dir)
    source_mtime = max(os.path.getmtime(f) for f in gt.files)
    written = 0
    for key in (gt.masks if keys is None else keys):
        target = lesion_dir / key[0] / key[1] / f"{key[2]}.png"
        if target.is_file() and os.path.getmtime(target) >= source_mtime:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        save_png(target, gt.bitmask(key))
        written += 1
    return written

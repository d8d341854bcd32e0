"""Segmentation dataset adapters: JSRT/SCR, QaTa-COV19, a plain image/mask folder, and image lists for inference.

Each adapter turns one layout (``docs/DEVELOPMENT.md``; the phantom generator and the real datasets alike) into
datalist items ``{"image": abs path, "label": abs path or [abs paths], "patient": str}`` and a summary dictionary.
With ``check_files=True`` every pair is validated (:func:`check_pair`): image readable (its header, or the whole
file with ``decode_images=True``), each mask readable and of the image's size, and non-empty with
``require_nonempty=True``. ``on_error="raise"`` raises the first :class:`~bundle.utils.BundleInputError` (the
message names the file and the problem); ``on_error="skip"`` logs, counts and drops bad items.

Layouts::

    <root>/JSRT/images/<case>.png + <root>/SCR/masks/<structure>/<case>.gif    (one folder per SCR_STRUCTURES entry)
    <root>/QaTa-COV19/{Train Set,Test Set}/Images/<name>.png + .../Ground-truths/mask_<name>.png
    <root>/images/<id>.png + <root>/masks/<id>.png + <root>/cases.csv (columns id, patientid, ...)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..constants import SCR_STRUCTURES
from ..utils import BundleInputError, PathLike
from .io import (IMAGE_SUFFIXES, _check_exists, _kind, jsrt_img_shape, load_mask, load_radiograph,
                 size_mismatch_problem)
from .splits import split_datalist

__all__ = [
    "read_image_size", "check_pair", "validate_items", "scr_items", "scr_datalist", "qata_items", "qata_datalist",
    "folder_items", "folder_datalist", "read_cases_csv", "qata_patient", "image_list_items", "is_image_file",
    "structure_folder_key", "find_scr_mask_dirs", "covid_qu_ex_items", "covid_qu_ex_datalist", "reconcile_splits",
]

logger = logging.getLogger(__name__)

ON_ERROR: tuple[str, ...] = ("raise", "skip")
#: How many skipped items are logged one by one (the rest only counted).
MAX_LOGGED = 10
#: Validation of this many items or more shows a progress bar.
PROGRESS_MIN_ITEMS = 500
JSRT_IMAGES = "JSRT/images"
SCR_MASKS = "SCR/masks"
QATA_DIRNAME = "QaTa-COV19"
#: Top folders of QaTa-COV19 releases, searched in this order (v2 as downloaded, then the phantom's name).
QATA_DIRNAMES: tuple[str, ...] = ("QaTa-COV19-v2", "QaTa-COV19")
COVID_QU_EX_DIRNAME = "Infection Segmentation Data"
COVID_QU_EX_SPLITS: dict[str, str] = {"Train": "training", "Val": "validation", "Test": "test"}
COVID_QU_EX_CLASSES: tuple[str, ...] = ("COVID-19", "Non-COVID", "Normal")
QATA_SUBSETS: tuple[str, str] = ("Train Set", "Test Set")
MASK_PREFIX = "mask_"
#: Suffixes of SCR mask files, preferred first.
MASK_SUFFIXES: tuple[str, ...] = (".gif", ".png", ".bmp", ".tif", ".tiff")
_BIMCV_SUBJECT = re.compile(r"^(sub-[A-Za-z0-9]+)")
#: Patient ids carried by the names of the sources of QaTa-COV19 and COVID-QU-Ex: BIMCV subjects
#: (``sub-S01234_ses-...``), the pediatric pneumonia set's ``person123_bacteria_456`` and ``[NORMAL2-]IM-0115-0001``.
_NAME_PATIENT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (_BIMCV_SUBJECT, "{0}"),
    (re.compile(r"^(person\d+)_", re.IGNORECASE), "{0}"),
    (re.compile(r"^(?:NORMAL2-)?IM-(\d+)-\d+", re.IGNORECASE), "IM-{0}"),
)


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _files_by_stem(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, str]:
    """``{stem: absolute path}`` of the image files in ``folder`` (first suffix in ``suffixes`` order wins)."""
    if not folder.is_dir():
        raise BundleInputError(folder, "folder not found")
    rank = {s: k for k, s in enumerate(suffixes)}
    longest_first = sorted(suffixes, key=len, reverse=True)  # ".nii.gz" before ".gz"-like shorter suffixes
    found: dict[str, tuple[int, str]] = {}
    for entry in os.scandir(folder):
        low = entry.name.lower()
        suffix = next((s for s in longest_first if low.endswith(s)), None)
        if suffix is None or not entry.is_file():
            continue
        stem = entry.name[: -len(suffix)]
        if stem not in found or rank[suffix] < found[stem][0]:
            found[stem] = (rank[suffix], os.path.abspath(entry.path))
    return {k: found[k][1] for k in sorted(found)}


def is_image_file(path: PathLike) -> bool:
    """Whether ``path`` is a file with an image suffix, or a DICOM file without one (``DICM`` magic)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.name.lower().endswith(IMAGE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image_size(path: PathLike) -> tuple[int, int]:
    """``(H, W)`` of an image from its header only (PIL, DICOM, NIfTI): cheap, no pixel decoding.

    Raises:
        BundleInputError: missing, empty, unsupported or unreadable file.
    """
    path = Path(path)
    _check_exists(path)
    kind = _kind(path)
    try:
        if kind == "pil":
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(path) as im:
                    w, h = im.size
            except UnidentifiedImageError:
                raise BundleInputError(path, "not a readable image (unidentified or corrupt content)") from None
            return int(h), int(w)
        if kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        if kind == "jsrt":
            return jsrt_img_shape(path)
        import nibabel as nib

        shape = nib.load(str(path)).shape
        return int(shape[1]), int(shape[0])  # NIfTI stores (X, Y): H = Y, W = X (see bundle.data.io)
    except BundleInputError:
        raise
    except Exception as e:  # PIL/pydicom/nibabel raise many types on corrupt headers
        raise BundleInputError(path, f"unreadable image header ({type(e).__name__}: {e})") from None


def check_pair(
    image: PathLike, label: PathLike | Sequence[PathLike] | None = None, require_nonempty: bool = False,
    decode_images: bool = False,
) -> None:
    """Validate one item: the image is readable and every mask in ``label`` is readable, of the image's size or of
    another size with the image's aspect ratio (the image is then resampled to the masks' grid when loaded:
    :class:`~bundle.transforms.LoadMaskd`), the masks of one item of one size, and (with
    ``require_nonempty``) non-empty.

    Args:
        image: the image file; its size comes from the header unless ``decode_images`` (then the whole file is
            decoded, which also catches truncated files).
        label: one mask file or a list of them (``None``: image only).
        require_nonempty: an empty mask is an error.

    Raises:
        BundleInputError: naming the bad file (and, for a size mismatch, both files).
    """
    if decode_images:
        size = tuple(load_radiograph(image)[0].shape)
    else:
        size = read_image_size(image)
    if label is None:
        return
    first: tuple[tuple[int, ...], PathLike] | None = None
    for mask_path in [label] if isinstance(label, (str, os.PathLike)) else list(label):
        mask = load_mask(mask_path, required_nonempty=require_nonempty)
        problem = size_mismatch_problem(size, mask.shape)
        if problem:
            raise BundleInputError(mask_path, f"{problem} (image {image})")
        if first is not None and tuple(mask.shape) != first[0]:
            raise BundleInputError(mask_path, f"mask size {tuple(mask.shape)} differs from the size {first[0]} of "
                                              f"the item's other mask {first[1]} (sizes are (H, W))")
        first = first or (tuple(mask.shape), mask_path)


class _Skipper:
    """Collects the errors of ``on_error="skip"``: logs the first few, counts all."""

    def __init__(self, on_error: str, what: str):
        _check_on_error(on_error)
        self.on_error = on_error
        self.what = what
        self.errors: list[str] = []
        self.count = 0

    def handle(self, err: BundleInputError) -> None:
        if self.on_error == "raise":
            raise err
        self.count += 1
        if self.count <= MAX_LOGGED:
            self.errors.append(str(err))
            logger.warning("%s: skipping: %s", self.what, err)
        elif self.count == MAX_LOGGED + 1:
            logger.warning("%s: more skipped items are counted but not listed", self.what)


def validate_items(
    items: Sequence[Mapping[str, Any]],
    require_nonempty: bool = False,
    decode_images: bool = False,
    on_error: str = "raise",
    image_key: str = "image",
    label_key: str = "label",
    what: str = "datalist",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run :func:`check_pair` on every item; returns ``(kept items, {"skipped": n, "errors": [...]})``.

    A progress bar (tqdm, on stderr) shows for lists of at least :data:`PROGRESS_MIN_ITEMS` items.
    """
    from tqdm.auto import tqdm

    skipper = _Skipper(on_error, what)
    kept: list[dict[str, Any]] = []
    for item in tqdm(items, desc=f"checking {what}", unit="item", disable=len(items) < PROGRESS_MIN_ITEMS):
        try:
            check_pair(item[image_key], item.get(label_key), require_nonempty, decode_images)
        except BundleInputError as e:
            skipper.handle(e)
            continue
        kept.append(dict(item))
    return kept, {"skipped": skipper.count, "errors": skipper.errors}


def _finish(items: list[dict[str, Any]], skipper: _Skipper, check_files: bool, require_nonempty: bool,
            decode_images: bool, on_error: str, what: str, **extra: Any) -> tuple[list[dict[str, Any]], dict]:
    """Validate (optionally) and summarise the items of one adapter."""
    checked: dict[str, Any] = {"skipped": 0, "errors": []}
    if check_files:
        items, checked = validate_items(items, require_nonempty, decode_images, on_error, what=what)
    summary = {
        "items": len(items), "patients": len({it["patient"] for it in items}),
        "skipped": skipper.count + checked["skipped"], "errors": skipper.errors + checked["errors"],
        "checked": bool(check_files), **extra,
    }
    return items, summary


def _find_dir(root: PathLike, dirname: str | Sequence[str], marker: str) -> Path:
    """``root/<dirname>`` (the first of several names) if it holds ``marker``, else ``root`` if it does."""
    root = Path(root)
    names = [dirname] if isinstance(dirname, str) else list(dirname)
    for cand in [*(root / n for n in names), root]:
        if (cand / marker).exists():
            return cand
    raise BundleInputError(root / names[0] / marker, f"{names[0]} layout not found under {root}")


def _child(folder: Path, name: str) -> Path:
    """``folder/name``, or the sub-folder whose name matches it ignoring case, spaces, ``_`` and ``-``."""
    exact = folder / name
    if exact.is_dir():
        return exact
    key = structure_folder_key(name)
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and structure_folder_key(entry.name) == key:
                return entry
    raise BundleInputError(exact, "folder not found")


def patient_from_name(name: str) -> str | None:
    """The patient id an image name carries (BIMCV ``sub-S01234``, ``person123``, ``IM-0115``), else ``None``."""
    for pattern, fmt in _NAME_PATIENT_PATTERNS:
        m = pattern.match(name)
        if m:
            return fmt.format(m.group(1))
    return None


def patient_grouping_note(names: Sequence[str]) -> str:
    """What the summary says about patient identity for image ``names`` (see :func:`patient_from_name`)."""
    n = len(names)
    with_id = sum(patient_from_name(x) is not None for x in names)
    if with_id == 0:
        return f"the {n} image names carry no patient id: each image is its own patient (split by image)"
    note = (f"{with_id} of {n} image names carry a patient id (BIMCV sub-..., person..., IM-...): grouped by patient, "
            f"no such patient is in two splits")
    if with_id < n:
        note += f"; the other {n - with_id} carry none: each is its own patient (split by image)"
    return note


def reconcile_splits(sections: Mapping[str, Sequence[Mapping[str, Any]]],
                     order: Sequence[str] = ("training", "validation", "test")) -> tuple[dict[str, list[dict]], dict]:
    """Move every patient found in several sections of a dataset's own split wholly into one: the section holding
    most of their images, ties going to the later of ``order`` (the held-out side). Returns the sections and
    ``{"patients_moved": n, "images_moved": n}``."""
    where: dict[str, dict[str, int]] = {}
    for name in order:
        for it in sections.get(name, []):
            counts = where.setdefault(str(it["patient"]), {})
            counts[name] = counts.get(name, 0) + 1
    target = {p: max(c, key=lambda k: (c[k], order.index(k))) for p, c in where.items() if len(c) > 1}
    out: dict[str, list[dict]] = {name: [] for name in order}
    moved = 0
    for name in order:
        for it in sections.get(name, []):
            dest = target.get(str(it["patient"]), name)
            moved += dest != name
            out[dest].append(dict(it))
    if target:
        logger.warning("%d patient(s) were in several sections of the dataset's own split; moved %d image(s) so that "
                       "each patient is in one section", len(target), moved)
    return out, {"patients_moved": len(target), "images_moved": moved}


# ----------------------------------------------------------------------------------------------------------- SCR
#: Image suffixes of JSRT images, preferred first when one case has several files (the original ``.IMG`` wins).
JSRT_IMAGE_SUFFIXES: tuple[str, ...] = (".img", ".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".gif", ".dcm",
                                        ".dicom", ".nii.gz", ".nii")
#: Folders never searched for JSRT images (SCR's landmark files, and the structure folders themselves).
_NOT_IMAGE_DIRS = ("landmarks", "points")
#: Note on patient identity in every JSRT/SCR summary.
SCR_PATIENT_NOTE = ("JSRT case names (JPCLN001, ...) carry no patient id: each image is its own patient (split by "
                    "image)")


def structure_folder_key(name: str) -> str:
    """A folder name normalised for matching SCR structure folders: lower case, runs of spaces, ``_`` and ``-`` as
    one space (``left lung``, ``Left_Lung``, ``left-lung`` all give ``left lung``)."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()


def _case_key(stem: str) -> str:
    return stem.strip().upper()


def _walk_files(top: Path, suffixes: Sequence[str], skip_dir: Any = None) -> dict[str, list[Path]]:
    """``{case key: [files]}`` of the files under ``top`` (recursive, sorted) whose name ends with one of
    ``suffixes`` (case-insensitive); ``skip_dir(path)`` prunes folders."""
    longest_first = sorted(suffixes, key=len, reverse=True)
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (skip_dir and skip_dir(Path(dirpath) / d)))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            low = fn.lower()
            suffix = next((x for x in longest_first if low.endswith(x)), None)
            if suffix is not None:
                found.setdefault(_case_key(fn[: -len(suffix)]), []).append(Path(dirpath) / fn)
    return found


def _pick(case: str, files: list[Path], suffixes: Sequence[str], what: str) -> Path:
    """The preferred file of one case (first suffix of ``suffixes``); two files of the same rank are ambiguous."""
    rank = {x: k for k, x in enumerate(suffixes)}

    def rank_of(p: Path) -> int:
        low = p.name.lower()
        return min(k for x, k in rank.items() if low.endswith(x))

    files = sorted(files, key=lambda p: (rank_of(p), str(p)))
    if len(files) > 1 and rank_of(files[0]) == rank_of(files[1]):
        raise BundleInputError(files[1], f"{what} of case {case} found twice: also {files[0]} (remove one copy)")
    return files[0]


def find_scr_mask_dirs(masks_root: PathLike, structures: Sequence[str] = SCR_STRUCTURES) -> dict[str, list[Path]]:
    """The folders of each SCR structure under ``masks_root`` (searched recursively), matched by
    :func:`structure_folder_key`: the official archive's ``masks/left lung`` (below ``scratch/fold1/``,
    ``scratch/fold2/``, ``SCR/``, ... : every fold counts) and common copies' ``left_lung``, ``Left-Lung``, ...

    Raises:
        BundleInputError: ``masks_root`` missing, or a structure without any folder (the message lists the
            folders expected).
    """
    masks_root = Path(masks_root)
    if not masks_root.is_dir():
        raise BundleInputError(masks_root, "SCR mask folder not found")
    wanted = {structure_folder_key(s): s for s in structures}
    found: dict[str, list[Path]] = {s: [] for s in structures}
    for dirpath, dirnames, _ in os.walk(masks_root):
        dirnames.sort()
        for d in list(dirnames):
            key = structure_folder_key(d)
            if key in wanted:
                found[wanted[key]].append(Path(dirpath) / d)
                dirnames.remove(d)  # a structure folder holds masks, not more structure folders
    missing = [s for s in structures if not found[s]]
    if missing:
        raise BundleInputError(masks_root / missing[0], f"no SCR mask folder for structure {missing} under "
                                                        f"{masks_root} (expected folders named e.g. "
                                                        f"'{missing[0]}', '{missing[0].replace(' ', '_')}')")
    return found


def _resolve_scr_roots(root: PathLike | None, images_dir: PathLike | None, masks_dir: PathLike | None,
                       images_subdir: str, masks_subdir: str) -> tuple[Path, Path, bool]:
    """``(images folder, masks folder, images share the masks' tree)`` from one root and/or explicit folders."""
    if images_dir is None and root is None:
        raise ValueError("give `root` or `images_dir` (with `masks_dir`)")
    if masks_dir is None and root is None:
        raise ValueError("give `root` or `masks_dir`")
    base = Path(root) if root is not None else None
    if images_dir is None:
        assert base is not None
        images = base / images_subdir if (base / images_subdir).is_dir() else base
    else:
        images = Path(images_dir)
    if masks_dir is None:
        assert base is not None
        masks = base / masks_subdir if (base / masks_subdir).is_dir() else base
    else:
        masks = Path(masks_dir)
    if not images.is_dir():
        raise BundleInputError(images, "JSRT image folder not found")
    if not masks.is_dir():
        raise BundleInputError(masks, "SCR mask folder not found")
    shared = images.resolve() == masks.resolve() or masks.resolve() in images.resolve().parents \
        or images.resolve() in masks.resolve().parents
    return images, masks, shared


def scr_items(
    root: PathLike | None = None,
    structures: Sequence[str] = SCR_STRUCTURES,
    images_subdir: str = JSRT_IMAGES,
    masks_subdir: str = SCR_MASKS,
    check_files: bool = True,
    require_nonempty: bool = True,
    decode_images: bool = False,
    on_error: str = "raise",
    images_dir: PathLike | None = None,
    masks_dir: PathLike | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """JSRT images with their SCR masks: ``label`` is the list of the per-structure mask paths, in ``structures``
    order (default :data:`~bundle.constants.SCR_STRUCTURES`). Each JSRT case is its own patient (the names carry no
    patient id; the summary says so).

    Layouts read as the datasets are downloaded (no conversion):

    - images: the original JSRT ``.IMG`` files (2048 x 2048, :mod:`bundle.data.io`) or conversions (PNG, ...) of any
      size, anywhere below the image folder (e.g. ``All247images/``), matched to masks by case name, any case;
      where a case has both, the ``.IMG`` is used;
    - masks: SCR's structure folders as the archive names them (``left lung``, ``right lung``, ``heart``,
      ``left clavicle``, ``right clavicle``) or as copies do (``left_lung``, ``Left-Lung``, ...), below any top
      folders (``scratch/fold1/masks/``, ``masks/``, ``SCR/masks/``; the folds are merged), GIF (SCR: 1024 x 1024)
      or PNG/BMP/TIFF.

    Image and masks of different sizes with the same aspect ratio are valid (JSRT 2048 with SCR 1024 is the normal
    case): the image is resampled to the masks' grid when loaded (:class:`bundle.transforms.LoadMaskd`).

    Args:
        root: one folder holding both (``JSRT/images`` + ``SCR/masks`` as the phantom writes them, or any tree:
            images are then the image files outside the structure and landmark folders).
        images_dir, masks_dir: the two folders given apart (each overrides what ``root`` gives).

    Raises:
        BundleInputError: no image, a structure without a mask folder, a case found twice, or (with
            ``on_error="raise"``) a case without the mask of a structure, a mask without its image (the message
            names the file) or a bad pair.
    """
    skipper = _Skipper(on_error, f"SCR {root if root is not None else images_dir}")
    images_root, masks_root, shared = _resolve_scr_roots(root, images_dir, masks_dir, images_subdir, masks_subdir)
    mask_dirs = find_scr_mask_dirs(masks_root, structures)
    structure_dirs = {p.resolve() for dirs in mask_dirs.values() for p in dirs}

    def skip_dir(p: Path) -> bool:
        return (p.resolve() in structure_dirs or structure_folder_key(p.name) in _NOT_IMAGE_DIRS
                or (shared and p.resolve() == masks_root.resolve() and masks_root.resolve() != images_root.resolve()))

    image_files = _walk_files(images_root, JSRT_IMAGE_SUFFIXES, skip_dir)
    if not image_files:
        raise BundleInputError(images_root, "no JSRT images found (.IMG, .png, ... below this folder)")
    images = {case: _pick(case, files, JSRT_IMAGE_SUFFIXES, "JSRT image") for case, files in image_files.items()}
    masks: dict[str, dict[str, Path]] = {}
    for s in structures:
        files: dict[str, list[Path]] = {}
        for d in mask_dirs[s]:
            for case, fs in _walk_files(d, MASK_SUFFIXES).items():
                files.setdefault(case, []).extend(fs)
        masks[s] = {case: _pick(case, fs, MASK_SUFFIXES, f"SCR mask '{s}'") for case, fs in files.items()}
    orphans = sorted({c for s in structures for c in masks[s]} - set(images))
    for case in orphans:
        some = next(masks[s][case] for s in structures if case in masks[s])
        skipper.handle(BundleInputError(some, f"no JSRT image of case {case} under {images_root} for this mask"))
    items: list[dict[str, Any]] = []
    for case, image in images.items():
        missing = [s for s in structures if case not in masks[s]]
        if missing:
            skipper.handle(BundleInputError(
                mask_dirs[missing[0]][0] / f"{case}.gif",
                f"case {case}: missing mask for structure '{missing[0]}'"
                + (f" (and {missing[1:]})" if len(missing) > 1 else "") + f" (image {image})"))
            continue
        items.append({"image": os.path.abspath(image), "label": [os.path.abspath(masks[s][case]) for s in structures],
                      "patient": case})
    formats = sorted({Path(it["image"]).suffix.lower() for it in items})
    return _finish(items, skipper, check_files, require_nonempty, decode_images, on_error,
                   f"SCR {images_root}", structures=list(structures), images_dir=str(images_root.resolve()),
                   mask_dirs={s: [str(p) for p in mask_dirs[s]] for s in structures}, image_formats=formats,
                   patient_grouping=SCR_PATIENT_NOTE)


def scr_datalist(
    root: PathLike | None = None,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    **kwargs: Any,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """SCR datalist: training/validation/test by patient (``fractions``); ``kwargs`` go to :func:`scr_items`."""
    items, summary = scr_items(root, **kwargs)
    datalist = split_datalist(items, list(fractions), ("training", "validation", "test"), seed=seed)
    summary.update({k: len(v) for k, v in datalist.items()}, fractions=list(fractions), seed=seed)
    return datalist, summary


# -------------------------------------------------------------------------------------------------------- QaTa
def qata_patient(name: str) -> str:
    """Patient of a QaTa/COVID-QU-Ex image name: the id the name carries (:func:`patient_from_name`: BIMCV subject
    ``sub-S01234``, ``person123``, ``IM-0115``) when it has one, else the name itself (one image per patient)."""
    return patient_from_name(name) or name


def qata_items(
    root: PathLike,
    subset: str = "Train Set",
    check_files: bool = True,
    require_nonempty: bool = False,
    decode_images: bool = False,
    on_error: str = "raise",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """QaTa-COV19 items of one subset: ``Images/<name>.png`` paired with ``Ground-truths/mask_<name>.png``.

    Args:
        root: the folder that holds ``QaTa-COV19`` (or ``QaTa-COV19`` itself).
        subset: ``"Train Set"`` or ``"Test Set"``.

    Raises:
        BundleInputError: layout not found, or (``on_error="raise"``) an image without its mask or a bad pair.
    """
    base = _find_dir(root, QATA_DIRNAMES, subset) / subset
    skipper = _Skipper(on_error, f"QaTa {base}")
    images = _files_by_stem(base / "Images")
    masks = _files_by_stem(base / "Ground-truths")
    items: list[dict[str, Any]] = []
    for name, image in images.items():
        mask = masks.get(MASK_PREFIX + name)
        if mask is None:
            skipper.handle(BundleInputError(base / "Ground-truths" / f"{MASK_PREFIX}{name}.png",
                                            f"mask not found for image {image}"))
            continue
        items.append({"image": image, "label": mask, "patient": qata_patient(name)})
    orphans = sorted(set(masks) - {MASK_PREFIX + n for n in images})
    if orphans:
        logger.warning("QaTa %s: %d masks without an image (ignored), e.g. %s", base, len(orphans), orphans[0])
    return _finish(items, skipper, check_files, require_nonempty, decode_images, on_error, f"QaTa {base}",
                   subset=subset, patient_grouping=patient_grouping_note([Path(it["image"]).stem for it in items]))


def qata_datalist(
    root: PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """QaTa datalist: ``Train Set`` split by patient into training/validation, ``Test Set`` (if any) as test."""
    train, s_train = qata_items(root, "Train Set", **kwargs)
    test: list[dict[str, Any]] = []
    s_test: dict[str, Any] | None = None
    try:
        _find_dir(root, QATA_DIRNAMES, "Test Set")
    except BundleInputError:
        logger.warning("QaTa %s: no Test Set, the test section is empty", root)
    else:
        test, s_test = qata_items(root, "Test Set", **kwargs)
    split = split_datalist(train, {"training": 1.0 - val_fraction, "validation": val_fraction}, seed=seed)
    datalist, moved = reconcile_splits({"training": split["training"], "validation": split["validation"],
                                        "test": test})
    names = [Path(it["image"]).stem for it in train + test]
    summary = {"train_set": s_train, "test_set": s_test, **{k: len(v) for k, v in datalist.items()},
               "skipped": s_train["skipped"] + (s_test["skipped"] if s_test else 0),
               "val_fraction": val_fraction, "seed": seed, "patient_grouping": patient_grouping_note(names),
               "split": "Train Set split by patient into training/validation, Test Set as test", **moved}
    return datalist, summary


# ------------------------------------------------------------------------------------------------- COVID-QU-Ex
def covid_qu_ex_items(
    root: PathLike,
    split: str = "Train",
    classes: Sequence[str] = COVID_QU_EX_CLASSES,
    check_files: bool = True,
    require_nonempty: bool = False,
    decode_images: bool = False,
    on_error: str = "raise",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """COVID-QU-Ex infection items of one of its own splits: ``<split>/<class>/images/<name>`` paired with
    ``<split>/<class>/infection masks/<name>`` (same file name). Non-COVID and Normal images have empty infection
    masks (negatives). The lung masks (``lung masks/``) are not used.

    Args:
        root: the folder that holds ``Infection Segmentation Data`` (or that folder itself).
        split: ``"Train"``, ``"Val"`` or ``"Test"``.
        classes: class folders to read (default all three).

    Raises:
        BundleInputError: a folder of the layout missing, or (``on_error="raise"``) an image without its mask or a
            bad pair (the message names the file).
    """
    base = _child(_find_dir(root, COVID_QU_EX_DIRNAME, split), split)
    skipper = _Skipper(on_error, f"COVID-QU-Ex {base}")
    items: list[dict[str, Any]] = []
    per_class: dict[str, int] = {}
    for cls in classes:
        folder = _child(base, cls)
        image_dir, mask_dir = _child(folder, "images"), _child(folder, "infection masks")
        images = _files_by_stem(image_dir)
        masks = _files_by_stem(mask_dir)
        per_class[cls] = 0
        for name, image in images.items():
            mask = masks.get(name)
            if mask is None:
                skipper.handle(BundleInputError(mask_dir / Path(image).name, f"infection mask not found for image "
                                                                             f"{image}"))
                continue
            items.append({"image": image, "label": mask, "patient": qata_patient(name), "class": cls})
            per_class[cls] += 1
        orphans = sorted(set(masks) - set(images))
        for name in orphans:
            skipper.handle(BundleInputError(masks[name], f"no image of this infection mask in {image_dir}"))
    return _finish(items, skipper, check_files, require_nonempty, decode_images, on_error, f"COVID-QU-Ex {base}",
                   split=split, classes=per_class)


def covid_qu_ex_datalist(
    root: PathLike,
    classes: Sequence[str] = COVID_QU_EX_CLASSES,
    **kwargs: Any,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """COVID-QU-Ex infection datalist with the dataset's own split (``Train`` -> training, ``Val`` -> validation,
    ``Test`` -> test); a patient that its names identify and that is in two of its splits is moved into one
    (:func:`reconcile_splits`). ``kwargs`` go to :func:`covid_qu_ex_items`."""
    sections: dict[str, list[dict[str, Any]]] = {}
    per_split: dict[str, Any] = {}
    for split, section in COVID_QU_EX_SPLITS.items():
        sections[section], per_split[split] = covid_qu_ex_items(root, split, classes, **kwargs)
    datalist, moved = reconcile_splits(sections)
    names = [Path(it["image"]).stem for v in sections.values() for it in v]
    summary = {"splits": per_split, **{k: len(v) for k, v in datalist.items()},
               "skipped": sum(s["skipped"] for s in per_split.values()), "classes": list(classes),
               "patient_grouping": patient_grouping_note(names),
               "split": "the dataset's own Train/Val/Test split", **moved}
    return datalist, summary


# ------------------------------------------------------------------------------------------------ plain folder
def read_cases_csv(csv_path: PathLike, id_column: str = "id", patient_column: str = "patientid") -> pd.DataFrame:
    """Read ``cases.csv`` (all columns as text) and check its ``id``/``patientid`` columns.

    Raises:
        BundleInputError: missing file or column, empty or duplicate ids.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise BundleInputError(csv_path, "CSV file not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise BundleInputError(csv_path, f"not a readable CSV ({e})") from None
    missing = [c for c in (id_column, patient_column) if c not in df.columns]
    if missing:
        raise BundleInputError(csv_path, f"missing column(s) {missing} (columns: {list(df.columns)})")
    ids = df[id_column].str.strip()
    if (ids == "").any():
        i = int(np.flatnonzero((ids == "").to_numpy())[0])
        raise BundleInputError(csv_path, f"row {i + 1} (line {i + 2}): empty '{id_column}'")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise BundleInputError(csv_path, f"duplicate '{id_column}' values, e.g. {dup.iloc[0]!r}")
    return df


def folder_items(
    root: PathLike,
    images_subdir: str = "images",
    masks_subdir: str = "masks",
    cases_csv: str | None = "cases.csv",
    id_column: str = "id",
    patient_column: str = "patientid",
    check_files: bool = True,
    require_nonempty: bool = False,
    decode_images: bool = False,
    on_error: str = "raise",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Items of a plain folder: ``images/<id>.<ext>`` with ``masks/<id>.<ext>``, patients from ``cases.csv``.

    Without ``cases.csv`` (or with ``cases_csv=None``) the pairs are matched by file name and each image is its own
    patient (logged). An id of the CSV whose image or mask is missing is an error (or skipped).
    """
    root = Path(root)
    skipper = _Skipper(on_error, f"folder {root}")
    images = _files_by_stem(root / images_subdir)
    masks = _files_by_stem(root / masks_subdir)
    csv_path = root / cases_csv if cases_csv else None
    if csv_path is not None and csv_path.is_file():
        df = read_cases_csv(csv_path, id_column, patient_column)
        cases = list(zip(df[id_column].str.strip(), df[patient_column].str.strip()))
    else:
        logger.warning("folder %s: no %s, pairing by file name; each image is its own patient", root, cases_csv)
        cases = [(k, k) for k in images]
    items: list[dict[str, Any]] = []
    for case, patient in cases:
        if case not in images:
            skipper.handle(BundleInputError(root / images_subdir / f"{case}.png",
                                            f"image of case {case!r} not found"))
            continue
        if case not in masks:
            skipper.handle(BundleInputError(root / masks_subdir / f"{case}.png",
                                            f"mask of case {case!r} not found (image {images[case]})"))
            continue
        items.append({"image": images[case], "label": masks[case], "patient": str(patient) or case})
    grouping = (f"patients from {cases_csv}'s '{patient_column}' column: no patient in two splits"
                if csv_path is not None and csv_path.is_file() else
                f"no {cases_csv}: the images carry no patient id, each is its own patient (split by image)")
    return _finish(items, skipper, check_files, require_nonempty, decode_images, on_error, f"folder {root}",
                   patient_grouping=grouping)


def folder_datalist(
    root: PathLike,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    **kwargs: Any,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Plain-folder datalist: training/validation/test by patient; ``kwargs`` go to :func:`folder_items`."""
    items, summary = folder_items(root, **kwargs)
    datalist = split_datalist(items, list(fractions), ("training", "validation", "test"), seed=seed)
    summary.update({k: len(v) for k, v in datalist.items()}, fractions=list(fractions), seed=seed)
    return datalist, summary


# ---------------------------------------------------------------------------------------------- inference list
def image_list_items(
    source: PathLike | Sequence[PathLike],
    recursive: bool = False,
    check_files: bool = False,
    decode_images: bool = False,
    on_error: str = "raise",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Items ``{"image": abs path}`` for inference from a folder, one file, or a list of files and folders.

    Folders contribute their PNG/JPEG/GIF/BMP/TIFF/NIfTI/DICOM files (DICOM files without a suffix too, found by
    their ``DICM`` magic), sorted; with ``recursive`` their sub-folders as well. Files named explicitly are taken
    as they are (a missing one is an error, or skipped). ``check_files`` reads each header (or the whole file with
    ``decode_images``).
    """
    skipper = _Skipper(on_error, "image list")
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[str] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            walker = (Path(d) / f for d, _, fs in os.walk(src) for f in fs) if recursive else src.iterdir()
            files.extend(sorted(os.path.abspath(p) for p in walker if is_image_file(p)))
        elif src.exists():
            files.append(os.path.abspath(src))
        else:
            skipper.handle(BundleInputError(src, "file or folder not found"))
    items = []
    for f in files:
        if check_files:
            try:
                check_pair(f, None, decode_images=decode_images)
            except BundleInputError as e:
                skipper.handle(e)
                continue
        items.append({"image": f})
    return items, {"items": len(items), "skipped": skipper.count, "errors": skipper.errors,
                   "checked": bool(check_files)}

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
QATA_SUBSETS: tuple[str, str] = ("Train Set", "Test Set")
MASK_PREFIX = "mask_"
#: Suffixes of SCR mask files, preferred first.
MASK_SUFFIXES: tuple[str, ...] = (".gif", ".png", ".bmp", ".tif", ".tiff")
_BIMCV_SUBJECT = re.compile(r"^(sub-[A-Za-z0-9]+)")


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
    :class:`~bundle.data.transforms.LoadMaskd`), the masks of one item of one size, and (with
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


def _find_dir(root: PathLike, dirname: str, marker: str) -> Path:
    """``root/dirname`` if it holds ``marker``, else ``root`` if it does."""
    root = Path(root)
    for cand in (root / dirname, root):
        if (cand / marker).exists():
            return cand
    raise BundleInputError(root / dirname / marker, f"{dirname} layout not found under {root}")


# ----------------------------------------------------------------------------------------------------------- SCR
def scr_items(
    root: PathLike,
    structures: Sequence[str] = SCR_STRUCTURES,
    images_subdir: str = JSRT_IMAGES,
    masks_subdir: str = SCR_MASKS,
    check_files: bool = True,
    require_nonempty: bool = True,
    decode_images: bool = False,
    on_error: str = "raise",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """JSRT images with their SCR masks: ``label`` is the list of the per-structure mask paths, in ``structures``
    order (default :data:`~bundle.constants.SCR_STRUCTURES`). Each JSRT case is its own patient.

    Args:
        root: folder that holds ``JSRT/images`` and ``SCR/masks``.

    Raises:
        BundleInputError: no image folder, no mask folder of a structure, or (with ``on_error="raise"``) a case
            without the mask of a structure (the message names the case and the structure) or a bad pair.
    """
    skipper = _Skipper(on_error, f"SCR {root}")
    root = Path(root)
    images = _files_by_stem(root / images_subdir)
    if not images:
        raise BundleInputError(root / images_subdir, "no images found")
    masks = {s: _files_by_stem(root / masks_subdir / s, MASK_SUFFIXES) for s in structures}
    items: list[dict[str, Any]] = []
    for case, image in images.items():
        missing = [s for s in structures if case not in masks[s]]
        if missing:
            skipper.handle(BundleInputError(
                root / masks_subdir / missing[0] / f"{case}.gif",
                f"case {case}: missing mask for structure '{missing[0]}'"
                + (f" (and {missing[1:]})" if len(missing) > 1 else "")))
            continue
        items.append({"image": image, "label": [masks[s][case] for s in structures], "patient": case})
    return _finish(items, skipper, check_files, require_nonempty, decode_images, on_error, f"SCR {root}",
                   structures=list(structures))


def scr_datalist(
    root: PathLike,
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
    """Patient of a QaTa/COVID-QU-Ex image name: the BIMCV subject (``sub-S01234``) when the name has one, else the
    name itself (one image per patient)."""
    m = _BIMCV_SUBJECT.match(name)
    return m.group(1) if m else name


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
    base = _find_dir(root, QATA_DIRNAME, subset) / subset
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
                   subset=subset)


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
        _find_dir(root, QATA_DIRNAME, "Test Set")
    except BundleInputError:
        logger.warning("QaTa %s: no Test Set, the test section is empty", root)
    else:
        test, s_test = qata_items(root, "Test Set", **kwargs)
    split = split_datalist(train, {"training": 1.0 - val_fraction, "validation": val_fraction}, seed=seed)
    datalist = {"training": split["training"], "validation": split["validation"], "test": test}
    summary = {"train_set": s_train, "test_set": s_test, **{k: len(v) for k, v in datalist.items()},
               "skipped": s_train["skipped"] + (s_test["skipped"] if s_test else 0),
               "val_fraction": val_fraction, "seed": seed}
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
    return _finish(items, skipper, check_files, require_nonempty, decode_images, on_error, f"folder {root}")


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

"""CheXpert adapter: the CSV files of CheXpert (real or phantom) into classification datalist items.

Layout (see ``docs/DEVELOPMENT.md``)::

    <data_root>/CheXpert-v1.0-small/train.csv, valid.csv      19 columns: Path, Sex, Age, Frontal/Lateral, AP/PA,
                                                               then the 14 observations (1.0, 0.0, -1.0 or empty)
    <data_root>/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
    <data_root>/CheXpert-v1.0-small-lesions/train/patient00001/study1/view1_frontal.png    (phantom only)

``Path`` is relative to ``data_root``, the folder that *contains* ``CheXpert-v1.0-small``. CheXpert's test set, as the
CheXlocalize release ships it (``<release>/CheXpert/test_labels.csv``: ``Path`` relative to the CSV's folder and the
14 labels, no meta columns; ``<release>/CheXpert/test/patient64741/study1/view1_frontal.jpg``), is read with
:data:`TEST_LABEL_COLUMNS` and turns the datalist into CheXpert's own splits (:func:`chexpert_datalist`).

Parsing, validation, the uncertainty policy and the frontal filter are vectorised (pandas/numpy): on 2 shared CPU
cores a ``train.csv`` of the real size (223,414 rows) is read and validated in 0.3-1.2 s and turned into 191,027 items
in 1.1-2.8 s (``scripts/bench_chexpert_csv.py``). Label values are compared numerically (``1`` and ``1.0`` are the
same value); anything else but an empty field is an error that names the CSV, the row, the column and the value.

Uncertainty policies (Irvin et al., CheXpert, AAAI 2019), per observation:

- ``"ones"`` (U-Ones): uncertain (-1) -> 1; blank -> 0; every label counts (``label_mask`` 1);
- ``"zeros"`` (U-Zeros): uncertain -> 0; blank -> 0; every label counts;
- ``"ignore"`` (U-Ignore): uncertain and blank labels are masked out of the loss (``label_mask`` 0, label 0).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from ..constants import CHEXPERT_COLUMNS, CHEXPERT_META_COLUMNS, OBSERVATIONS
from ..utils import BundleInputError, PathLike
from .splits import split_datalist

__all__ = [
    "CHEXPERT_DIRNAME", "CHEXPERT_DIRNAMES", "UNCERTAINTY_POLICIES", "read_chexpert_csv", "resolve_policies", "apply_uncertainty_policy",
    "parse_patient_ids", "chexpert_items", "find_chexpert_dir", "find_chexpert_test", "chexpert_datalist",
    "TEST_LABEL_COLUMNS", "TEST_LABELS_CSV",
]

logger = logging.getLogger(__name__)

#: Folder of the (downsampled) CheXpert release; its parent is the ``data_root`` the CSV paths are relative to.
CHEXPERT_DIRNAME = "CheXpert-v1.0-small"
#: Dataset folders searched under a data root, in order: the downsampled release, then the full-size one.
CHEXPERT_DIRNAMES: tuple[str, ...] = ("CheXpert-v1.0-small", "CheXpert-v1.0")
#: Suffix of the folder holding the phantom's true lesion masks, beside the dataset folder.
LESIONS_SUFFIX = "-lesions"
UNCERTAINTY_POLICIES: tuple[str, ...] = ("ones", "zeros", "ignore")
ON_ERROR: tuple[str, ...] = ("raise", "skip")
#: The columns of the test set's labels (``CheXpert/test_labels.csv`` of the CheXlocalize release): ``Path``
#: (``test/patient64741/study1/view1_frontal.jpg``, relative to the CSV's folder) and the 14 labels (radiologists'
#: consensus, no uncertain labels); the other meta columns are optional, extra columns are ignored.
TEST_LABEL_COLUMNS: tuple[str, ...] = ("Path", *OBSERVATIONS)
#: The labels file of CheXpert's test set.
TEST_LABELS_CSV = "test_labels.csv"
#: The only label values allowed in the CSV (besides an empty field).
VALID_LABEL_VALUES: tuple[float, ...] = (1.0, 0.0, -1.0)
_PATIENT_RE = r"(patient\d+)"
#: How many skipped rows are logged one by one (the rest only counted).
MAX_LOGGED = 10


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _row_ref(i: int) -> str:
    """1-based data row and file line (the header is line 1) of the 0-based row ``i``."""
    return f"row {i + 1} (line {i + 2})"


def _read_header(csv_path: Path) -> list[str]:
    if not csv_path.is_file():
        raise BundleInputError(csv_path, "CSV file not found")
    try:
        return [str(c) for c in pd.read_csv(csv_path, nrows=0).columns]
    except pd.errors.EmptyDataError:
        raise BundleInputError(csv_path, "CSV file is empty (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise BundleInputError(csv_path, f"not a readable CSV ({e})") from None


def _read_body(csv_path: Path, label_dtype: str, columns: Sequence[str] = CHEXPERT_COLUMNS) -> pd.DataFrame:
    dtype: dict[str, str] = {c: "str" for c in CHEXPERT_META_COLUMNS if c in columns}
    dtype.update({c: label_dtype for c in OBSERVATIONS})
    try:
        return pd.read_csv(csv_path, usecols=list(columns), dtype=dtype, keep_default_na=False,
                           na_values=[""], engine="c")
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise BundleInputError(csv_path, f"not a readable CSV ({e})") from None


def _view_from_path(paths: pd.Series) -> pd.Series:
    """``Frontal`` / ``Lateral`` from CheXpert's file names (``view1_frontal.jpg``), for CSVs without the column
    (the test set's ``test_labels.csv``); empty where the name says neither."""
    view = paths.astype("str").str.extract(r"_(frontal|lateral)\.[^./\\]+$", flags=re.IGNORECASE, expand=False)
    return view.str.capitalize()


def _bad_label_cells(raw: pd.DataFrame | None, values: np.ndarray) -> np.ndarray:
    """Boolean ``(N, 14)``: cells that are neither empty nor one of :data:`VALID_LABEL_VALUES`."""
    ok = np.isnan(values) | np.isin(values, VALID_LABEL_VALUES)
    if raw is not None:  # text read: a cell that is not empty but did not parse as a number is bad too
        ok &= ~(raw[list(OBSERVATIONS)].notna().to_numpy() & np.isnan(values))
    return ~ok


def read_chexpert_csv(csv_path: PathLike, on_error: str = "raise",
                      required: Sequence[str] = CHEXPERT_COLUMNS) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read and validate one CheXpert CSV file.

    Args:
        csv_path: ``train.csv`` or ``valid.csv`` (any CSV with the 19 CheXpert columns; extra columns are ignored).
        on_error: ``"raise"``: the first bad row raises; ``"skip"``: bad rows are logged, counted and dropped.
        required: the columns that must be there (default all 19). With :data:`TEST_LABEL_COLUMNS` (``Path`` and the
            14 observations: the test set's ``test_labels.csv``) the other meta columns are optional: absent ones
            are empty, and ``Frontal/Lateral`` is read from the file name (``view1_frontal.jpg``).

    Returns:
        ``(frame, summary)``: the frame has the 19 columns (the 14 observations as float64 with NaN for empty) and a
        ``row`` column (0-based data row in the file); the summary has ``csv``, ``rows`` (data rows in the file),
        ``skipped_invalid`` and ``errors`` (the first messages).

    Raises:
        BundleInputError: missing file or columns (always), or with ``on_error="raise"`` an unknown label value
            (the message names the CSV, the row, the column and the value) or an empty ``Path``.
    """
    _check_on_error(on_error)
    csv_path = Path(csv_path)
    header = _read_header(csv_path)
    missing = [c for c in required if c not in header]
    if missing:
        raise BundleInputError(csv_path, f"missing column(s) {missing}; a CheXpert CSV has the columns "
                                         f"{list(required)}")
    columns = [c for c in CHEXPERT_COLUMNS if c in header]
    raw: pd.DataFrame | None = None
    try:  # fast path: every label parses as a float
        df = _read_body(csv_path, "float64", columns)
        values = df[list(OBSERVATIONS)].to_numpy(dtype=np.float64)
        bad = _bad_label_cells(None, values)
        if bad.any():
            raise ValueError("unknown label value")
    except BundleInputError:
        raise
    except ValueError:  # slow path, only when something is wrong: re-read as text to report the exact values
        raw = _read_body(csv_path, "str", columns)
        df = raw.copy()
        for c in OBSERVATIONS:
            df[c] = pd.to_numeric(raw[c], errors="coerce")
        values = df[list(OBSERVATIONS)].to_numpy(dtype=np.float64)
        bad = _bad_label_cells(raw, values)

    n = len(df)
    bad_row = bad.any(axis=1)
    empty_path = df["Path"].isna().to_numpy()
    errors: list[str] = []
    rows_bad = np.flatnonzero(bad_row | empty_path)
    for i in rows_bad[: (1 if on_error == "raise" else MAX_LOGGED)]:
        if empty_path[i]:
            msg = f"{_row_ref(int(i))}: empty Path"
        else:
            j = int(np.flatnonzero(bad[i])[0])
            col = OBSERVATIONS[j]
            value = raw.iloc[i][col] if raw is not None else values[i, j]
            msg = (f"{_row_ref(int(i))}, column '{col}': unknown label value {value!r} "
                   f"(expected 1.0, 0.0, -1.0 or empty)")
        if on_error == "raise":
            more = f" ({len(rows_bad) - 1} more bad rows)" if len(rows_bad) > 1 else ""
            raise BundleInputError(csv_path, msg + more)
        errors.append(msg)
        logger.warning("%s: skipping %s", csv_path, msg)
    if len(rows_bad) > MAX_LOGGED:
        logger.warning("%s: skipping %d more bad rows (not listed)", csv_path, len(rows_bad) - MAX_LOGGED)

    df[list(OBSERVATIONS)] = values
    for c in CHEXPERT_META_COLUMNS:  # optional meta columns (test_labels.csv): the view from the name, the rest empty
        if c not in df.columns:
            df[c] = _view_from_path(df["Path"]) if c == "Frontal/Lateral" else np.nan
    df = df[list(CHEXPERT_COLUMNS)]
    df.insert(0, "row", np.arange(n, dtype=np.int64))
    if len(rows_bad):
        df = df[~(bad_row | empty_path)].reset_index(drop=True)
    summary = {"csv": str(csv_path), "rows": int(n), "skipped_invalid": int(len(rows_bad)), "errors": errors}
    return df, summary


def resolve_policies(policy: str = "ones", overrides: Mapping[str, str] | None = None) -> list[str]:
    """One uncertainty policy per observation: ``policy`` everywhere, except the observations in ``overrides``.

    Example: ``resolve_policies("zeros", {"Atelectasis": "ones", "Edema": "ones"})`` (the CheXpert paper's best mix).
    """
    policies = [policy] * len(OBSERVATIONS)
    for name, p in (overrides or {}).items():
        if name not in OBSERVATIONS:
            raise ValueError(f"unknown observation {name!r} in policy overrides; expected one of {list(OBSERVATIONS)}")
        policies[OBSERVATIONS.index(name)] = p
    bad = sorted({p for p in policies if p not in UNCERTAINTY_POLICIES})
    if bad:
        raise ValueError(f"unknown uncertainty policy {bad}; expected one of {UNCERTAINTY_POLICIES}")
    return policies


def apply_uncertainty_policy(values: np.ndarray, policy: str | Sequence[str] = "ones") -> tuple[np.ndarray, np.ndarray]:
    """Turn raw CheXpert labels into training targets and a loss mask (vectorised).

    Args:
        values: ``(N, 14)`` float array with 1, 0, -1 (uncertain) and NaN (blank).
        policy: one of :data:`UNCERTAINTY_POLICIES` for every column, or a sequence of one policy per column.

    Returns:
        ``(label, label_mask)``, both float32 ``(N, 14)`` with values in {0, 1}.
    """
    values = np.asarray(values, dtype=np.float64)
    policies = [policy] * values.shape[1] if isinstance(policy, str) else list(policy)
    if len(policies) != values.shape[1] or any(p not in UNCERTAINTY_POLICIES for p in policies):
        raise ValueError(f"policy must be one of {UNCERTAINTY_POLICIES} or one per column, got {policy!r}")
    pol = np.asarray(policies)
    uncertain = values == -1.0
    blank = np.isnan(values)
    label = np.where(blank, 0.0, values)
    label = np.where(uncertain & (pol == "ones")[None], 1.0, label)
    label = np.where(uncertain & (pol != "ones")[None], 0.0, label)
    mask = np.where((pol == "ignore")[None], ~(uncertain | blank), True)
    return label.astype(np.float32), mask.astype(np.float32)


def parse_patient_ids(paths: pd.Series) -> pd.Series:
    """The ``patientNNNNN`` component of each path (NaN where there is none), vectorised."""
    return paths.astype("str").str.extract(_PATIENT_RE, expand=False)


def _lesion_roots(data_root: str, lesion_dirname: str | None) -> dict[str, str]:
    """``{dataset folder: lesion folder}`` for the lesion folders that exist under ``data_root``."""
    if lesion_dirname is not None:
        return {"": lesion_dirname} if os.path.isdir(os.path.join(data_root, lesion_dirname)) else {}
    try:
        names = os.listdir(data_root)
    except OSError:
        return {}
    return {n[: -len(LESIONS_SUFFIX)]: n for n in names
            if n.endswith(LESIONS_SUFFIX) and os.path.isdir(os.path.join(data_root, n))}


def _find_lesions(rel: pd.Series, data_root: str, lesion_dirname: str | None) -> list[str | None]:
    """The existing lesion-mask path of each image (or ``None``): ``<root>/<dataset>-lesions/<rest>`` with the
    image suffix replaced by ``.png`` (preferred) or with ``.png`` appended. Costs nothing without a lesion folder."""
    lesions: list[str | None] = [None] * len(rel)
    for top, lesion_top in _lesion_roots(data_root, lesion_dirname).items():
        prefix = f"{top}/" if top else ""
        sel = np.flatnonzero(rel.str.startswith(prefix).to_numpy(dtype=bool)) if prefix else np.arange(len(rel))
        if not len(sel):
            continue
        base = data_root + os.sep + lesion_top + "/" + rel.iloc[sel].str.slice(len(prefix))
        for cand in (base + ".png", base.str.replace(r"\.[^./]+$", ".png", regex=True)):  # the last one wins
            exists = np.fromiter(map(os.path.isfile, cand), dtype=bool, count=len(cand))
            for k in np.flatnonzero(exists):
                lesions[sel[k]] = cand.iloc[k]
    return lesions


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small containers (it would rescan them all, over and
    over: 3-5x slower for 200k items)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _binary_rows_as_lists(arr: np.ndarray) -> list[list[float]]:
    """Rows of a 0/1 ``(N, C)`` array as lists of Python floats, fast: each distinct row is converted once and
    copied (every item still gets its own list)."""
    arr = np.asarray(arr)
    if arr.shape[1] > 62:
        return arr.astype(np.float64).tolist()
    codes = (arr > 0.5).astype(np.int64) @ (np.int64(1) << np.arange(arr.shape[1], dtype=np.int64))
    uniq, inverse = np.unique(codes, return_inverse=True)
    rows = ((uniq[:, None] >> np.arange(arr.shape[1])) & 1).astype(np.float64).tolist()
    return [rows[i].copy() for i in inverse.tolist()]


def chexpert_items(
    csv_path: PathLike,
    data_root: PathLike | None = None,
    policy: str = "ones",
    policy_overrides: Mapping[str, str] | None = None,
    frontal_only: bool = True,
    check_files: bool = False,
    on_error: str = "raise",
    lesion_dirname: str | None = None,
    dataset_dirname: str | None = None,
    required: Sequence[str] = CHEXPERT_COLUMNS,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Classification datalist items from one CheXpert CSV.

    Args:
        csv_path: the CSV file.
        data_root: the folder the CSV's ``Path`` column is relative to (the one that contains
            ``CheXpert-v1.0-small``); default: the parent of the CSV's folder.
        policy: uncertainty policy (``"ones"``, ``"zeros"`` or ``"ignore"``), see the module docstring.
        policy_overrides: ``{observation: policy}`` exceptions to ``policy``.
        frontal_only: keep frontal views only (``Frontal/Lateral == "Frontal"``).
        check_files: check that every kept image file exists.
        on_error: ``"raise"`` or ``"skip"`` (log, count and drop bad rows and missing files).
        lesion_dirname: folder (under ``data_root``) of the true lesion masks; default ``<dataset folder>-lesions``.
            A ``lesion`` key is added to the items whose mask file exists.
        dataset_dirname: the name of the dataset folder under ``data_root`` as it is on disk. ``Path`` values whose
            first component is another name (``CheXpert-v1.0-small/...`` in the CSV, folder renamed, or
            ``CheXpert-v1.0/...`` of the full-size release read from a copy named otherwise) are re-rooted on it
            when no folder of the CSV's name exists under ``data_root``.
        required: the columns the CSV must have (see :func:`read_chexpert_csv`).

    Returns:
        ``(items, summary)``; items are ``{"image", "label", "label_mask", "patient"[, "lesion"]}`` with absolute
        paths and 14-float lists; the summary counts rows, dropped lateral views, skipped rows, patients, ...
    """
    _check_on_error(on_error)
    csv_path = Path(csv_path)
    policies = resolve_policies(policy, policy_overrides)
    root = os.path.abspath(data_root if data_root is not None else csv_path.parent.parent)
    df, summary = read_chexpert_csv(csv_path, on_error=on_error, required=required)

    n_valid = len(df)
    if frontal_only:
        df = df[(df["Frontal/Lateral"] == "Frontal").to_numpy()]
    summary["lateral_dropped"] = int(n_valid - len(df))

    if dataset_dirname is not None and len(df):
        first = df["Path"].astype("str").str.split("/", n=1).str[0]
        prefixes = set(first.unique().tolist())
        stale = [p for p in prefixes if p != dataset_dirname and not os.path.isdir(os.path.join(root, p))]
        if stale:
            logger.info("%s: Path prefix %s re-rooted on the folder %s", csv_path, stale, dataset_dirname)
            df = df.copy()
            rest = df["Path"].astype("str").str.split("/", n=1).str[1]
            df["Path"] = np.where(first.isin(stale).to_numpy(), dataset_dirname + "/" + rest, df["Path"])
        summary["path_prefixes"] = sorted(prefixes)

    skipped_other = 0
    patients = parse_patient_ids(df["Path"])
    no_patient = patients.isna().to_numpy()
    images = root + os.sep + df["Path"].astype("str")
    if check_files:
        missing = ~np.fromiter(map(os.path.isfile, images), dtype=bool, count=len(images))
    else:
        missing = np.zeros(len(df), dtype=bool)
    bad = no_patient | missing
    if bad.any():
        for k, i in enumerate(np.flatnonzero(bad)):
            row = int(df["row"].iloc[i])
            problem = (f"{_row_ref(row)}: image file not found: {images.iloc[i]}" if missing[i]
                       else f"{_row_ref(row)}: no patient id (patientNNNNN) in Path {df['Path'].iloc[i]!r}")
            if on_error == "raise":
                raise BundleInputError(csv_path, problem + (f" ({int(bad.sum()) - 1} more)" if bad.sum() > 1 else ""))
            if k < MAX_LOGGED:
                summary["errors"].append(problem)
                logger.warning("%s: skipping %s", csv_path, problem)
        skipped_other = int(bad.sum())
        keep = ~bad
        df, patients, images = df[keep], patients[keep], images[keep]

    values = df[list(OBSERVATIONS)].to_numpy(dtype=np.float64)
    label, mask = apply_uncertainty_policy(values, policies)

    lesions = _find_lesions(df["Path"].astype("str"), root, lesion_dirname)

    items: list[dict[str, Any]] = []
    with _gc_paused():
        for img, lab, msk, pat, les in zip(images.tolist(), _binary_rows_as_lists(label), _binary_rows_as_lists(mask),
                                           patients.tolist(), lesions):
            item: dict[str, Any] = {"image": img, "label": lab, "label_mask": msk, "patient": pat}
            if les is not None:
                item["lesion"] = les
            items.append(item)

    summary.update({
        "data_root": root,
        "policy": policy if not policy_overrides else {"default": policy, **dict(policy_overrides)},
        "frontal_only": bool(frontal_only),
        "skipped_files": skipped_other,
        "skipped": summary["skipped_invalid"] + skipped_other,
        "items": len(items),
        "patients": int(patients.nunique()),
        "with_lesion": int(sum(x is not None for x in lesions)),
        "uncertain": int((values == -1.0).sum()),
        "blank": int(np.isnan(values).sum()),
    })
    return items, summary


def find_chexpert_dir(root: PathLike, dirname: str | Sequence[str] = CHEXPERT_DIRNAMES) -> Path:
    """The CheXpert dataset folder under ``root``: ``root/<dirname>`` (the first of :data:`CHEXPERT_DIRNAMES`, the
    downsampled ``CheXpert-v1.0-small`` and the full-size ``CheXpert-v1.0``, that holds a ``train.csv``) or ``root``
    itself when it holds ``train.csv``.

    Raises:
        BundleInputError: when none holds a ``train.csv``.
    """
    root = Path(root)
    names = [dirname] if isinstance(dirname, str) else list(dirname)
    for cand in [*(root / n for n in names), root]:
        if (cand / "train.csv").is_file():
            return cand
    raise BundleInputError(root / names[0] / "train.csv", f"CheXpert layout not found under {root} (no train.csv in "
                                                          f"{' or '.join(names)} or in the folder itself)")


def find_chexpert_test(path: PathLike) -> Path:
    """The labels file of CheXpert's test set: ``path`` itself when it is a file, else ``test_labels.csv`` in the
    folder or in its ``CheXpert/`` subfolder (the CheXlocalize release's top folder).

    Raises:
        BundleInputError: when none exists.
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return p
    for cand in (p / TEST_LABELS_CSV, p / "CheXpert" / TEST_LABELS_CSV):
        if cand.is_file():
            return cand
    raise BundleInputError(p, f"CheXpert test set not found: no {TEST_LABELS_CSV} in the folder or in its CheXpert/ "
                              "subfolder (the layout of the CheXlocalize release: CheXpert/test_labels.csv, "
                              "CheXpert/test/patient<N>/study<N>/view<N>_frontal.jpg)")


def _check_disjoint_patients(sections: Mapping[str, list[dict[str, Any]]], files: Mapping[str, Any]) -> None:
    """No patient in two sections (CheXpert's own splits are disjoint by patient; a mix-up of files is not)."""
    seen: dict[str, str] = {}
    for section, items in sections.items():
        for item in items:
            other = seen.setdefault(item["patient"], section)
            if other != section:
                raise BundleInputError(files[section], f"patient {item['patient']} is in both the {other} and the "
                                                       f"{section} split (from {files[other]}): the files mix splits")


def chexpert_datalist(
    root: PathLike,
    policy: str = "ones",
    policy_overrides: Mapping[str, str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    frontal_only: bool = True,
    check_files: bool = False,
    on_error: str = "raise",
    dirname: str | Sequence[str] = CHEXPERT_DIRNAMES,
    test: PathLike | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The CheXpert datalist. Without the test set: ``train.csv`` split by patient into training/validation and
    ``valid.csv`` as test. With it (``test``): CheXpert's own three splits, ``train.csv`` as training, ``valid.csv``
    (the radiologists' labels) as validation and the test set (``test_labels.csv``, 668 radiographs of 500 patients
    released with CheXlocalize) as test; no patient may be in two of them.

    Args:
        root: the data root (folder containing ``CheXpert-v1.0-small`` or the full-size ``CheXpert-v1.0``) or the
            dataset folder itself (any name: the CSV's ``Path`` prefix is re-rooted on it).
        val_fraction: fraction of ``train.csv``'s images (whole patients) held out for validation (without the test
            set only).
        seed: seed of the patient split.
        test: the test set's ``test_labels.csv``, or a folder holding it (see :func:`find_chexpert_test`); its
            ``Path`` values are relative to the CSV's folder.
        Other arguments: see :func:`chexpert_items`.

    Returns:
        ``({"training", "validation", "test"}, summary)``; ``test`` is empty when there is neither a ``valid.csv``
        nor a test set. ``summary["splits"]`` says which layout was used (``"train.csv split"`` or ``"CheXpert"``).
    """
    ds_dir = find_chexpert_dir(root, dirname)
    data_root = ds_dir.parent
    kwargs: dict[str, Any] = dict(data_root=data_root, policy=policy, policy_overrides=policy_overrides,
                                  frontal_only=frontal_only, check_files=check_files, on_error=on_error,
                                  dataset_dirname=ds_dir.name)
    train, s_train = chexpert_items(ds_dir / "train.csv", **kwargs)
    valid: list[dict[str, Any]] = []
    s_valid: dict[str, Any] | None = None
    if (ds_dir / "valid.csv").is_file():
        valid, s_valid = chexpert_items(ds_dir / "valid.csv", **kwargs)
    elif test is not None:
        raise BundleInputError(ds_dir / "valid.csv", "CSV file not found (with the test set given, valid.csv is the "
                                                     "validation split)")
    else:
        logger.warning("%s: no valid.csv, the test section is empty", ds_dir)
    s_test: dict[str, Any] | None = None
    if test is None:
        split = split_datalist(train, {"training": 1.0 - val_fraction, "validation": val_fraction}, seed=seed)
        datalist = {"training": split["training"], "validation": split["validation"], "test": valid}
        splits = "train.csv split"
    else:
        test_csv = find_chexpert_test(test)
        test_items, s_test = chexpert_items(test_csv, **{**kwargs, "data_root": test_csv.parent,
                                                         "dataset_dirname": None, "required": TEST_LABEL_COLUMNS})
        datalist = {"training": train, "validation": valid, "test": test_items}
        _check_disjoint_patients(datalist, {"training": ds_dir / "train.csv", "validation": ds_dir / "valid.csv",
                                            "test": test_csv})
        splits = "CheXpert"
    summary = {
        "train_csv": s_train, "valid_csv": s_valid, "test_csv": s_test, "splits": splits,
        "training": len(datalist["training"]), "validation": len(datalist["validation"]),
        "test": len(datalist["test"]),
        "skipped": s_train["skipped"] + sum(s["skipped"] for s in (s_valid, s_test) if s),
        "val_fraction": val_fraction if test is None else None, "seed": seed,
    }
    return datalist, summary

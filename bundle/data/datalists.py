"""Datalist JSON files (MONAI decathlon style) and the data stage's entry point :func:`build_all_datalists`.

A datalist is ``{"name", "description", "numTraining", ..., "training": [...], "validation": [...], "test": [...]}``
with absolute paths (see ``docs/DEVELOPMENT.md``); it is written atomically and readable by
``monai.data.load_decathlon_datalist`` as well as by :func:`read_datalist` / :func:`load_datalist_section`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..constants import OBSERVATIONS, SCR_STRUCTURES
from ..utils import BundleInputError, PathLike, atomic_write_json, load_json
from .chexlocalize import (LESION_SOURCE, CheXlocalize, attach_chexlocalize, find_release_test, read_chexlocalize,
                           write_chexlocalize_masks)
from .chexpert import chexpert_datalist
from .segsets import COVID_QU_EX_CLASSES, covid_qu_ex_datalist, folder_datalist, qata_datalist, scr_datalist
from .splits import subsample

__all__ = ["DATALIST_SECTIONS", "write_datalist", "read_datalist", "load_datalist_section", "build_all_datalists",
           "format_datalist_summary", "datalist_policy"]

logger = logging.getLogger(__name__)

DATALIST_SECTIONS: tuple[str, ...] = ("training", "validation", "test")
#: Datasets built by :func:`build_all_datalists`: name -> output file name.
DATALIST_FILES: dict[str, str] = {"chexpert": "chexpert.json", "scr": "scr.json", "qata": "qata.json",
                                  "real_lungs": "real_lungs.json"}
#: Folder (under the datalists' folder) of the lesion masks converted from CheXlocalize.
CHEXLOCALIZE_DIR = "chexlocalize"


def write_datalist(
    path: PathLike, datalist: Mapping[str, Sequence[Mapping[str, Any]]], indent: int | None = 1, **metadata: Any
) -> str:
    """Write ``datalist`` (sections ``training``/``validation``/``test``) as JSON, atomically.

    Args:
        path: output file.
        datalist: ``{section: items}``; missing sections are written empty.
        indent: JSON indent (``None``: compact, for very large datalists).
        metadata: extra top-level keys (``name``, ``description``, ``labels``, ``summary``, ...).

    Returns:
        the absolute path written.
    """
    unknown = [k for k in datalist if k not in DATALIST_SECTIONS]
    if unknown:
        raise ValueError(f"unknown datalist sections {unknown}; expected {DATALIST_SECTIONS}")
    sections = {k: [dict(it) for it in datalist.get(k, [])] for k in DATALIST_SECTIONS}
    obj: dict[str, Any] = dict(metadata)
    obj.update({"numTraining": len(sections["training"]), "numValidation": len(sections["validation"]),
                "numTest": len(sections["test"])})
    obj.update(sections)
    path = os.path.abspath(path)
    atomic_write_json(path, obj, indent=indent)
    return path


def read_datalist(path: PathLike, check_files: bool = False) -> dict[str, Any]:
    """Read a datalist JSON file and check its structure (every section a list of items with an ``image``).

    Args:
        check_files: also check that every ``image``/``label``/``lesion`` path exists.

    Raises:
        BundleInputError: missing file, invalid JSON, bad structure, or (``check_files``) a missing file (the
            message names the datalist, the section, the item and the missing path).
    """
    obj = load_json(path)
    if not isinstance(obj, dict) or not any(k in obj for k in DATALIST_SECTIONS):
        raise BundleInputError(path, f"not a datalist (a JSON object with at least one of {DATALIST_SECTIONS})")
    for section in DATALIST_SECTIONS:
        items = obj.setdefault(section, [])
        if not isinstance(items, list):
            raise BundleInputError(path, f"section '{section}' is not a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "image" not in item:
                raise BundleInputError(path, f"section '{section}', item {i}: not an object with an 'image' key")
            if check_files:
                for key in ("image", "label", "lesion"):
                    value = item.get(key)
                    for p in ([value] if isinstance(value, str) else value if isinstance(value, list) else []):
                        if isinstance(p, str) and not os.path.exists(p):
                            raise BundleInputError(path, f"section '{section}', item {i}: {key} file not found: {p}")
    return obj


def load_datalist_section(
    path: PathLike, section: str = "training", n: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """One section of a datalist file, optionally subsampled to ``n`` items (nested subsets, see
    :func:`bundle.data.splits.subsample`): the config-friendly way to feed a dataset, e.g.
    ``$bundle.data.datalists.load_datalist_section(@datalist, 'training', n=@n_train, seed=@seed)``.
    """
    if section not in DATALIST_SECTIONS:
        raise ValueError(f"section must be one of {DATALIST_SECTIONS}, got {section!r}")
    items = read_datalist(path)[section]
    return subsample(items, n, seed=seed)


def _exists(root: PathLike | None, marker: str) -> bool:
    return root is not None and (Path(root) / marker).exists()


#: Where each datalist's data come from in the user's data file (:mod:`bundle.data.userdata`): datalist -> the keys
#: that replace its phantom.
REAL_KEYS: dict[str, tuple[str, ...]] = {"chexpert": ("chexpert",), "scr": ("jsrt_scr",),
                                         "qata": ("qata", "covid_qu_ex"), "real_lungs": ("folder",)}


def build_all_datalists(
    phantom_dir: PathLike,
    datalist_dir: PathLike,
    real_lungs_dir: PathLike | None = None,
    seed: int = 0,
    policy: str = "ones",
    policy_overrides: Mapping[str, str] | None = None,
    chexpert_val_fraction: float = 0.1,
    qata_val_fraction: float = 0.2,
    seg_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    check_files: bool = True,
    on_error: str = "raise",
    chexpert_root: PathLike | None = None,
    scr_root: PathLike | None = None,
    qata_root: PathLike | None = None,
    required: Sequence[str] = ("chexpert", "scr", "qata"),
    real: Mapping[str, Mapping[str, Any]] | None = None,
    decode_real_images: bool = True,
    only: Sequence[str] | None = None,
    prebuilt: Mapping[str, Any] | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Write ``chexpert.json``, ``scr.json``, ``qata.json`` (and ``real_lungs.json``) into ``datalist_dir``.

    Each dataset is read from ``phantom_dir`` unless its own root is given (``chexpert_root``, ``scr_root``,
    ``qata_root``) or the user's data file gives it (``real``: the normalised spec of
    :func:`bundle.data.userdata.load_data_spec`: ``chexpert``, ``jsrt_scr``, ``qata`` or ``covid_qu_ex`` (the
    infection datalist ``qata.json``), ``folder`` (``real_lungs.json``)). ``real_lungs.json`` is otherwise written
    when ``real_lungs_dir`` holds a plain folder (``images/``, ``masks/``, ``cases.csv``). A ``summary.json`` with
    the counts and each datalist's ``source`` (``phantom`` or ``real``) is written beside them.

    Every datalist is built and validated in memory first; the files are written only when all are good, so a
    missing or malformed file stops the stage with the file named and no datalist (or summary) written half.

    Args:
        phantom_dir: default root of the three layouts (the phantom generator's output).
        datalist_dir: output folder.
        real_lungs_dir: the real lungs folder (``../shared/data/real-cxr-lungs``); skipped when absent or ``None``.
        seed: seed of every patient split.
        policy, policy_overrides: CheXpert uncertainty policy (see :mod:`bundle.data.chexpert`).
        chexpert_val_fraction: validation fraction of CheXpert's ``train.csv`` (``valid.csv`` is the test set; with
            CheXpert's test set, ``valid.csv`` is the validation set and the fraction is not used).
        qata_val_fraction: validation fraction of QaTa's ``Train Set`` (``Test Set`` is the test set).
        seg_fractions: training/validation/test fractions of SCR and of the plain folder.
        check_files: validate files (image exists; masks readable, of the image's size or aspect ratio, non-empty
            for SCR and the plain folder).
        on_error: ``"raise"`` or ``"skip"`` (bad items logged, counted in the summary, dropped).
        required: datasets whose absence is an error (the others are skipped with a warning when absent).
        real: the user's datasets (see above); ``None``: none.
        decode_real_images: decode every image of the user's segmentation datasets while checking (catches
            truncated files; the phantom's are only checked through their header).
        only: build only these datalists (the others are left out of the summary).
        prebuilt: the ``"built"`` entry of an earlier call's summary with ``write=False`` (datalists already built
            and checked: reused as they are, e.g. the real ones checked before drawing phantoms).
        write: write the datalists and ``summary.json`` (``False``: only build and check; the summary then has a
            ``"built"`` entry for ``prebuilt``).

    Returns:
        ``{dataset: {"path": datalist file, "training": n, "validation": n, "test": n, "skipped": n, "source", ...}}``.
    """
    datalist_dir = Path(datalist_dir)
    real = dict(real or {})
    unknown = [r for r in required if r not in DATALIST_FILES]
    if unknown:
        raise ValueError(f"unknown datasets in `required`: {unknown}; expected some of {list(DATALIST_FILES)}")
    roots: dict[str, Any] = {"chexpert": chexpert_root or phantom_dir, "scr": scr_root or phantom_dir,
                             "qata": qata_root or phantom_dir, "real_lungs": real_lungs_dir}
    given: dict[str, str] = {}  # datalist -> key of the user's data file that replaces its phantom
    for name, keys in REAL_KEYS.items():
        for key in keys:
            if key in real:
                given[name] = key
                roots[name] = real[key].get("root") or real[key].get("images")
    present = {
        "chexpert": _exists(roots["chexpert"], "CheXpert-v1.0-small/train.csv") or _exists(
            roots["chexpert"], "CheXpert-v1.0/train.csv") or _exists(roots["chexpert"], "train.csv"),
        "scr": _exists(roots["scr"], "JSRT/images"),
        "qata": _exists(roots["qata"], "QaTa-COV19/Train Set") or _exists(roots["qata"], "Train Set"),
        "real_lungs": _exists(roots["real_lungs"], "images") and _exists(roots["real_lungs"], "masks"),
    }
    present.update({name: True for name in given})  # the user's datasets: their adapters report what is missing
    seg_kwargs: dict[str, Any] = dict(check_files=check_files, on_error=on_error)
    built: dict[str, tuple[dict[str, list[dict[str, Any]]], dict[str, Any], dict[str, Any]]] = {}
    summary: dict[str, Any] = {}
    pre = dict((prebuilt or {}).get("built", {}))
    # CheXlocalize files read and checked, with the radiographs they give masks to: written with the datalists
    lesion_writers: list[tuple[CheXlocalize, list[tuple[str, str, str]]]] = list(
        (prebuilt or {}).get("lesion_writers", []))
    for name in DATALIST_FILES:
        if only is not None and name not in only:
            continue
        if name in pre:
            built[name] = pre[name]
            summary[name] = (prebuilt or {})[name]
            continue
        if not present[name]:
            if name in required:
                raise BundleInputError(roots[name], f"{name} dataset layout not found (see docs/DEVELOPMENT.md)")
            logger.info("datalists: %s not found under %s, skipped", name, roots[name])
            summary[name] = {"status": "absent", "root": None if roots[name] is None else str(roots[name]),
                             "source": None}
            continue
        key = given.get(name)
        spec = dict(real.get(key, {})) if key else {}
        decode = bool(decode_real_images and key)
        root = roots[name]
        if name == "chexpert":
            test_set = spec.get("test")
            if test_set is None and spec.get("localize"):  # a release folder also ships CheXpert's test set
                test_set = find_release_test(spec["localize"])
                if test_set is not None:
                    logger.info("datalists: CheXpert's test set found in the CheXlocalize release: %s", test_set)
            datalist, s = chexpert_datalist(root, policy=policy, policy_overrides=policy_overrides,
                                            val_fraction=chexpert_val_fraction, seed=seed, check_files=check_files,
                                            on_error=on_error, test=test_set)
            meta = {"name": "CheXpert", "labels": list(OBSERVATIONS), "description": (
                "CheXpert classification: train.csv split by patient, valid.csv as test" if test_set is None else
                "CheXpert classification: CheXpert's splits, train.csv, valid.csv as validation, the test set")}
            if spec.get("localize"):  # radiologists' lesion masks (CheXlocalize): written with the datalists
                gt = read_chexlocalize(spec["localize"])
                s["chexlocalize"], matched = attach_chexlocalize(datalist, gt, datalist_dir / CHEXLOCALIZE_DIR)
                lesion_writers.append((gt, matched))
        elif name == "scr":
            if key:
                datalist, s = scr_datalist(spec.get("root"), images_dir=spec.get("images"),
                                           masks_dir=spec.get("masks"), fractions=seg_fractions, seed=seed,
                                           require_nonempty=True, decode_images=decode, **seg_kwargs)
            else:
                datalist, s = scr_datalist(root, fractions=seg_fractions, seed=seed, require_nonempty=True,
                                           **seg_kwargs)
            meta = {"name": "JSRT/SCR", "labels": list(SCR_STRUCTURES),
                    "description": "JSRT radiographs, SCR masks (one file per structure), split by patient"}
        elif name == "qata" and key == "covid_qu_ex":
            datalist, s = covid_qu_ex_datalist(root, classes=spec.get("classes") or COVID_QU_EX_CLASSES,
                                               decode_images=decode, **seg_kwargs)
            meta = {"name": "COVID-QU-Ex", "labels": ["infection"],
                    "description": "COVID-QU-Ex infection masks, the dataset's own Train/Val/Test split"}
        elif name == "qata":
            datalist, s = qata_datalist(root, val_fraction=qata_val_fraction, seed=seed, decode_images=decode,
                                        **seg_kwargs)
            meta = {"name": "QaTa-COV19", "labels": ["infection"],
                    "description": "QaTa-COV19 infection masks: Train Set split by patient, Test Set as test"}
        else:
            folder_kwargs = {k: spec[k] for k in ("images_subdir", "masks_subdir", "cases_csv") if k in spec}
            datalist, s = folder_datalist(root, fractions=seg_fractions, seed=seed, require_nonempty=True,
                                          decode_images=decode, **folder_kwargs, **seg_kwargs)
            meta = {"name": "plain folder" if key else "real-cxr-lungs", "labels": ["lungs"],
                    "description": "radiographs with one mask each (plain folder), split by patient"}
        if not sum(len(v) for v in datalist.values()):
            raise BundleInputError(root, f"{meta['name']}: no usable image (every item skipped or none found)")
        s["root"] = os.path.abspath(root)
        source = "real" if key or name == "real_lungs" else "phantom"
        s["source"] = source
        meta["source"] = source
        built[name] = (datalist, s, meta)
        summary[name] = {"status": "written", "path": str((datalist_dir / DATALIST_FILES[name]).absolute()),
                         **{k: len(datalist[k]) for k in DATALIST_SECTIONS},
                         "skipped": int(s.get("skipped", 0)), "root": s["root"], "source": source,
                         "dataset": meta["name"], "given_as": key,
                         "patient_grouping": s.get("patient_grouping") or (s.get("train_set") or {}).get(
                             "patient_grouping"),
                         "patients_moved": s.get("patients_moved", 0)}
        if name == "chexpert":  # the splits used; which items have lesion masks to score the DoLL against, and whose
            summary[name]["splits"] = s.get("splits")
            lesions = {sec: sum(1 for it in items if it.get("lesion")) for sec, items in datalist.items()}
            summary[name]["with_lesion"] = {sec: n for sec, n in lesions.items() if n}
            summary[name]["lesion_source"] = LESION_SOURCE if "chexlocalize" in s else (
                "phantom" if any(lesions.values()) else None)
    if not write:
        return {**summary, "built": built, "lesion_writers": lesion_writers}
    for gt, keys in lesion_writers:  # the lesion masks (of the matched radiographs) before the datalists naming them
        n = write_chexlocalize_masks(gt, datalist_dir / CHEXLOCALIZE_DIR, keys)
        logger.info("datalists: wrote %d CheXlocalize lesion masks from %s into %s", n, gt.path,
                    datalist_dir / CHEXLOCALIZE_DIR)
    for name, (datalist, s, meta) in built.items():  # all good: write
        big = sum(len(v) for v in datalist.values()) > 20000
        path = write_datalist(datalist_dir / DATALIST_FILES[name], datalist, indent=None if big else 1,
                              summary=s, **meta)
        logger.info("datalists: wrote %s (%s)", path, {k: len(datalist[k]) for k in DATALIST_SECTIONS})
    atomic_write_json(datalist_dir / "summary.json", summary)
    return summary


def format_datalist_summary(summary: Mapping[str, Any]) -> str:
    """One line per datalist of :func:`build_all_datalists`'s summary (for the data stage's log)."""
    lines = []
    for name, info in summary.items():
        if not isinstance(info, Mapping) or "status" not in info:
            continue
        if info["status"] != "written":
            lines.append(f"datalist {name}: {info['status']}")
            continue
        counts = ", ".join(f"{k} {info[k]}" for k in ("training", "validation", "test") if k in info)
        source = info.get("source")
        src = f" [{source}: {info.get('dataset', name)} from {info.get('root')}]" if source == "real" else (
            " [phantom]" if source == "phantom" else "")
        lines.append(f"datalist {name}: {counts} (skipped {info.get('skipped', 0)}) -> {info['path']}{src}")
        if source == "real" and info.get("patient_grouping"):
            lines.append(f"  patients: {info['patient_grouping']}")
    return "\n".join(lines)


def datalist_policy(datalist: Mapping[str, Any]) -> str:
    """The CheXpert uncertainty policy a classification datalist (its loaded content) was built with, from its
    ``summary``, as text: ``"ignore"`` or e.g. ``"{'default': 'ignore', 'No Finding': 'zeros'}"``; ``"unknown"``
    when not recorded."""
    summary = datalist.get("summary") or {}
    policy = (summary.get("train_csv") or {}).get("policy", summary.get("policy"))
    return "unknown" if policy is None else str(policy)

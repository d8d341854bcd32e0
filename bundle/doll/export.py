"""The DoLL data set as a product: one folder (and optionally one ``.tar.gz`` archive) that others can pre-train on,
e.g. "CheXpert-DoLL" when the DoLL stage ran on the real CheXpert.

Layout of ``<out_dir>``::

    masks/<image path relative to image_root, .png>   DoLL bit masks (bit k = OBSERVATIONS[k], k >= 1)
    soft/<...>.npy                                     soft maps (optional, when the DoLL stage saved them)
    datalist.json                                      {split: [{image, label, targets[, soft]}]}, paths relative
                                                       (image: to the user's image root; label/soft: to out_dir)
    DATA_CARD.md, data_card.json                       recipe, classifiers and their AUROC, measured quality,
                                                       counts per observation, licence note

The images themselves are not copied: their licence belongs to their owners (CheXpert's research use agreement), so
a user joins the masks with their own copy through the relative image paths.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..constants import OBSERVATIONS, judge_description
from ..utils import BundleInputError, PathLike, atomic_save, atomic_write_json, atomic_write_text, load_json


def _relative(path: str, root: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel.startswith(".."):
        raise BundleInputError(path, f"lies outside the image root {root}")
    return rel.replace(os.sep, "/")


def export_doll_dataset(doll_datalist: PathLike, image_root: PathLike, out_dir: PathLike, name: str = "DoLL",
                        recipe: Mapping[str, Any] | None = None, classifiers: Mapping[str, Any] | None = None,
                        quality_summary: PathLike | None = None, include_soft: bool = False,
                        archive: bool = False) -> dict[str, Any]:
    """Write the DoLL data set of ``doll_datalist`` into ``out_dir`` (layout in the module docstring).

    Args:
        doll_datalist: the DoLL stage's datalist (``{split: [{image, label, targets[, soft]}]}``).
        image_root: the folder the image paths are made relative to (e.g. the parent of ``CheXpert-v1.0-small``).
        out_dir: the new data set's folder (must not exist, or be empty: nothing is overwritten).
        name: the data set's name on its card.
        recipe: the DoLL generation settings (``generate_doll.yaml``'s ``doll``), recorded on the card.
        classifiers: classifier name -> its test metrics (e.g. ``{"val_mean_auroc": 0.84}``), recorded on the card.
        quality_summary: the DoLL quality CSV (``evaluate_doll.yaml``'s ``summary.csv``: observation, method, n,
            iou, dice, hit), recorded on the card when given and present.
        include_soft: copy the soft maps too (when the datalist names them).
        archive: also write ``<out_dir>.tar.gz``.

    Returns:
        ``{"out_dir", "n_images", "per_split", "per_observation", "archive"}``.
    """
    out = os.fspath(out_dir)
    if os.path.isdir(out) and os.listdir(out):
        raise BundleInputError(out, "the export folder exists and is not empty (nothing is overwritten)")
    content = load_json(doll_datalist)
    if not isinstance(content, Mapping):
        raise BundleInputError(doll_datalist, "expected a DoLL datalist {split: [items]}")
    datalist: dict[str, list[dict[str, Any]]] = {}
    counts: Counter[str] = Counter()
    for split, items in content.items():
        rows = []
        for it in items:
            rel_image = _relative(it["image"], os.fspath(image_root))
            stem = os.path.splitext(rel_image)[0]
            if not os.path.isfile(it["label"]):
                raise BundleInputError(it["label"], "DoLL mask missing (re-run the DoLL stage)")
            label = f"masks/{stem}.png"
            os.makedirs(os.path.dirname(os.path.join(out, label)), exist_ok=True)
            atomic_save(os.path.join(out, label), lambda tmp, src=it["label"]: shutil.copyfile(src, tmp))
            row: dict[str, Any] = {"image": rel_image, "label": label, "targets": list(it.get("targets", []))}
            if include_soft and it.get("soft"):
                soft = f"soft/{stem}.npy"
                os.makedirs(os.path.dirname(os.path.join(out, soft)), exist_ok=True)
                atomic_save(os.path.join(out, soft), lambda tmp, src=it["soft"]: shutil.copyfile(src, tmp))
                row["soft"] = soft
            counts.update(OBSERVATIONS[int(t)] for t in row["targets"])
            rows.append(row)
        datalist[str(split)] = rows
    atomic_write_json(os.path.join(out, "datalist.json"), datalist)
    quality = _read_quality(quality_summary)
    card = {"name": name, "n_images": sum(len(v) for v in datalist.values()),
            "per_split": {k: len(v) for k, v in datalist.items()},
            "per_observation": {o: counts.get(o, 0) for o in OBSERVATIONS[1:]},
            "mask_format": "PNG bit mask, bit k = observation k of `observations` (k = 0, No Finding, is never set)",
            "observations": list(OBSERVATIONS), "recipe": dict(recipe or {}),
            "classifiers": dict(classifiers or {}), "quality": quality}
    atomic_write_json(os.path.join(out, "data_card.json"), card)
    atomic_write_text(os.path.join(out, "DATA_CARD.md"), _card_markdown(card))
    result = {"out_dir": out, "n_images": card["n_images"], "per_split": card["per_split"],
              "per_observation": card["per_observation"], "archive": None}
    if archive:
        path = out.rstrip("/") + ".tar.gz"

        def write(tmp: str) -> None:
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(out, arcname=os.path.basename(out.rstrip("/")))

        atomic_save(path, write)
        result["archive"] = path
    return result


def _read_quality(path: PathLike | None) -> list[dict[str, Any]]:
    if not path or not os.path.isfile(path):
        return []
    import csv

    with open(path, newline="") as f:
        return [{k: (float(v) if k in ("n", "iou", "dice", "hit") and v not in ("", None) else v)
                 for k, v in row.items()} for row in csv.DictReader(f)]


def _card_markdown(card: Mapping[str, Any]) -> str:
    lines = [f"# {card['name']}: diagnosis-oriented localization labels", "",
             f"{card['n_images']} images ({', '.join(f'{k}: {v}' for k, v in card['per_split'].items())}); one mask per "
             "observation per image (the classifiers' explanations, distilled and boosted). The images are not "
             "included: join `datalist.json`'s relative image paths with your own copy of the source data set "
             "(its licence applies).", "", f"Mask format: {card['mask_format']}.", "",
             "## Labelled observations (images whose DoLL has the observation)", "", "| observation | images |",
             "|---|---|"]
    lines += [f"| {o} | {n} |" for o, n in card["per_observation"].items()]
    lines += ["", "## Classifiers explained", ""]
    lines += [f"- {k}: {json.dumps(v)}" for k, v in card["classifiers"].items()] or ["- (not recorded)"]
    lines += ["", "## Recipe", "", "```json", json.dumps(card["recipe"], indent=2, default=str), "```", "",
              "## Measured quality", ""]
    overall = [r for r in card["quality"] if r.get("observation") == "all"]
    if overall:
        lines += [f"IoU with the {judge_description(*(overall[0].get(c) for c in ('judge', 'split', 'scoring')))}.", ""]
        lines += ["| method | n | IoU | Dice | hit |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {int(r['n'])} | {r['iou']:.3f} | {r['dice']:.3f} | {r['hit']:.3f} |"
                  for r in overall]
    else:
        lines.append("Not measured (no lesion masks: the phantom's true lesions, or CheXlocalize's segmentations for "
                     "real CheXpert).")
    return "\n".join(lines) + "\n"


def classifier_metrics(paths: Sequence[PathLike]) -> dict[str, Any]:
    """``{classifier name: its metrics}`` from the classifier evaluations' ``metrics_test.json`` files (the name is
    the file's folder)."""
    out = {}
    for p in paths:
        data = load_json(p)
        out[os.path.basename(os.path.dirname(os.fspath(p)))] = {k: v for k, v in (data.get("metrics") or {}).items()
                                                                if "mean" in k}
    return out


def config_recipe(bundle_root: PathLike) -> dict[str, Any]:
    """The DoLL recipe of ``configs/generate_doll.yaml`` (its ``doll`` section), for the data card."""
    import yaml

    with open(os.path.join(os.fspath(bundle_root), "configs", "generate_doll.yaml")) as f:
        return dict(yaml.safe_load(f).get("doll") or {})

"""The bundle's ``configs/metadata.json``: the measured figures the export stage records in it.

The Model Zoo shows ``eval_metrics`` of every bundle; here they come from the shipped model's own evaluation (the
evaluate overlay's ``metrics_test.json``: per-structure means over the test split at the labels' size), never typed
by hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .utils import BundleInputError, PathLike, atomic_write_text


def eval_metrics_from(metrics_json: PathLike, prefix: str = "test_") -> dict[str, Any]:
    """The Dice, IoU and HD95 means of an evaluation's ``metrics_<split>.json`` (keys without ``prefix``), plus the
    evaluated run's identity (task, init, train_size, seed, split, checkpoint) when the file records it."""
    try:
        content = json.loads(open(metrics_json).read())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleInputError(metrics_json, f"cannot read the evaluation's metrics ({e})") from e
    metrics = content.get("metrics") or {}
    out: dict[str, Any] = {}
    for key in sorted(metrics):
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name.startswith(("mean_dice", "dice_", "iou_", "hd95_")):
            out[name] = round(float(metrics[key]), 4)
    if "mean_dice" not in out:
        raise BundleInputError(metrics_json, f"no {prefix}mean_dice among the metrics {sorted(metrics)}")
    for key in ("task", "init", "train_size", "seed", "split", "n_train"):
        if key in content:
            out[key] = content[key]
    return out


def write_eval_metrics(metadata_path: PathLike, eval_metrics: Mapping[str, Any], data: str = "phantom") -> None:
    """Replace ``eval_metrics`` of ``metadata_path`` (the rest of the file kept, 4-space JSON as the zoo writes it)
    with ``eval_metrics`` and the data they were measured on (``data``: e.g. "phantom" or the real dataset)."""
    meta = json.loads(open(metadata_path).read())
    meta["eval_metrics"] = {**dict(eval_metrics), "data": data}
    atomic_write_text(metadata_path, json.dumps(meta, indent=4) + "\n")

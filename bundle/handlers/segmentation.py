"""The evaluation writer of the segmentation configs: per-image Dice/IoU/HD95 rows per structure with the run's
tags, and the predicted masks as PNG."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..constants import slug
from ..utils import PathLike, atomic_write_text

logger = logging.getLogger(__name__)


class SegmentationCSVWriter:
    """Per-image, per-structure Dice, IoU and HD95 (:func:`bundle.metrics.segmentation.segmentation_rows`) of an
    evaluator, written as one tidy CSV with the run's ``tags`` as leading columns; optionally the predicted masks.

    At every iteration the (decollated, thresholded) ``pred`` and ``label`` of each image are compared; at the end
    of the epoch the CSV is written atomically and the means per structure (``<prefix>dice_<structure>``,
    ``..._iou_...``, ``..._hd95_...``; HD95 averages the finite values) and ``<prefix>mean_dice`` are added to
    ``engine.state.metrics`` (attach before the MLflow handler so it logs them).

    Args:
        path: the CSV file.
        structures: channel names.
        tags: constant columns (e.g. ``task``, ``init``, ``train_size``, ``seed``, ``mode``).
        image_key: the item key with the image path (kept by ``CopyItemsd`` before loading); its file stem is the
            ``image`` column (made unique within the run).
        pred_key, label_key: binary prediction and reference ``(C, H, W)``.
        mask_dir: when set, ``<mask_dir>/<image>_<structure>.png`` (0/255) is written for every prediction.
        metric_prefix: prefix of the summary metrics.
        hd95_one_empty: HD95 when exactly one mask is empty: ``nan`` (default) or ``diagonal``.
        enabled: ``False`` makes a no-op (ranks > 0).
    """

    COLUMNS = ("image", "structure", "dice", "iou", "hd95", "pred_area", "ref_area")

    def __init__(self, path: PathLike, structures: Sequence[str], tags: Mapping[str, Any] | None = None,
                 image_key: str = "image_path", pred_key: str = "pred", label_key: str = "label",
                 mask_dir: PathLike | None = None, metric_prefix: str = "test_", hd95_one_empty: str = "nan",
                 enabled: bool = True):
        self.path = os.fspath(path)
        self.structures = [str(s) for s in structures]
        self.tags = dict(tags or {})
        self.image_key = image_key
        self.pred_key = pred_key
        self.label_key = label_key
        self.mask_dir = None if mask_dir is None else os.fspath(mask_dir)
        self.metric_prefix = metric_prefix
        self.hd95_one_empty = hd95_one_empty
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._seen: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.finish)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows, self._seen = [], {}

    def _image_id(self, item: Mapping[str, Any], index: int) -> str:
        src = item.get(self.image_key)
        if src is None and hasattr(item.get("image"), "meta"):
            src = item["image"].meta.get("filename_or_obj")
        stem = os.path.basename(str(src)) if src else f"image{index:05d}"
        for suffix in (".nii.gz", ".dcm"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        stem = os.path.splitext(stem)[0]
        k = self._seen.get(stem, 0)
        self._seen[stem] = k + 1
        return stem if k == 0 else f"{stem}_{k}"

    def collect(self, engine: Engine) -> None:
        from ..data.io import save_png
        from ..metrics.segmentation import segmentation_rows

        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):  # not decollated
            raise ValueError("SegmentationCSVWriter needs a decollated evaluator output (decollate=True)")
        batch = batch if isinstance(batch, list) else [{}] * len(output)
        for b, o in zip(batch, output):
            item = {**b, **o}
            pred = torch.as_tensor(item[self.pred_key]).detach().cpu() > 0.5
            ref = torch.as_tensor(item[self.label_key]).detach().cpu() > 0.5
            image_id = self._image_id(item, len(self.rows) // max(len(self.structures), 1))
            self.rows.extend(segmentation_rows(pred.numpy(), ref.numpy(), image_id, self.structures,
                                               hd95_one_empty=self.hd95_one_empty, **self.tags))
            if self.mask_dir is not None:
                for c, name in enumerate(self.structures):
                    mask = pred[c].numpy().astype(np.uint8) * 255
                    save_png(os.path.join(self.mask_dir, f"{image_id}_{slug(name)}.png"), mask)

    def summary(self) -> dict[str, float]:
        """Means over images per structure (HD95: over its finite values) and the overall mean Dice."""
        out: dict[str, float] = {}
        p = self.metric_prefix
        for name in self.structures:
            rows = [r for r in self.rows if r["structure"] == name]
            if not rows:
                continue
            for metric in ("dice", "iou", "hd95"):
                vals = np.array([r[metric] for r in rows], dtype=np.float64)
                if np.isfinite(vals).any():
                    out[f"{p}{metric}_{slug(name)}"] = float(np.nanmean(vals))
        if self.rows:
            out[f"{p}mean_dice"] = float(np.mean([r["dice"] for r in self.rows]))
        return out

    def finish(self, engine: Engine) -> None:
        import pandas as pd

        columns = [*self.tags, *self.COLUMNS]
        frame = pd.DataFrame(self.rows, columns=columns)
        atomic_write_text(self.path, frame.to_csv(index=False))
        metrics = self.summary()
        engine.state.metrics.update(metrics)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        logger.info("wrote %d rows (%d images) to %s: %s", len(frame), len(self._seen), self.path, shown)


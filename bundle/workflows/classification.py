"""Pieces of the multi-label classification stage: uncertain labels as NaN, a masked loss and a masked AUROC metric.

Labels that the uncertainty policy leaves out of the loss (U-Ignore: ``label_mask == 0``) travel as ``NaN`` inside the
label tensor, so MONAI's default ``prepare_batch`` (``image``, ``label``) carries them without extra keys; the loss
and the metric skip them.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..constants import OBSERVATIONS, slug


class MaskLabelsd(MapTransform):
    """Turn list labels into float tensors and set ``NaN`` where ``mask_key`` is 0 (the entries to ignore)."""

    def __init__(self, keys: KeysCollection = "label", mask_key: str = "label_mask", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(np.asarray(d[key], dtype=np.float32))
            if self.mask_key in d:
                mask = torch.as_tensor(np.asarray(d[self.mask_key], dtype=np.float32))
                label = torch.where(mask > 0, label, torch.full_like(label, float("nan")))
            d[key] = label
        d.pop(self.mask_key, None)
        return d


class MaskedBCEWithLogitsLoss(torch.nn.Module):
    """Binary cross-entropy with logits averaged over the labelled (non-NaN) entries only.

    Args:
        pos_weight: optional per-class weight of positives (as in ``torch.nn.BCEWithLogitsLoss``).
    """

    def __init__(self, pos_weight: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = ~torch.isnan(target)
        target = torch.nan_to_num(target, nan=0.0)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target, pos_weight=self.pos_weight, reduction="none")
        n = valid.sum()
        return (loss * valid).sum() / n.clamp_min(1)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney statistic with mid-ranks for ties); NaN when a class is absent."""
    from scipy.stats import rankdata

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC per column of ``(N, K)`` arrays, skipping NaN labels; NaN where a column lacks a class."""
    out = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        valid = ~np.isnan(labels[:, k])
        out[k] = auroc(scores[valid, k], labels[valid, k])
    return out


class MaskedAUROC(Metric):
    """Mean AUROC over the observations where both classes occur; per-class values are added to
    ``engine.state.metrics`` as ``auroc_<observation>``. ``NaN`` labels are ignored. "No Finding" counts like any
    other observation. Works under DDP (predictions are gathered across ranks).
    """

    def __init__(self, output_transform: Callable = lambda x: x, class_names: Sequence[str] = OBSERVATIONS,
                 exclude: Sequence[int] = (), device: str | torch.device = "cpu"):
        self.class_names = list(class_names)
        self.exclude = set(exclude)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, output: Sequence[torch.Tensor]) -> None:
        y_pred, y = output[0], output[1]
        if isinstance(y_pred, (list, tuple)):  # decollated batch
            y_pred, y = torch.stack(list(y_pred)), torch.stack(list(y))
        self._scores.append(torch.sigmoid(y_pred.detach().float()).cpu())
        self._labels.append(y.detach().float().cpu())

    def per_class(self) -> np.ndarray:
        import ignite.distributed as idist

        scores = torch.cat(self._scores) if self._scores else torch.zeros(0, len(self.class_names))
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0, len(self.class_names))
        if idist.get_world_size() > 1:
            scores, labels = idist.all_gather(scores), idist.all_gather(labels)
        values = per_class_auroc(scores.numpy(), labels.numpy())
        values[list(self.exclude)] = np.nan
        return values

    def compute(self) -> float:
        values = self.per_class()
        self._last = values
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        for k, value in enumerate(self._last):
            if np.isfinite(value):
                engine.state.metrics[f"auroc_{slug(self.class_names[k])}"] = float(value)

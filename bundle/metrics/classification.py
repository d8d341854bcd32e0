"""Classification metrics of the classifier stage: AUROC per observation with masked (unlabelled) entries left out,
and the ignite metric the classifier configs use (:class:`MaskedAUROC`)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric

from ..constants import OBSERVATIONS, slug


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


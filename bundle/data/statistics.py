"""Statistics of a training set's labels, for choices a recipe makes from its data.

:func:`foreground_fractions` gives the mean foreground fraction of each label channel, which the fine-tuning recipe
uses as the new head's output-bias prior (``output_bias_prior`` in ``configs/train.yaml``;
:func:`bundle.networks.segmentation.set_output_bias`): each channel's sigmoid then starts at the fraction of pixels
its structure covers, instead of one fixed prior for structures from 1% (clavicles) to 40% (lungs) of the image.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["foreground_fractions"]


def _deterministic_part(transform: Any) -> Any:
    """The transforms of a MONAI ``Compose`` before its first random one (what ``CacheDataset`` caches), as one
    callable; ``transform`` itself when it is not a ``Compose``."""
    from monai.transforms import Compose, RandomizableTrait, Transform

    if not isinstance(transform, Compose):
        return transform
    first = transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    return transform if first is None else Compose(transform.transforms[:first])


def foreground_fractions(dataset: Any, label_key: str = "label", max_items: int = 256,
                         clip: Sequence[float] = (0.01, 0.99)) -> list[float]:
    """The mean foreground fraction of each channel of ``dataset``'s labels, clipped to ``clip``.

    The labels are read through the dataset's deterministic transforms only (a MONAI ``Dataset`` / ``CacheDataset``
    whose ``transform`` is a ``Compose``: everything before its first random transform, so the figure does not depend
    on the augmentation or on a random state), on at most ``max_items`` items spread evenly over the dataset (every
    item when it has fewer). A label is ``(C, *spatial)``: one fraction per channel ``C``, the mean over the items of
    each item's mean over its pixels (values above 0.5 count as foreground).

    Args:
        dataset: a MONAI ``Dataset`` (``.data``: the items, ``.transform``); any other sequence of dicts is read as is.
        label_key: the label's key in an item.
        max_items: the most items read (evenly spaced, deterministic).
        clip: the lowest and highest fraction returned: a channel empty in every item gets ``clip[0]`` (a prior of 0
            would be an infinite negative logit).

    Returns:
        one fraction per label channel.

    Raises:
        ValueError: an empty dataset, ``max_items < 1``, a ``clip`` not inside (0, 1), or labels whose channel counts
            differ between items (each error names the item).
    """
    lo, hi = (float(c) for c in clip)
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"foreground_fractions: clip must satisfy 0 < low <= high < 1, got {tuple(clip)}")
    if int(max_items) < 1:
        raise ValueError(f"foreground_fractions: max_items must be >= 1, got {max_items}")
    data = getattr(dataset, "data", None)
    transform = getattr(dataset, "transform", None)
    n = len(data) if data is not None else len(dataset)
    if n == 0:
        raise ValueError("foreground_fractions: the dataset is empty")
    picks = np.unique(np.linspace(0, n - 1, num=min(n, int(max_items))).round().astype(int))
    if data is not None and transform is not None:
        read = _deterministic_part(transform)

        def item(i: int) -> Any:
            return read(dict(data[i]))
    else:

        def item(i: int) -> Any:
            return dataset[i]

    sums: np.ndarray | None = None
    for i in picks:
        out = item(int(i))
        label = np.asarray(out[label_key] if isinstance(out, dict) else out, dtype=np.float32)
        if label.ndim < 2:
            raise ValueError(f"foreground_fractions: item {int(i)}'s {label_key!r} has shape {label.shape}, "
                             "expected (channels, *spatial)")
        frac = (label > 0.5).reshape(label.shape[0], -1).mean(axis=1)
        if sums is not None and frac.shape != sums.shape:
            name = data[i].get(label_key, i) if data is not None and isinstance(data[i], dict) else i
            raise ValueError(f"foreground_fractions: item {name!r} has {frac.shape[0]} label channels, "
                             f"the earlier items {sums.shape[0]}")
        sums = frac if sums is None else sums + frac
    assert sums is not None
    fractions = [float(min(max(f, lo), hi)) for f in sums / len(picks)]
    logger.info("foreground fractions of %d labels: %s", len(picks), ", ".join(f"{f:.4f}" for f in fractions))
    return fractions

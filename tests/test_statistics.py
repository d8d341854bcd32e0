"""bundle.data.statistics.foreground_fractions against hand-computed fractions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose, Lambdad, MapTransform, RandomizableTrait

from bundle.data.statistics import foreground_fractions


class _WipeLabel(MapTransform, RandomizableTrait):
    """A random transform that empties the label: it must never reach the statistic."""

    def __call__(self, data):
        d = dict(data)
        d["label"] = torch.zeros_like(d["label"])
        return d


def _items():
    a = np.zeros((2, 4, 4), np.float32)
    a[0, :2] = 1           # channel 0: 8 of 16 pixels
    a[1, 0, 0] = 1         # channel 1: 1 of 16
    b = np.zeros((2, 4, 4), np.float32)
    b[0, :1] = 1           # 4 of 16
    return [{"label": a}, {"label": b}]


@pytest.mark.parametrize("cls", [Dataset, CacheDataset])
def test_fractions_are_the_mean_per_channel_before_the_random_transforms(cls):
    to_tensor = Lambdad("label", torch.as_tensor)
    ds = cls(_items(), transform=Compose([to_tensor, _WipeLabel(keys="label")]), **(
        {"progress": False} if cls is CacheDataset else {}))
    # channel 0: (8/16 + 4/16) / 2 = 0.375; channel 1: (1/16 + 0) / 2 = 1/32
    assert foreground_fractions(ds) == pytest.approx([0.375, 1 / 32])
    # an empty channel is clipped up (a prior of 0 would be an infinite logit)
    assert foreground_fractions(ds, clip=(0.05, 0.99)) == pytest.approx([0.375, 0.05])
    # a plain sequence is read as is
    assert foreground_fractions(_items()) == pytest.approx([0.375, 1 / 32])


def test_max_items_reads_evenly_spaced_items():
    items = [{"label": np.full((1, 2, 2), float(i % 2), np.float32)} for i in range(9)]  # 1 on odd items
    # 3 of 9 items: 0, 4, 8, all even -> empty -> clipped to the lower bound
    assert foreground_fractions(items, max_items=3) == pytest.approx([0.01])
    assert foreground_fractions(items) == pytest.approx([4 / 9])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="empty"):
        foreground_fractions([])
    with pytest.raises(ValueError, match="clip"):
        foreground_fractions(_items(), clip=(0.0, 0.5))
    with pytest.raises(ValueError, match="max_items"):
        foreground_fractions(_items(), max_items=0)
    items = _items() + [{"label": np.zeros((3, 4, 4), np.float32)}]
    with pytest.raises(ValueError, match="3 label channels, the earlier items 2"):
        foreground_fractions(items)

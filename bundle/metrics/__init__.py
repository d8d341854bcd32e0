"""Segmentation metrics (Dice, IoU, HD95) and mask ensembles (union, intersection, majority vote, STAPLE).

Only numpy is imported here; scipy is imported when HD95 is computed.
"""

from __future__ import annotations

from .ensembles import (
    StapleResult,
    ensemble_masks,
    ensemble_rows,
    intersection,
    majority_vote,
    stack_masks,
    staple,
    staple_e_step,
    staple_m_step,
    synergy_rows,
    union,
)
from .segmentation import (
    as_binary_numpy,
    dice,
    hausdorff_percentile,
    hd95,
    iou,
    segmentation_metrics,
    segmentation_rows,
)

__all__ = [
    "as_binary_numpy", "dice", "iou", "hd95", "hausdorff_percentile", "segmentation_metrics",
    "segmentation_rows", "stack_masks", "union", "intersection", "majority_vote", "StapleResult", "staple",
    "staple_e_step", "staple_m_step", "ensemble_masks", "ensemble_rows", "synergy_rows",
]


from .._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__)

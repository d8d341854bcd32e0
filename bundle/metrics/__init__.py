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
    mask_boundary,
    segmentation_metrics,
    segmentation_rows,
)

__all__ = [
    "as_binary_numpy", "dice", "iou", "hd95", "hausdorff_percentile", "mask_boundary", "segmentation_metrics",
    "segmentation_rows", "stack_masks", "union", "intersection", "majority_vote", "StapleResult", "staple",
    "staple_e_step", "staple_m_step", "ensemble_masks", "ensemble_rows", "synergy_rows",
]


def __getattr__(name: str):
    """Import submodules lazily on attribute access (``bundle.<package>.<module>`` in config expressions)."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise

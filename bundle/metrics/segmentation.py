"""Per-image, per-channel segmentation metrics: Dice, IoU (Jaccard) and HD95.

Inputs are binary masks of shape ``(..., H, W)`` (typically ``(C, H, W)`` for one image, or ``(B, C, H, W)``), as
numpy arrays or torch tensors (moved to the CPU). Values must be boolean or in ``{0, 1}``: probabilities must be
thresholded first (a :class:`ValueError` says so). Every function returns a float64 numpy array of the leading
shape ``(...)``: one value per image and channel.

Conventions for empty masks (``ref`` = reference/ground truth, ``pred`` = prediction):

============================  ========  ========  ==========================================================
case                          Dice      IoU       HD95
============================  ========  ========  ==========================================================
both empty                    1.0       1.0       0.0 (nothing to miss: a perfect answer)
exactly one empty             0.0       0.0       ``nan`` (default, ``hd95_one_empty="nan"``) or the image
                                                  diagonal ``sqrt((H*sy)^2 + (W*sx)^2)`` (``"diagonal"``),
                                                  the largest distance two pixels of the image can have
both non-empty                standard  standard  standard
============================  ========  ========  ==========================================================

With ``nan`` (the default) a missed or hallucinated structure does not enter the mean HD95 (use ``numpy.nanmean``
and report how many were ``nan``: Dice already penalises it); ``"diagonal"`` penalises it with the worst possible
distance instead. MONAI's :class:`~monai.metrics.DiceMetric` / :class:`~monai.metrics.MeanIoU` with
``ignore_empty=False`` follow the same Dice/IoU convention; MONAI's :class:`~monai.metrics.HausdorffDistanceMetric`
returns ``nan`` in both empty cases.

Dice, IoU and HD95 are MONAI's (:func:`monai.metrics.compute_dice`, :func:`~monai.metrics.compute_iou`,
:func:`~monai.metrics.compute_hausdorff_distance`), wrapped for the empty cases of the table. The HD95 definition
(the tests check it against a scipy computation): the boundary of a mask is ``mask XOR
binary_erosion(mask)`` (4-connected structuring element, pixels outside the image count as background, so a mask
touching the image border has a boundary there); for every boundary pixel of ``pred`` the Euclidean distance to the
nearest boundary pixel of ``ref`` is taken and vice versa; HD95 is the larger of the two 95th percentiles (linear
interpolation, as ``numpy.percentile``). Distances are in pixels, or in physical units when ``spacing`` =
``(row spacing, column spacing)`` is given (e.g. millimetres from DICOM ``PixelSpacing``).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric

from ..constants import slug

__all__ = [
    "as_binary_numpy",
    "dice",
    "iou",
    "hd95",
    "hausdorff_percentile",
    "segmentation_metrics",
    "segmentation_rows",
]

HD95OneEmpty = Literal["nan", "diagonal"]


def as_binary_numpy(mask: Any, name: str = "mask") -> np.ndarray:
    """Return ``mask`` (numpy array, torch tensor or nested sequence) as a boolean numpy array.

    Raises:
        ValueError: when the values are not boolean or in ``{0, 1}`` (e.g. probabilities that were not thresholded).
    """
    if hasattr(mask, "detach"):  # torch tensor, without importing torch
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = arr[~np.isin(arr, (0, 1))].ravel()[:3]
        raise ValueError(f"{name} must be binary (bool or 0/1); found values such as {bad.tolist()}: "
                         "threshold probabilities first")
    return arr.astype(bool)


def _pair(pred: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    p, r = as_binary_numpy(pred, "pred"), as_binary_numpy(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {p.shape} and {r.shape}")
    if p.ndim < 2:
        raise ValueError(f"masks must be at least 2-D (..., H, W), got shape {p.shape}")
    return p, r


def _bchw(mask: np.ndarray) -> Any:
    """``(..., H, W)`` boolean masks as the ``(N, 1, H, W)`` float tensor MONAI's metric functions take."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask.reshape(-1, 1, *mask.shape[-2:]), dtype=np.float32))


def dice(pred: Any, ref: Any) -> np.ndarray:
    """Dice coefficient ``2|P∩R| / (|P|+|R|)`` per leading index of ``(..., H, W)`` masks (1.0 when both empty):
    MONAI's :func:`monai.metrics.compute_dice` with ``ignore_empty=False``."""
    from monai.metrics import compute_dice

    p, r = _pair(pred, ref)
    out = compute_dice(_bchw(p), _bchw(r), include_background=True, ignore_empty=False)
    return out.double().numpy().reshape(p.shape[:-2])


def iou(pred: Any, ref: Any) -> np.ndarray:
    """Intersection over union ``|P∩R| / |P∪R|`` per leading index (1.0 when both empty): MONAI's
    :func:`monai.metrics.compute_iou` with ``ignore_empty=False``."""
    from monai.metrics import compute_iou

    p, r = _pair(pred, ref)
    out = compute_iou(_bchw(p), _bchw(r), include_background=True, ignore_empty=False)
    return out.double().numpy().reshape(p.shape[:-2])


def _spacing2(spacing: float | Sequence[float] | None) -> tuple[float, float]:
    if spacing is None:
        return (1.0, 1.0)
    if np.isscalar(spacing):
        return (float(spacing), float(spacing))  # type: ignore[arg-type]
    sp = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(sp) != 2:
        raise ValueError(f"spacing must be a number or (row spacing, column spacing), got {spacing}")
    return sp  # type: ignore[return-value]


def hausdorff_percentile(
    pred: Any,
    ref: Any,
    percentile: float = 95.0,
    spacing: float | Sequence[float] | None = None,
    one_empty: HD95OneEmpty = "nan",
) -> np.ndarray:
    """Symmetric percentile Hausdorff distance per leading index of ``(..., H, W)`` binary masks.

    Args:
        pred: predicted binary masks ``(..., H, W)``.
        ref: reference binary masks, same shape.
        percentile: percentile of the surface distances (95 for HD95, 100 for the classic Hausdorff distance).
        spacing: pixel size, a number or ``(row spacing, column spacing)``; default 1 (distances in pixels).
        one_empty: value when exactly one of the masks is empty: ``"nan"`` or ``"diagonal"`` (the image
            diagonal in the units of ``spacing``). When both are empty the distance is 0.

    Returns:
        float64 array of the leading shape of the masks.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    if one_empty not in ("nan", "diagonal"):
        raise ValueError(f"one_empty must be 'nan' or 'diagonal', got {one_empty!r}")
    p, r = _pair(pred, ref)
    sp = _spacing2(spacing)
    h, w = p.shape[-2:]
    diagonal = float(np.hypot(h * sp[0], w * sp[1]))
    lead = p.shape[:-2]
    out = np.empty(lead, dtype=np.float64)
    from monai.metrics import compute_hausdorff_distance

    p2, r2 = p.reshape(-1, h, w), r.reshape(-1, h, w)
    flat = out.reshape(-1)
    p_any, r_any = p2.any(axis=(1, 2)), r2.any(axis=(1, 2))
    flat[~p_any & ~r_any] = 0.0
    flat[p_any != r_any] = np.nan if one_empty == "nan" else diagonal
    both = np.flatnonzero(p_any & r_any)
    if both.size:  # MONAI's definition (its empty cases, NaN, are the ones handled above)
        flat[both] = compute_hausdorff_distance(_bchw(p2[both]), _bchw(r2[both]), include_background=True,
                                                percentile=percentile, spacing=list(sp))[:, 0].double().numpy()
    return out


def hd95(
    pred: Any, ref: Any, spacing: float | Sequence[float] | None = None, one_empty: HD95OneEmpty = "nan"
) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance (see :func:`hausdorff_percentile` and the module docstring)."""
    return hausdorff_percentile(pred, ref, 95.0, spacing=spacing, one_empty=one_empty)


def segmentation_metrics(
    pred: Any,
    ref: Any,
    spacing: float | Sequence[float] | None = None,
    hd95_one_empty: HD95OneEmpty = "nan",
) -> dict[str, np.ndarray]:
    """Dice, IoU, HD95 and the areas of both masks, each an array of the leading shape of ``(..., H, W)`` masks.

    Returns:
        ``{"dice", "iou", "hd95", "pred_area", "ref_area"}`` (areas in pixels).
    """
    p, r = _pair(pred, ref)
    return {
        "dice": dice(p, r),
        "iou": iou(p, r),
        "hd95": hd95(p, r, spacing=spacing, one_empty=hd95_one_empty),
        "pred_area": p.sum(axis=(-2, -1)).astype(np.int64),
        "ref_area": r.sum(axis=(-2, -1)).astype(np.int64),
    }


def segmentation_rows(
    pred: Any,
    ref: Any,
    image_id: str,
    structures: Sequence[str] | None = None,
    spacing: float | Sequence[float] | None = None,
    hd95_one_empty: HD95OneEmpty = "nan",
    **extra: Any,
) -> list[dict[str, Any]]:
    """Tidy rows (one per structure) for one image, ready for ``pandas.DataFrame`` or ``csv.DictWriter``.

    Args:
        pred: predicted binary masks ``(C, H, W)`` (or ``(H, W)`` for one structure).
        ref: reference binary masks of the same shape.
        image_id: identifier written in the ``image`` column.
        structures: channel names (default ``"0", "1", ...``).
        spacing: pixel size for HD95 (see :func:`hausdorff_percentile`).
        hd95_one_empty: HD95 when exactly one mask is empty (``"nan"`` or ``"diagonal"``).
        extra: constant columns added to every row (e.g. ``task="scr", init="doll", seed=0``); they come first.

    Returns:
        list of dicts with keys ``*extra, image, structure, dice, iou, hd95, pred_area, ref_area`` (Python floats
        and ints; ``hd95`` may be ``nan``).
    """
    p, r = _pair(pred, ref)
    if p.ndim == 2:
        p, r = p[None], r[None]
    if p.ndim != 3:
        raise ValueError(f"expected (C, H, W) masks for one image, got shape {p.shape}")
    names = [str(i) for i in range(p.shape[0])] if structures is None else [str(s) for s in structures]
    if len(names) != p.shape[0]:
        raise ValueError(f"{len(names)} structure names for {p.shape[0]} channels")
    m = segmentation_metrics(p, r, spacing=spacing, hd95_one_empty=hd95_one_empty)
    rows = []
    for c, name in enumerate(names):
        row: dict[str, Any] = dict(extra)
        row.update(image=str(image_id), structure=name, dice=float(m["dice"][c]), iou=float(m["iou"][c]),
                   hd95=float(m["hd95"][c]), pred_area=int(m["pred_area"][c]), ref_area=int(m["ref_area"][c]))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------------
# the validation metric of the training configs (ignite)
# ------------------------------------------------------------------------------------------------------------------
def _stack(x: Any) -> torch.Tensor:
    if isinstance(x, (list, tuple)):  # a decollated batch
        return torch.stack([torch.as_tensor(v) for v in x])
    return torch.as_tensor(x)


def per_channel_dice(pred: torch.Tensor, ref: torch.Tensor, ignore_empty: bool = True) -> torch.Tensor:
    """Dice per image and channel of binary ``(B, C, H, W)`` tensors (float64 ``(B, C)``): 1.0 when both are empty,
    ``NaN`` where the reference is empty when ``ignore_empty``."""
    p, r = pred > 0.5, ref > 0.5
    dims = tuple(range(2, p.dim()))
    inter = (p & r).sum(dims).double()
    ref_area = r.sum(dims).double()
    total = p.sum(dims).double() + ref_area
    d = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    if ignore_empty:
        d = torch.where(ref_area > 0, d, torch.full_like(d, float("nan")))
    return d


class MultiLabelDice(Metric):
    """Mean Dice of multi-label binary predictions ``(B, C, H, W)`` (threshold the sigmoid first, e.g. with
    ``AsDiscreted(threshold=0.5)``), averaged over every (image, channel) pair that counts; the per-channel means
    are added to ``engine.state.metrics`` as ``<prefix><structure>``.

    Args:
        output_transform: gives ``(pred, label)``, e.g. ``monai.handlers.from_engine(['pred', 'label'])``.
        names: channel names (default ``0, 1, ...``).
        ignore_empty: skip pairs whose reference is empty (DoLL: most observations are absent from an image);
            otherwise an empty reference with an empty prediction scores 1 and with any prediction 0.
        prefix: prefix of the per-channel metric names (``None``: not added).
        device: ignite's metric device.

    The value is 0.0 when no pair counts (so a best-metric comparison still works). Under DDP the per-image values
    are gathered across ranks.
    """

    def __init__(self, output_transform: Callable = lambda x: x, names: Sequence[str] | None = None,
                 ignore_empty: bool = True, prefix: str | None = "dice_", device: str | torch.device = "cpu"):
        self.names = None if names is None else [str(n) for n in names]
        self.ignore_empty = ignore_empty
        self.prefix = prefix
        self._last: np.ndarray = np.zeros(0)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._values: list[torch.Tensor] = []

    def update(self, output: Sequence[Any]) -> None:
        pred, ref = _stack(output[0]).detach(), _stack(output[1]).detach()
        if pred.shape != ref.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(ref.shape)} differ in shape")
        self._values.append(per_channel_dice(pred, ref, self.ignore_empty).cpu())

    def _gathered(self) -> torch.Tensor:
        import ignite.distributed as idist

        values = torch.cat(self._values) if self._values else torch.zeros(0, len(self.names or []),
                                                                           dtype=torch.float64)
        if idist.get_world_size() > 1:
            values = idist.all_gather(values)
        return values

    def compute(self) -> float:
        values = self._gathered().numpy()
        with np.errstate(all="ignore"):
            finite = np.isfinite(values)
            self._last = np.array([np.nan if not finite[:, c].any() else float(np.nanmean(values[:, c]))
                                   for c in range(values.shape[1])]) if values.size else np.zeros(0)
            return float(np.nanmean(values)) if finite.any() else 0.0

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        if self.prefix is None:
            return
        for c, value in enumerate(self._last):
            if np.isfinite(value):
                label = self.names[c] if self.names is not None and c < len(self.names) else str(c)
                engine.state.metrics[f"{self.prefix}{slug(label)}"] = float(value)


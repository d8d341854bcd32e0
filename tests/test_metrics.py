"""Segmentation metrics: hand-checked values, empty-mask conventions, and agreement with MONAI's metrics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from bundle.metrics.segmentation import (
    as_binary_numpy,
    dice,
    hausdorff_percentile,
    hd95,
    iou,
    segmentation_metrics,
    segmentation_rows,
)


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], n: int = 3) -> np.ndarray:
    """Random union of rectangles (sometimes empty) per leading index."""
    *lead, h, w = shape
    out = np.zeros(shape, dtype=bool)
    for idx in np.ndindex(*lead):
        for _ in range(rng.integers(0, n + 1)):
            r0, c0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
            r1, c1 = rng.integers(r0 + 1, h + 1), rng.integers(c0 + 1, w + 1)
            out[idx + (slice(r0, r1), slice(c0, c1))] = True
    return out


def test_dice_iou_hand_values():
    pred = np.zeros((1, 4, 4), bool)
    ref = np.zeros((1, 4, 4), bool)
    pred[0, 0, :3] = True  # 3 pixels
    ref[0, 0, 1:] = True  # 3 pixels, overlap 2
    assert dice(pred, ref)[0] == pytest.approx(2 * 2 / 6)
    assert iou(pred, ref)[0] == pytest.approx(2 / 4)
    # torch input and (H, W) input give the same numbers
    assert dice(torch.from_numpy(pred[0]), torch.from_numpy(ref[0])) == pytest.approx(2 / 3)


def test_empty_conventions():
    z = np.zeros((2, 8, 8), bool)
    one = z.copy()
    one[:, 2:5, 2:5] = True
    np.testing.assert_array_equal(dice(z, z), [1.0, 1.0])
    np.testing.assert_array_equal(iou(z, z), [1.0, 1.0])
    np.testing.assert_array_equal(hd95(z, z), [0.0, 0.0])
    np.testing.assert_array_equal(dice(one, z), [0.0, 0.0])
    np.testing.assert_array_equal(iou(z, one), [0.0, 0.0])
    assert np.isnan(hd95(one, z)).all() and np.isnan(hd95(z, one)).all()
    diag = hd95(one, z, one_empty="diagonal")
    np.testing.assert_allclose(diag, math.hypot(8, 8))
    np.testing.assert_allclose(hd95(z, one, spacing=(0.5, 2.0), one_empty="diagonal"), math.hypot(4, 16))


def test_hd_hand_values_and_spacing():
    pred = np.zeros((10, 10), bool)
    ref = np.zeros((10, 10), bool)
    pred[2, 2] = True
    ref[2, 7] = True  # single pixels are their own boundary: distance 5
    assert hd95(pred, ref) == pytest.approx(5.0)
    assert hd95(pred, ref, spacing=(1.0, 0.3)) == pytest.approx(1.5)
    # a square shifted by 3 columns: the boundary distances are at most 3
    a = np.zeros((20, 20), bool)
    a[5:12, 5:12] = True
    b = np.roll(a, 3, axis=1)
    assert hausdorff_percentile(a, b, 100) == pytest.approx(3.0)
    assert 0 < hd95(a, b) <= 3.0
    # boundary of a filled square is its outline (4-connectivity erosion)
    edge = scipy_boundary(a)
    assert edge.sum() == 4 * 7 - 4 and not edge[8, 8]
    np.testing.assert_allclose(hd95(a, b), scipy_hd(a, b, 95.0, (1.0, 1.0)))


def scipy_boundary(mask: np.ndarray) -> np.ndarray:
    """The reference boundary: ``mask XOR binary_erosion(mask)`` (4-connectivity, zero border; scipy)."""
    from scipy.ndimage import binary_erosion

    return mask ^ binary_erosion(mask, border_value=0)


def scipy_hd(pred: np.ndarray, ref: np.ndarray, percentile: float, spacing: tuple[float, float]) -> float:
    """An independent HD computation (scipy's Euclidean distance transform) of two non-empty 2-D masks."""
    from scipy.ndimage import distance_transform_edt

    ep, er = scipy_boundary(pred), scipy_boundary(ref)
    d_pr = distance_transform_edt(~er, sampling=spacing)[ep]
    d_rp = distance_transform_edt(~ep, sampling=spacing)[er]
    return max(float(np.percentile(d_pr, percentile)), float(np.percentile(d_rp, percentile)))


def test_binary_validation():
    with pytest.raises(ValueError, match="binary"):
        dice(np.full((2, 2), 0.7), np.ones((2, 2)))
    with pytest.raises(ValueError, match="same shape"):
        iou(np.ones((2, 3)), np.ones((3, 2)))
    assert as_binary_numpy(np.array([0, 1], dtype=np.uint8)).dtype == np.bool_


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_references(seed):
    """Dice/IoU against numpy formulas and MONAI's metric classes, HD95 against scipy (the product calls MONAI's
    functions)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

    rng = np.random.default_rng(seed)
    b, c = 3, 2
    h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
    pred = _blobs(rng, (b, c, h, w))
    ref = _blobs(rng, (b, c, h, w))
    pt, rt = torch.from_numpy(pred.astype(np.float32)), torch.from_numpy(ref.astype(np.float32))
    m_dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pt, rt).numpy()
    m_iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(pt, rt).numpy()
    np.testing.assert_allclose(dice(pred, ref), m_dice, atol=1e-6)
    np.testing.assert_allclose(iou(pred, ref), m_iou, atol=1e-6)
    inter, p_sum, r_sum = (pred & ref).sum((-2, -1)), pred.sum((-2, -1)), ref.sum((-2, -1))
    union = (pred | ref).sum((-2, -1))
    np.testing.assert_allclose(dice(pred, ref), np.where(p_sum + r_sum > 0, 2 * inter / np.maximum(p_sum + r_sum, 1), 1))
    np.testing.assert_allclose(iou(pred, ref), np.where(union > 0, inter / np.maximum(union, 1), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spacing in (None, (0.7, 1.3)):
            m_hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                pt, rt, spacing=spacing).numpy()
            ours = hd95(pred, ref, spacing=spacing)
            both = pred.any(axis=(-2, -1)) & ref.any(axis=(-2, -1))
            assert both.sum() >= 2, "the random case should have non-empty pairs to compare"
            np.testing.assert_allclose(ours[both], m_hd[both], rtol=1e-5, atol=1e-5)
            sp = spacing or (1.0, 1.0)
            ref_hd = [scipy_hd(pred[i, j], ref[i, j], 95.0, sp) for i, j in zip(*np.nonzero(both))]
            np.testing.assert_allclose(ours[both], ref_hd, rtol=1e-5, atol=1e-5)
            # where MONAI says nan (an empty mask) we follow the documented conventions instead
            none = ~pred.any(axis=(-2, -1)) & ~ref.any(axis=(-2, -1))
            assert (ours[none] == 0).all() and np.isnan(ours[~both & ~none]).all()


def test_rows_and_metrics_dict():
    rng = np.random.default_rng(5)
    pred = _blobs(rng, (3, 16, 16))
    ref = _blobs(rng, (3, 16, 16))
    rows = segmentation_rows(pred, ref, "img7", ["lungs", "heart", "clavicles"], task="scr", seed=1)
    assert [r["structure"] for r in rows] == ["lungs", "heart", "clavicles"]
    assert list(rows[0])[:3] == ["task", "seed", "image"]
    m = segmentation_metrics(pred, ref)
    for c, r in enumerate(rows):
        assert r["image"] == "img7" and r["task"] == "scr"
        assert r["dice"] == pytest.approx(m["dice"][c]) and r["iou"] == pytest.approx(m["iou"][c])
        assert r["pred_area"] == int(pred[c].sum()) and r["ref_area"] == int(ref[c].sum())
        # Dice and IoU are linked: D = 2J / (1 + J)
        assert r["dice"] == pytest.approx(2 * r["iou"] / (1 + r["iou"]))
    with pytest.raises(ValueError, match="structure names"):
        segmentation_rows(pred, ref, "x", ["a"])

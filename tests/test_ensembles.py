"""Mask ensembles: union/intersection/majority, STAPLE (hand-checked EM step and known behaviours), synergy rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle.metrics.ensembles import (
    ensemble_masks,
    ensemble_rows,
    intersection,
    majority_vote,
    staple,
    staple_e_step,
    staple_m_step,
    synergy_rows,
    union,
)
from bundle.metrics.segmentation import dice

# 3 raters x 4 voxels. Votes per voxel: (1,1,1), (1,0,1), (0,0,1), (0,0,0).
D = np.array([[1, 1, 0, 0],
              [1, 0, 0, 0],
              [1, 1, 1, 0]], dtype=bool)


def test_union_intersection_majority():
    np.testing.assert_array_equal(union(D), [1, 1, 1, 0])
    np.testing.assert_array_equal(intersection(D), [1, 0, 0, 0])
    np.testing.assert_array_equal(majority_vote(D), [1, 1, 0, 0])
    # even number of raters: a 2-2 tie is background by default, foreground with tie=True
    d4 = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)  # votes 3, 2, 1
    np.testing.assert_array_equal(majority_vote(d4), [1, 0, 0])
    np.testing.assert_array_equal(majority_vote(d4, tie=True), [1, 1, 0])
    # list of torch tensors works too
    np.testing.assert_array_equal(union([torch.tensor(r) for r in D]), union(D))
    with pytest.raises(ValueError, match="same shape"):
        union([np.zeros(3), np.zeros(4)])


def test_staple_one_em_step_by_hand():
    # Hand computation with f = 0.5, p = q = 0.8 for all raters:
    # voxel 1: a = .5*.8^3 = .256, b = .5*.2^3 = .004 -> W = 64/65
    # voxel 2: a = .5*.8*.2*.8 = .064, b = .5*.2*.8*.2 = .016 -> W = 4/5; voxel 3: W = 1/5; voxel 4: W = 1/65
    w = staple_e_step(D, np.full(3, 0.8), np.full(3, 0.8), 0.5)
    np.testing.assert_allclose(w, [64 / 65, 4 / 5, 1 / 5, 1 / 65], rtol=1e-12)
    # M-step: sum W = sum (1 - W) = 2
    # rater 1: p = (64/65 + 4/5)/2 = 58/65, q = (4/5 + 64/65)/2 = 58/65
    # rater 2: p = (64/65)/2 = 32/65,       q = (1/5 + 4/5 + 64/65)/2 = 129/130
    # rater 3: p = (64/65 + 1)/2 = 129/130, q = (64/65)/2 = 32/65
    p, q = staple_m_step(D, w)
    np.testing.assert_allclose(p, [58 / 65, 32 / 65, 129 / 130], rtol=1e-12)
    np.testing.assert_allclose(q, [58 / 65, 129 / 130, 32 / 65], rtol=1e-12)
    # the full function with one EM step gives the same p, q (the default prior, the mean of D, is 0.5 here)
    res = staple(D, max_iter=1, init_sensitivity=0.8, init_specificity=0.8)
    assert res.prior == pytest.approx(0.5) and res.n_iter == 1 and not res.converged
    np.testing.assert_allclose(res.sensitivity, p, rtol=1e-12)
    np.testing.assert_allclose(res.specificity, q, rtol=1e-12)
    # and its posterior is the E-step under those p, q
    np.testing.assert_allclose(res.posterior, staple_e_step(D, p, q, 0.5), rtol=1e-12)


def test_staple_identical_raters():
    rng = np.random.default_rng(0)
    m = rng.random((2, 12, 12)) > 0.6
    res = staple([m, m, m])
    np.testing.assert_array_equal(res.mask, m)
    np.testing.assert_allclose(res.sensitivity, 1.0)
    np.testing.assert_allclose(res.specificity, 1.0)
    assert res.converged and res.posterior.shape == m.shape


def test_staple_complement_rater_gets_low_performance():
    rng = np.random.default_rng(1)
    truth = rng.random((30, 30)) > 0.7
    raters = [truth, truth, ~truth]
    res = staple(raters)
    np.testing.assert_array_equal(res.mask, truth)
    assert res.sensitivity[2] < 0.05 and res.specificity[2] < 0.05
    assert (res.sensitivity[:2] > 0.95).all() and (res.specificity[:2] > 0.95).all()


def test_staple_recovers_truth_with_one_perfect_rater():
    rng = np.random.default_rng(2)
    truth = np.zeros((40, 40), bool)
    truth[10:30, 8:25] = True
    raters = [truth]
    for flip in (0.2, 0.25, 0.3):  # noisy raters: independent label flips
        raters.append(truth ^ (rng.random(truth.shape) < flip))
    # with the correct prior, STAPLE recovers the truth exactly and finds the perfect rater
    res = staple(raters, prior=float(truth.mean()))
    np.testing.assert_array_equal(res.mask, truth)
    assert res.sensitivity[0] > 0.95 and res.specificity[0] > 0.99
    assert (res.sensitivity[1:] < 0.85).all() and (res.specificity[1:] < 0.85).all()
    # with the default prior (the mean of the noisy decisions, 0.33 against a true 0.21) it is not exact, but it
    # still ranks the perfect rater first and beats majority vote by far
    res = staple(raters)
    assert res.prior == pytest.approx(np.mean(raters)) and res.converged
    assert int(np.argmax(res.sensitivity)) == 0 and int(np.argmax(res.specificity)) == 0
    assert dice(res.mask, truth) > 0.95
    assert dice(res.mask, truth) > dice(majority_vote(raters), truth) + 0.05


def test_staple_given_prior_and_validation():
    res_low = staple(D, prior=0.05, max_iter=1, init_sensitivity=0.8, init_specificity=0.8)
    res_high = staple(D, prior=0.95, max_iter=1, init_sensitivity=0.8, init_specificity=0.8)
    assert res_low.prior == 0.05 and (res_low.posterior <= res_high.posterior + 1e-12).all()
    with pytest.raises(ValueError, match="prior"):
        staple(D, prior=1.5)
    with pytest.raises(ValueError, match="max_iter"):
        staple(D, max_iter=0)


def test_ensemble_rows_and_synergy():
    ref = np.zeros((2, 10, 10), bool)
    ref[0, 2:8, 2:8] = True
    ref[1, 1:4, 1:9] = True
    a = ref.copy()
    a[0, 2:8, 5:8] = False  # model a misses the right half of structure 0
    b = ref.copy()
    b[0, 2:8, 2:5] = False  # model b misses the left half
    b[1] = False  # and all of structure 1
    rows = synergy_rows({"a": a, "b": b}, ref, "img1", ["s0", "s1"], task="t")
    assert len(rows) == 2 and rows[0]["model_a"] == "a" and rows[0]["task"] == "t"
    r0, r1 = rows
    # structure 0: the union recovers the truth, the intersection is empty
    assert r0["dice_a"] == pytest.approx(2 * 18 / (18 + 36)) and r0["dice_union"] == 1.0
    assert r0["dice_intersection"] == 0.0 and r0["gain_union"] == pytest.approx(1.0 - r0["dice_a"])
    # structure 1: a is perfect, b empty: union = a, intersection empty
    assert r1["dice_a"] == 1.0 and r1["dice_b"] == 0.0 and r1["gain_union"] == 0.0
    assert r1["gain_intersection"] == -1.0

    erows = ensemble_rows({"a": a, "b": b, "c": ref}, ref, "img1", ["s0", "s1"])
    by = {(r["method"], r["models"], r["structure"]): r["dice"] for r in erows}
    assert by[("single", "c", "s0")] == 1.0
    assert by[("union", "a+b+c", "s0")] == 1.0 and by[("majority", "a+b+c", "s1")] == 1.0
    assert by[("staple", "a+b+c", "s0")] == pytest.approx(dice(ensemble_masks([a, b, ref])["staple"], ref)[0])
    with pytest.raises(ValueError, match="at least two"):
        synergy_rows({"a": a}, ref, "x")

"""Paired statistics: Wilcoxon, bootstrap CI, effect sizes, Holm, replicability and the comparison table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bundle.stats.paired import (
    cohens_dz,
    compare_inits,
    holm,
    paired_bootstrap_ci,
    rank_biserial,
    replicability,
    replicability_summary,
    wilcoxon_signed_rank,
)

D = np.array([1.0, -2.0, 3.0, 4.0, 0.0])


def test_wilcoxon_known_values():
    # five positive differences: exact two-sided p = 2 / 2^5
    r = wilcoxon_signed_rank([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert r.pvalue == pytest.approx(2 / 32) and r.statistic == 0.0 and r.n == 5 and r.n_nonzero == 5
    # zero dropped (wilcox): ranks 1..4 of |1, 2, 3, 4|, T- = 2 -> statistic min(T+, T-) = 2
    r = wilcoxon_signed_rank(D)
    assert r.statistic == 2.0 and r.n == 5 and r.n_nonzero == 4
    ref = stats.wilcoxon(D, zero_method="wilcox")
    assert r.pvalue == pytest.approx(ref.pvalue)
    # pratt ranks the zero (rank 1) then drops it: T- = 3; zsplit gives it half to each side: T- = 3.5
    assert wilcoxon_signed_rank(D, zero_method="pratt").statistic == 3.0
    assert wilcoxon_signed_rank(D, zero_method="zsplit").statistic == 3.5
    # one-sided
    assert wilcoxon_signed_rank([1, 2, 3, 4, 5], np.zeros(5), alternative="greater").pvalue == pytest.approx(1 / 32)
    # degenerate cases
    r0 = wilcoxon_signed_rank(np.zeros(4), np.zeros(4))
    assert r0.pvalue == 1.0 and r0.n_nonzero == 0
    assert np.isnan(wilcoxon_signed_rank([], []).pvalue)
    with pytest.raises(ValueError, match="same length"):
        wilcoxon_signed_rank([1, 2], [1])


def test_rank_biserial_and_dz_by_hand():
    # wilcox: T+ = 1 + 3 + 4 = 8, T- = 2 -> r = 6/10
    assert rank_biserial(D) == pytest.approx(0.6)
    # pratt: ranks of |0,1,2,3,4| are 1..5, zero dropped: T+ = 2+4+5 = 11, T- = 3 -> r = 8/14
    assert rank_biserial(D, zero_method="pratt") == pytest.approx(8 / 14)
    # zsplit: T+ = 11.5, T- = 3.5 -> 8/15
    assert rank_biserial(D, zero_method="zsplit") == pytest.approx(8 / 15)
    # with no zeros and no ties r = 1 - 2 min(T) / (n(n+1)/2), linked to scipy's statistic
    d = np.array([0.3, -0.1, 0.7, 0.2, -0.05, 0.9])
    t = stats.wilcoxon(d).statistic
    assert rank_biserial(d) == pytest.approx(1 - 2 * t / (6 * 7 / 2))
    assert rank_biserial([2, 3], [1, 1]) == 1.0 and rank_biserial([1, 1], [2, 3]) == -1.0
    # d_z: mean 1.2, sd (ddof=1) = sqrt(22.8 / 4)
    assert cohens_dz(D) == pytest.approx(1.2 / np.sqrt(22.8 / 4))
    assert cohens_dz(np.zeros(3)) == 0.0 and cohens_dz(np.ones(3)) == np.inf
    assert np.isnan(cohens_dz([1.0]))


def test_holm_hand_worked_and_procedure():
    # sorted: .005*4 = .02, .01*3 = .03, .03*2 = .06, .04*1 = .04 -> monotone max: .06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    out = holm([0.01, np.nan, 0.02])  # NaN not counted: m = 2
    assert np.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)
    with pytest.raises(ValueError):
        holm([0.2, 1.5])
    # against a direct implementation of the sequential step-down rejection rule
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 12))
        p = rng.random(m) ** 3
        adj = holm(p)
        assert (adj >= p - 1e-15).all() and (adj <= np.minimum(1, m * p) + 1e-15).all()
        for alpha in (0.01, 0.05, 0.1):
            reject = np.zeros(m, bool)
            for k, i in enumerate(np.argsort(p, kind="stable")):
                if p[i] > alpha / (m - k):
                    break
                reject[i] = True
            np.testing.assert_array_equal(adj <= alpha, reject)


def test_bootstrap_deterministic_and_covers():
    rng = np.random.default_rng(1)
    x = rng.normal(0.8, 0.05, 40)
    y = x - 0.03 + rng.normal(0, 0.02, 40)
    ci1 = paired_bootstrap_ci(x, y, n_boot=2000, seed=3)
    assert ci1 == paired_bootstrap_ci(x, y, n_boot=2000, seed=3)
    assert ci1 != paired_bootstrap_ci(x, y, n_boot=2000, seed=4)
    assert ci1[0] < np.mean(x - y) < ci1[1]
    # close to scipy's percentile bootstrap and to BCa on this symmetric example
    sp = stats.bootstrap((x - y,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(0))
    assert ci1 == pytest.approx((sp.confidence_interval.low, sp.confidence_interval.high), abs=2e-3)
    bca = paired_bootstrap_ci(x, y, n_boot=2000, seed=3, method="bca")
    assert bca == pytest.approx(ci1, abs=3e-3)
    # coverage of the true mean difference 0.03 over independent synthetic experiments
    true_diff, hits, trials = 0.03, 0, 100
    for t in range(trials):
        r = np.random.default_rng(100 + t)
        a = r.normal(0.7, 0.1, 30)
        b = a - true_diff + r.normal(0, 0.05, 30)
        lo, hi = paired_bootstrap_ci(a, b, n_boot=1000, seed=t)
        hits += lo <= true_diff <= hi
    assert 0.85 <= hits / trials <= 1.0
    # degenerate inputs
    assert paired_bootstrap_ci([0.5, 0.6], [0.4, 0.5]) == pytest.approx((0.1, 0.1))
    assert np.isnan(paired_bootstrap_ci([], [])[0])


def test_replicability():
    s = replicability_summary([0.8, 0.9, 1.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.9) and s["sd"] == pytest.approx(0.1)
    assert s["cv"] == pytest.approx(0.1 / 0.9)
    assert np.isnan(replicability_summary([0.5])["sd"])
    df = pd.DataFrame({
        "init": ["a"] * 4 + ["b"] * 4,
        "seed": [0, 0, 1, 1] * 2,
        "image": ["i1", "i2"] * 4,
        "dice": [0.6, 0.8, 0.8, 1.0, 0.5, 0.5, 0.5, 0.5],
    })
    rep = replicability(df)  # seeds of a: means 0.7, 0.9; of b: 0.5, 0.5
    a = rep[rep["init"] == "a"].iloc[0]
    b = rep[rep["init"] == "b"].iloc[0]
    assert a["n_seeds"] == 2 and a["mean"] == pytest.approx(0.8) and a["sd"] == pytest.approx(np.sqrt(0.02))
    assert b["sd"] == 0.0 and b["cv"] == 0.0


def _synthetic_table() -> pd.DataFrame:
    """Two tasks x two sizes x 3 seeds x 25 images: 'doll' is +0.05 better on task A, equal on task B."""
    rng = np.random.default_rng(7)
    rows = []
    for task, effect in (("A", 0.05), ("B", 0.0)):
        for size in (4, 16):
            base = rng.uniform(0.5, 0.8, 25)
            for seed in range(3):
                for i in range(25):
                    noise = rng.normal(0, 0.02, 3)
                    for init, shift, k in (("random", 0.0, 0), ("doll", effect, 1), ("imagenet", 0.0, 2)):
                        rows.append({"task": task, "size": size, "seed": seed, "init": init, "image": f"im{i}",
                                     "dice": base[i] + shift + noise[k]})
    return pd.DataFrame(rows)


def test_compare_inits_table():
    df = _synthetic_table()
    tab = compare_inits(df, reference="random", n_boot=500)
    assert list(tab.columns[:3]) == ["task", "size", "init"] and len(tab) == 8
    assert (tab["n"] == 25).all() and (tab["reference"] == "random").all()
    # the table's numbers are the functions' numbers
    sel = (df.task == "A") & (df["size"] == 4)
    x = df[sel & (df.init == "doll")].groupby("image")["dice"].mean().sort_index().to_numpy()
    y = df[sel & (df.init == "random")].groupby("image")["dice"].mean().sort_index().to_numpy()
    row = tab[(tab.task == "A") & (tab["size"] == 4) & (tab.init == "doll")].iloc[0]
    assert row["mean_diff"] == pytest.approx((x - y).mean())
    assert row["p_value"] == pytest.approx(stats.wilcoxon(x - y).pvalue)
    assert row["rank_biserial"] == pytest.approx(rank_biserial(x, y))
    assert row["cohens_dz"] == pytest.approx(cohens_dz(x, y))
    np.testing.assert_allclose(tab["p_holm"], holm(tab["p_value"]))
    # conclusions follow the numbers: doll better on task A only
    doll_a = tab[(tab.task == "A") & (tab.init == "doll")]
    assert doll_a["significant"].all() and (doll_a["ci_low"] > 0).all()
    assert all(c.startswith("doll better than random") for c in doll_a["conclusion"])
    others = tab[~((tab.task == "A") & (tab.init == "doll"))]
    assert not others["significant"].any()
    assert all("no significant difference" in c for c in others["conclusion"])
    # deterministic, and independent of the order of the input rows
    shuffled = df.sample(frac=1.0, random_state=0)
    pd.testing.assert_frame_equal(tab, compare_inits(shuffled, reference="random", n_boot=500))
    # training sizes may mix numbers and text ("all"): numbers first, in numeric order
    mixed = df.assign(size=df["size"].map({4: 4, 16: "all"}))
    assert list(compare_inits(mixed, reference="random", n_boot=50)["size"][:4]) == [4, 4, "all", "all"]


def test_compare_inits_options():
    df = _synthetic_table()
    by_seed = compare_inits(df, reference="random", unit="seed", n_boot=200)
    assert (by_seed["n"] == 3).all()
    per_image = compare_inits(df, reference="random", unit="image", n_boot=200)
    assert (per_image["n"] == 75).all()
    fam = compare_inits(df, reference="random", n_boot=200, holm_by=["task"])
    for task in ("A", "B"):
        sub = fam[fam.task == task]
        np.testing.assert_allclose(sub["p_holm"], holm(sub["p_value"]))
    # lower-is-better metrics flip the verdict
    hd = df.assign(hd95=10 - 10 * df["dice"])
    t = compare_inits(hd, reference="random", value_col="hd95", higher_is_better=True, n_boot=200)
    f = compare_inits(hd, reference="random", value_col="hd95", higher_is_better=False, n_boot=200)
    sig = t["significant"].to_numpy()
    assert sig.any()
    assert all("worse than" in c for c in t["conclusion"][sig])
    assert all("better than" in c for c in f["conclusion"][sig])
    with pytest.raises(ValueError, match="reference init"):
        compare_inits(df, reference="nope")
    with pytest.raises(ValueError, match="missing columns"):
        compare_inits(df.drop(columns="image"), reference="random")

"""Paired statistics between initialisation strategies (e.g. DoLL pre-training against random init), as in the
statistical analysis of Ghosal and Shah (arXiv:2011.05791): Wilcoxon signed-rank tests, paired bootstrap confidence
intervals of the mean difference, effect sizes, Holm correction across a family of tests, and replicability across
seeds.

Conventions (all functions):

- ``x`` and ``y`` are paired scores (e.g. per-image Dice of init A and of the reference init B on the same test
  images); the difference is ``d = x - y``, so a positive mean difference means ``x`` scores higher.
- Wilcoxon signed-rank: :func:`scipy.stats.wilcoxon` on ``d``, two-sided by default (``H0``: the distribution of
  ``d`` is symmetric about 0). ``zero_method="wilcox"`` (default) drops zero differences before ranking (Wilcoxon's
  original proposal; the number of non-zero pairs is reported); ``"pratt"`` ranks them and then drops them;
  ``"zsplit"`` splits their ranks between the positive and negative sums. ``method="auto"`` uses the exact null
  distribution for small samples without ties or zeros, the normal approximation otherwise. When every difference
  is zero the test is not defined: we return statistic 0 and ``p = 1`` (no evidence of a difference).
- Paired bootstrap: resample the pairs (i.e. the differences) with replacement, ``n_boot`` times, from
  ``numpy.random.default_rng(seed)``; the percentile CI is the ``(α/2, 1-α/2)`` quantiles of the resampled means.
  ``method="bca"`` uses :func:`scipy.stats.bootstrap` (bias-corrected and accelerated) with the same seed.
- Matched-pairs rank-biserial correlation (Kerby 2014): ``r = (T+ - T-) / (T+ + T-)`` with ``T±`` the rank sums of
  the positive/negative differences, zeros handled as in ``zero_method``. It lies in ``[-1, 1]``; ``+1`` when every
  non-zero difference is positive.
- Cohen's ``d_z = mean(d) / sd(d)`` (``ddof=1``); ``0`` when every difference is zero, ``±inf`` when the
  differences are constant and non-zero.
- Holm(-Bonferroni) step-down adjustment: with ``m`` p-values sorted ascending ``p_(1) <= ... <= p_(m)``,
  ``p~_(i) = max_{k <= i} min(1, (m - k + 1) p_(k))``; rejecting ``p~ < α`` controls the family-wise error rate at
  ``α``. NaN p-values are left NaN and not counted in ``m``.
- Replicability across seeds: per group, the mean over images is taken within each seed, then the mean, SD
  (``ddof=1``) and coefficient of variation ``CV = SD / |mean|`` across seeds.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "paired_differences",
    "WilcoxonResult",
    "wilcoxon_signed_rank",
    "paired_bootstrap_ci",
    "rank_biserial",
    "cohens_dz",
    "holm",
    "replicability_summary",
    "replicability",
    "compare_inits",
    "adjust_table",
]

ZeroMethod = Literal["wilcox", "pratt", "zsplit"]
Alternative = Literal["two-sided", "greater", "less"]


def paired_differences(x: Any, y: Any | None = None) -> np.ndarray:
    """``x - y`` as a float64 1-D array (or ``x`` itself when ``y`` is None), checking shapes and finiteness."""
    xa = np.asarray(x, dtype=np.float64).ravel()
    if y is None:
        d = xa
    else:
        ya = np.asarray(y, dtype=np.float64).ravel()
        if xa.shape != ya.shape:
            raise ValueError(f"paired samples must have the same length, got {xa.size} and {ya.size}")
        d = xa - ya
    if not np.isfinite(d).all():
        raise ValueError("paired samples contain NaN or infinite values: drop those pairs first")
    return d


@dataclass
class WilcoxonResult:
    """Result of :func:`wilcoxon_signed_rank`.

    Attributes:
        statistic: scipy's statistic (two-sided: ``min(T+, T-)``; one-sided: ``T+``).
        pvalue: p-value.
        n: number of pairs.
        n_nonzero: number of non-zero differences.
        zero_method: how zero differences were handled.
        alternative: ``"two-sided"``, ``"greater"`` (x > y) or ``"less"``.
    """

    statistic: float
    pvalue: float
    n: int
    n_nonzero: int
    zero_method: str
    alternative: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def wilcoxon_signed_rank(
    x: Any,
    y: Any | None = None,
    zero_method: ZeroMethod = "wilcox",
    alternative: Alternative = "two-sided",
    method: str = "auto",
) -> WilcoxonResult:
    """Wilcoxon signed-rank test of the paired differences ``x - y`` (see the module docstring for conventions).

    Returns ``pvalue = nan`` when there are no pairs, and ``statistic = 0, pvalue = 1`` when every difference is 0.
    """
    from scipy import stats

    d = paired_differences(x, y)
    n, nz = int(d.size), int(np.count_nonzero(d))
    if n == 0:
        return WilcoxonResult(float("nan"), float("nan"), 0, 0, zero_method, alternative)
    if nz == 0:
        return WilcoxonResult(0.0, 1.0, n, 0, zero_method, alternative)
    res = stats.wilcoxon(d, zero_method=zero_method, alternative=alternative, method=method)
    return WilcoxonResult(float(res.statistic), float(res.pvalue), n, nz, zero_method, alternative)


def paired_bootstrap_ci(
    x: Any,
    y: Any | None = None,
    n_boot: int = 10000,
    confidence: float = 0.95,
    seed: int | Sequence[int] = 0,
    method: Literal["percentile", "bca"] = "percentile",
) -> tuple[float, float]:
    """Bootstrap confidence interval of the mean paired difference ``mean(x - y)``.

    Args:
        x: scores of the first strategy (or the differences when ``y`` is None).
        y: paired scores of the second strategy.
        n_boot: number of bootstrap resamples.
        confidence: confidence level, e.g. 0.95.
        seed: seed of ``numpy.random.default_rng`` (an int or a sequence of ints): equal seeds give equal
            intervals.
        method: ``"percentile"`` (resample pairs, quantiles of the resampled means) or ``"bca"``
            (:func:`scipy.stats.bootstrap` with ``method="BCa"``).

    Returns:
        ``(low, high)``; ``(nan, nan)`` with no pairs, ``(d, d)`` when all differences equal ``d`` (one pair
        included).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    d = paired_differences(x, y)
    if d.size == 0:
        return (float("nan"), float("nan"))
    if np.ptp(d) == 0:
        return (float(d[0]), float(d[0]))
    alpha = 1.0 - confidence
    rng = np.random.default_rng(seed)
    if method == "percentile":
        n = d.size
        means = np.empty(n_boot, dtype=np.float64)
        chunk = max(1, 2_000_000 // n)  # bound the memory of the index matrix
        for start in range(0, n_boot, chunk):
            stop = min(n_boot, start + chunk)
            idx = rng.integers(0, n, size=(stop - start, n))
            means[start:stop] = d[idx].mean(axis=1)
        low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
        return (float(low), float(high))
    if method == "bca":
        from scipy import stats

        res = stats.bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=confidence, method="BCa",
                              vectorized=True, rng=rng)
        return (float(res.confidence_interval.low), float(res.confidence_interval.high))
    raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")


def _signed_rank_sums(d: np.ndarray, zero_method: ZeroMethod) -> tuple[float, float]:
    from scipy.stats import rankdata

    if zero_method == "wilcox":
        d = d[d != 0]
    if d.size == 0:
        return (0.0, 0.0)
    ranks = rankdata(np.abs(d))
    t_plus = float(ranks[d > 0].sum())
    t_minus = float(ranks[d < 0].sum())
    if zero_method == "zsplit":
        half_zero = float(ranks[d == 0].sum()) / 2.0
        t_plus, t_minus = t_plus + half_zero, t_minus + half_zero
    elif zero_method not in ("wilcox", "pratt"):
        raise ValueError(f"zero_method must be 'wilcox', 'pratt' or 'zsplit', got {zero_method!r}")
    return t_plus, t_minus


def rank_biserial(x: Any, y: Any | None = None, zero_method: ZeroMethod = "wilcox") -> float:
    """Matched-pairs rank-biserial correlation ``(T+ - T-) / (T+ + T-)`` of ``x - y`` (0 when all differences are 0).
    """
    t_plus, t_minus = _signed_rank_sums(paired_differences(x, y), zero_method)
    total = t_plus + t_minus
    return 0.0 if total == 0 else (t_plus - t_minus) / total


def cohens_dz(x: Any, y: Any | None = None) -> float:
    """Cohen's ``d_z``: mean paired difference over its standard deviation (``ddof=1``).

    Returns ``nan`` with fewer than two pairs, 0 when every difference is 0, ``±inf`` when they are constant.
    """
    d = paired_differences(x, y)
    if d.size < 2:
        return float("nan")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return 0.0 if mean == 0.0 else float(np.copysign(np.inf, mean))
    return mean / sd


def holm(pvalues: Any) -> np.ndarray:
    """Holm(-Bonferroni) step-down adjusted p-values, in the input order (NaN entries stay NaN, not counted).

    Reject the hypotheses whose adjusted p-value is below ``α``: this controls the family-wise error rate at ``α``.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    flat_p, flat_out = p.ravel(), out.reshape(-1)
    ok = np.flatnonzero(~np.isnan(flat_p))
    m = ok.size
    if m == 0:
        return out
    if ((flat_p[ok] < 0) | (flat_p[ok] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    order = ok[np.argsort(flat_p[ok], kind="stable")]
    scaled = (m - np.arange(m)) * flat_p[order]
    flat_out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def replicability_summary(values: Any) -> dict[str, float]:
    """``{n, mean, sd, cv, min, max}`` of per-seed scores (``sd`` with ``ddof=1``; ``cv = sd / |mean|``).

    ``sd`` and ``cv`` are NaN with fewer than two values; ``cv`` is NaN when the mean is 0.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    n = int(v.size)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "cv": float("nan"), "min": float("nan"),
                "max": float("nan")}
    mean = float(v.mean())
    sd = float(v.std(ddof=1)) if n > 1 else float("nan")
    cv = sd / abs(mean) if (n > 1 and mean != 0) else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "cv": cv, "min": float(v.min()), "max": float(v.max())}


def _sort_key(value: Any) -> tuple[int, Any]:
    """Order numbers numerically before other values (as text), so that sizes like ``2, 4, 16, "all"`` sort."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def _ordered(rows: list[dict[str, Any]], cols: Sequence[str]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: tuple(_sort_key(r[c]) for c in cols))


def _default_by(df: pd.DataFrame) -> list[str]:
    return [c for c in ("task", "structure", "size") if c in df.columns]


def replicability(
    df: pd.DataFrame,
    by: Sequence[str] | None = None,
    seed_col: str = "seed",
    value_col: str = "dice",
) -> pd.DataFrame:
    """Replicability across seeds: per group, average ``value_col`` over the rows of each seed (its test images),
    then summarise the per-seed means (see :func:`replicability_summary`).

    Args:
        df: tidy table with at least ``seed_col`` and ``value_col``.
        by: grouping columns; default: those of ``task``, ``structure``, ``size``, ``init`` present.
        seed_col: the seed column.
        value_col: the score column.

    Returns:
        DataFrame with ``*by, n_seeds, mean, sd, cv, min, max`` (one row per group, sorted by ``by``).
    """
    import pandas as pd

    by = list(by) if by is not None else _default_by(df) + (["init"] if "init" in df.columns else [])
    _require(df, [*by, seed_col, value_col])
    per_seed = df.groupby([*by, seed_col], dropna=False, sort=False)[value_col].mean().reset_index()
    rows = []
    groups = per_seed.groupby(by, dropna=False, sort=False) if by else [((), per_seed)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        s = replicability_summary(g[value_col].to_numpy())
        rows.append({**dict(zip(by, key)), "n_seeds": s.pop("n"), **s})
    return pd.DataFrame(_ordered(rows, by), columns=[*by, "n_seeds", "mean", "sd", "cv", "min", "max"])


def _require(df: pd.DataFrame, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"missing columns {missing}; the table has {list(df.columns)}")


_UNIT_KEYS = {"image_mean": ("image",), "image": ("seed", "image"), "seed": ("seed",)}


def _fmt_p(p: float) -> str:
    return "nan" if np.isnan(p) else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def compare_inits(
    df: pd.DataFrame,
    reference: str,
    by: Sequence[str] | None = None,
    init_col: str = "init",
    value_col: str = "dice",
    unit: Literal["image_mean", "image", "seed"] = "image_mean",
    seed_col: str = "seed",
    image_col: str = "image",
    alpha: float = 0.05,
    n_boot: int = 10000,
    confidence: float = 0.95,
    ci_method: Literal["percentile", "bca"] = "percentile",
    zero_method: ZeroMethod = "wilcox",
    holm_by: Sequence[str] | None = None,
    higher_is_better: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Compare every init strategy with a reference init, per group (task, structure, training-set size ...).

    For each group of ``by`` and each init other than ``reference``, the scores are paired with the reference's on
    the same units, and the table reports the mean difference (init - reference), its paired bootstrap CI, the
    two-sided Wilcoxon signed-rank p-value, the Holm-adjusted p-value, the rank-biserial correlation and Cohen's
    ``d_z``, a ``significant`` flag (``p_holm < alpha``) and a one-line conclusion computed from those numbers.

    Args:
        df: tidy table, one row per score, e.g. columns ``task, size, seed, init, image, dice`` (and ``structure``).
        reference: the init every other init is compared with (e.g. ``"random"``).
        by: grouping columns; default: those of ``task``, ``structure``, ``size`` present.
        init_col: the init-strategy column.
        value_col: the score column.
        unit: the paired unit.
            ``"image_mean"`` (default): average each image's score over seeds (and over any column not in ``by``,
            e.g. structures), then pair by image: the test images are the independent units.
            ``"image"``: pair by ``(seed, image)`` without averaging (pools seeds; pairs are not independent
            across seeds, since the same image recurs).
            ``"seed"``: average over images within each seed, then pair by seed (the units are training runs).
        seed_col: the seed column (used by ``"image"`` and ``"seed"``).
        image_col: the image column (used by ``"image_mean"`` and ``"image"``).
        alpha: family-wise significance level for the Holm-adjusted p-values.
        n_boot: bootstrap resamples.
        confidence: level of the bootstrap CI.
        ci_method: ``"percentile"`` or ``"bca"``.
        zero_method: Wilcoxon zero handling (also used by the rank-biserial correlation).
        holm_by: columns whose groups are separate Holm families (e.g. ``["task"]``); default: the whole table is
            one family.
        higher_is_better: the direction of "better" in the conclusion (False for distances such as HD95).
        seed: bootstrap seed; each comparison draws from ``default_rng([seed, crc32(its group and init)])``, so
            the table is deterministic and does not depend on the order of the rows of ``df``.

    Returns:
        DataFrame with columns ``*by, init, reference, n, mean_init, mean_reference, mean_diff, ci_low, ci_high,
        wilcoxon_stat, p_value, p_holm, rank_biserial, cohens_dz, significant, conclusion``.
    """
    import pandas as pd

    if unit not in _UNIT_KEYS:
        raise ValueError(f"unit must be one of {sorted(_UNIT_KEYS)}, got {unit!r}")
    by = list(by) if by is not None else _default_by(df)
    keys = [{"seed": seed_col, "image": image_col}[k] for k in _UNIT_KEYS[unit]]
    _require(df, [*by, init_col, value_col, *keys])
    if reference not in set(df[init_col]):
        raise ValueError(f"reference init {reference!r} not found in column {init_col!r}: "
                         f"{sorted(map(str, set(df[init_col])))}")
    data = df[[*by, init_col, *keys, value_col]].dropna(subset=[value_col])
    unit_scores = data.groupby([*by, init_col, *keys], dropna=False, sort=False)[value_col].mean().reset_index()

    columns = [*by, "init", "reference", "n", "mean_init", "mean_reference", "mean_diff", "ci_low", "ci_high",
               "wilcoxon_stat", "p_value", "p_holm", "rank_biserial", "cohens_dz", "significant", "conclusion"]
    rows: list[dict[str, Any]] = []
    groups = unit_scores.groupby(by, dropna=False, sort=False) if by else [((), unit_scores)]
    for gkey, g in groups:
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        ref = g[g[init_col] == reference][[*keys, value_col]]
        for init in sorted(set(g[init_col]) - {reference}, key=str):
            other = g[g[init_col] == init][[*keys, value_col]]
            merged = other.merge(ref, on=keys, suffixes=("_init", "_ref"))
            merged = merged.sort_values(keys, key=lambda col: col.astype(str), kind="stable")  # order-independent
            x = merged[f"{value_col}_init"].to_numpy(dtype=np.float64)
            y = merged[f"{value_col}_ref"].to_numpy(dtype=np.float64)
            n = int(x.size)
            w = wilcoxon_signed_rank(x, y, zero_method=zero_method)
            key_seed = zlib.crc32(repr((*map(str, gkey), str(init))).encode("utf-8"))
            lo, hi = paired_bootstrap_ci(x, y, n_boot=n_boot, confidence=confidence, seed=[seed, key_seed],
                                         method=ci_method)
            rows.append({
                **dict(zip(by, gkey)), "init": init, "reference": reference, "n": n,
                "mean_init": float(x.mean()) if n else float("nan"),
                "mean_reference": float(y.mean()) if n else float("nan"),
                "mean_diff": float((x - y).mean()) if n else float("nan"),
                "ci_low": lo, "ci_high": hi, "wilcoxon_stat": w.statistic, "p_value": w.pvalue,
                "rank_biserial": rank_biserial(x, y, zero_method) if n else float("nan"),
                "cohens_dz": cohens_dz(x, y),
            })
    rows = _ordered(rows, [*by, "init"])
    table = pd.DataFrame(rows, columns=[c for c in columns if c not in ("p_holm", "significant", "conclusion")])
    if table.empty:
        return pd.DataFrame(columns=columns)
    table["p_holm"] = np.nan
    return adjust_table(table, alpha, confidence, holm_by, value_col, higher_is_better)[columns]


def adjust_table(table: pd.DataFrame, alpha: float = 0.05, confidence: float = 0.95,
                 holm_by: Sequence[str] | None = None, value_col: str = "dice", higher_is_better: bool = True
                 ) -> pd.DataFrame:
    """Holm-adjusted p-values, significance and conclusions of a table joined from several :func:`compare_inits`
    tables (e.g. one init against several references), as if it were one: the whole table one Holm family (or one
    per group of ``holm_by``). Returns a copy."""
    table = table.copy()
    if table.empty:
        return table
    if holm_by:
        _require(table, holm_by)
        for _, idx in table.groupby(list(holm_by), dropna=False, sort=False).groups.items():
            table.loc[idx, "p_holm"] = holm(table.loc[idx, "p_value"].to_numpy())
    else:
        table["p_holm"] = holm(table["p_value"].to_numpy())
    table["significant"] = (table["p_holm"] < alpha).fillna(False).astype(bool)
    table["conclusion"] = [_conclusion({k: v for k, v in r.items() if k not in ("unit", "confidence")}, value_col,
                                       alpha, confidence, higher_is_better) for r in table.to_dict("records")]
    return table


def _conclusion(r: dict[str, Any], value_col: str, alpha: float, confidence: float, higher_is_better: bool) -> str:
    where = ", ".join(f"{k}={r[k]}" for k in r if k not in _RESULT_KEYS)
    where = f" [{where}]" if where else ""
    if r["n"] == 0:
        return f"{r['init']} vs {r['reference']}{where}: no paired units, no comparison"
    numbers = (f"mean {value_col} difference {r['mean_diff']:+.4f}, {100 * confidence:.0f}% CI "
               f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}], Wilcoxon p={_fmt_p(r['p_value'])}, "
               f"Holm p={_fmt_p(r['p_holm'])}, n={r['n']}")
    if not r["significant"]:
        return (f"{r['init']} vs {r['reference']}{where}: no significant difference at alpha={alpha:g} "
                f"({numbers})")
    better = (r["mean_diff"] > 0) == higher_is_better
    verdict = "better than" if better else "worse than"
    ci_note = ""
    if r["ci_low"] <= 0.0 <= r["ci_high"]:
        ci_note = "; note: the bootstrap CI includes 0"
    return f"{r['init']} {verdict} {r['reference']}{where} ({numbers}{ci_note})"


_RESULT_KEYS = frozenset({"init", "reference", "n", "mean_init", "mean_reference", "mean_diff", "ci_low", "ci_high",
                          "wilcoxon_stat", "p_value", "p_holm", "rank_biserial", "cohens_dz", "significant",
                          "conclusion"})

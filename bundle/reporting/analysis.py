"""Stage 7, the analysis (the toolkit of Ghosal and Shah, arXiv:2011.05791) of the low-data sweep.

Run with ``configs/analysis.yaml``::

    python -m monai.bundle run --config_file "['configs/analysis.yaml']"

Inputs:

- the sweep's tidy CSV of per-image test metrics (``scripts/sweep.py``; columns ``task, init, train_size, seed,
  image, structure, dice`` at least; ``mode`` optional: rows of a fine-tuning mode other than ``full`` are compared
  as their own strategy ``<init>:<mode>``);
- for the Grad-CAM views, two checkpoints (by default DoLL-init and scratch at one training size and seed);
- for the ensembles, the predictions of several models on the same test images: either the sweep's saved masks
  (``<output_root>/segmentation/<run>/masks_<split>/<image>_<structure>.png``) or checkpoints, whose inference is run
  here with the evaluation's preprocessing (:func:`eval_transforms`) and the evaluation's resizing back to the
  label's size (bilinear logits, then ``sigmoid > 0.5``), so that single-model Dice equals the sweep's.

Outputs (``<output_root>/analysis/``, every file written atomically):

- ``statistics.csv`` / ``statistics_structures.csv``: every init against the reference init per task and training
  size (and per structure): :func:`bundle.stats.paired.compare_inits` with the test images as the paired units
  (each image's Dice averaged over seeds and structures), Wilcoxon signed-rank, paired bootstrap CI of the mean
  difference, rank-biserial correlation, Cohen's ``d_z``, Holm-adjusted p-values (one family per table by default);
- ``controls.csv`` / ``controls_structures.csv`` / ``controls_means.csv`` / ``controls.png``: the DoLL init
  against the pre-training controls (shuffled DoLL, Grad-CAM and single-classifier IG labels, true lesions) and no
  pre-training, when the sweep has them (:class:`ControlsStep`, :func:`controls_table`);
- ``replicability.csv``: per task, init and size, the mean Dice of each seed, then mean, SD and CV across seeds;
- ``learning_curves.csv``: mean Dice against training size per init, with a bootstrap CI over test images (rows
  ``structure="all"`` for the mean over structures, and one per structure), and ``learning_curves.png``;
- ``dice_scores.csv`` (per seed and image, mean over structures) and ``dice_distributions.png``;
- ``gradcam.csv`` (per model, image and structure: the fraction of the Grad-CAM mass inside the reference structure
  and whether the map's maximum falls inside it) and ``gradcam_panel.png``;
- ``ensembles_rows.csv`` / ``ensembles.csv`` (Dice of each model alone and of the union, intersection, majority vote
  and STAPLE of all models), ``synergy_rows.csv`` / ``synergy.csv`` (pairwise unions and intersections) and
  ``ensemble_panel.png``;
- ``status.json`` (``done`` or ``not run: <why>`` per section) and ``summary.json`` (headline numbers).

A section whose inputs are missing is recorded as not run (the report says so); corrupt inputs raise
:class:`bundle.utils.BundleInputError`. Everything is logged to one MLflow run (experiment
``<mlflow_experiment_prefix>_analysis``).
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..constants import slug
from ..utils import BundleInputError, PathLike, atomic_write_json, atomic_write_text
from .plots import size_key, sort_by_size

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "SWEEP_COLUMNS",
    "normalise_size",
    "load_sweep",
    "per_image_scores",
    "statistics_table",
    "replicability_table",
    "REPLICATE_COMPARISONS",
    "replicate_table",
    "crossval_table",
    "efficiency_pairs",
    "learning_curves",
    "image_ids",
    "eval_transforms",
    "load_segmenter",
    "predict_logits",
    "predict_masks",
    "read_mask_dir",
    "run_checkpoint",
    "available_models",
    "pick_train_size",
    "sweep_models",
    "gradcam_analysis",
    "ensemble_analysis",
    "AnalysisContext",
    "EfficiencyStep",
    "EnsembleStep",
    "GradCAMStep",
    "StatisticsStep",
    "CONTROL_INITS",
    "controls_table",
    "ControlsStep",
    "run_analysis",
]

#: Columns the sweep CSV must have.
SWEEP_COLUMNS: tuple[str, ...] = ("task", "init", "train_size", "seed", "image", "structure", "dice")
_UNIT = "image_mean"


# --------------------------------------------------------------------------------------------------------------------
# the sweep table
# --------------------------------------------------------------------------------------------------------------------
def normalise_size(value: Any) -> int | str:
    """A training-set size as ``int``, or ``"all"`` (``"all"``, ``None``, ``-1``, empty)."""
    from ..tasks import parse_train_size

    n = parse_train_size(None if (isinstance(value, float) and math.isnan(value)) else value)
    return "all" if n is None else int(n)


def load_sweep(path: PathLike, task: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Read the sweep's tidy CSV.

    ``train_size`` becomes ``int`` or ``"all"``; ``task``, ``init``, ``image``, ``structure`` text; ``seed`` int.
    With a ``mode`` column, rows whose mode is not ``full`` get ``init = "<init>:<mode>"`` (a strategy of its own);
    with an ``arch`` column, rows of an architecture other than SegResNet get ``task = "<task>:<arch>"``.

    Args:
        path: the CSV file.
        task: keep only this task (or these tasks; ``<task>:<arch>`` for another architecture's runs).

    Raises:
        BundleInputError: missing file, missing columns, no rows, or non-numeric Dice.
    """
    import pandas as pd

    if not os.path.isfile(path):
        raise BundleInputError(path, "sweep CSV not found (written by scripts/sweep.py)")
    try:
        df = pd.read_csv(path, dtype={"task": str, "init": str, "train_size": str, "image": str, "structure": str,
                                      "mode": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise BundleInputError(path, f"unreadable sweep CSV ({e})") from None
    missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
    if missing:
        raise BundleInputError(path, f"sweep CSV lacks columns {missing} (has {list(df.columns)})")
    df = _fold_arch(df)
    if task is not None:
        tasks = {task} if isinstance(task, str) else set(task)
        df = df[df["task"].isin(tasks)]
    if df.empty:
        raise BundleInputError(path, "sweep CSV has no rows" + (f" for task {task!r}" if task is not None else ""))
    try:
        df["dice"] = pd.to_numeric(df["dice"])
        df["seed"] = pd.to_numeric(df["seed"]).astype(int)
    except (TypeError, ValueError) as e:
        raise BundleInputError(path, f"non-numeric dice or seed values ({e})") from None
    try:
        df["train_size"] = pd.Series([normalise_size(v) for v in df["train_size"]], index=df.index, dtype=object)
    except ValueError as e:
        raise BundleInputError(path, str(e)) from None
    if "mode" in df.columns:
        mode = df["mode"].fillna("full").astype(str)
        df["init"] = np.where(mode == "full", df["init"], df["init"] + ":" + mode)
    return df.reset_index(drop=True)


def _fold_arch(df: pd.DataFrame) -> pd.DataFrame:
    """With an ``arch`` column, the runs of an architecture other than the default get the task label
    ``<task>:<arch>`` (:func:`bundle.tasks.arch_task`): each architecture's inits are compared among themselves."""
    import pandas as pd

    from ..tasks import arch_task

    if "arch" in df.columns:
        df["task"] = [arch_task(t, None if pd.isna(a) else str(a)) for t, a in zip(df["task"], df["arch"])]
    return df


def per_image_scores(df: pd.DataFrame, value_col: str = "dice") -> pd.DataFrame:
    """Mean of ``value_col`` over structures: one row per ``task, init, train_size, seed, image``."""
    keys = ["task", "init", "train_size", "seed", "image"]
    out = df.groupby(keys, sort=False, dropna=False)[value_col].mean().reset_index()
    return sort_by_size(out, ["task", "train_size", "init", "seed", "image"])


def statistics_table(
    df: pd.DataFrame,
    reference: str = "scratch",
    by_structure: bool = False,
    alpha: float = 0.05,
    n_boot: int = 10000,
    confidence: float = 0.95,
    holm_by: Sequence[str] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Every init against ``reference`` per task and training size (and per structure with ``by_structure``).

    The paired units are the test images: each image's Dice is averaged over seeds (and structures) first
    (``unit="image_mean"`` of :func:`bundle.stats.paired.compare_inits`). Holm's correction runs over the whole
    table (or per group of ``holm_by``).

    Returns:
        the :func:`~bundle.stats.paired.compare_inits` table (``task, [structure,] train_size, init, reference, n,
        mean_init, mean_reference, mean_diff, ci_low, ci_high, wilcoxon_stat, p_value, p_holm, rank_biserial,
        cohens_dz, significant, conclusion``) plus ``unit`` and ``confidence``.
    """
    from ..stats.paired import compare_inits

    by = ["task", "structure", "train_size"] if by_structure else ["task", "train_size"]
    table = compare_inits(df, reference, by=by, unit=_UNIT, alpha=alpha, n_boot=n_boot, confidence=confidence,
                          holm_by=holm_by, seed=seed)
    table["unit"] = _UNIT
    table["confidence"] = confidence
    return table


#: the inits the DoLL init is compared with in the controls table, in this order: the pre-training controls of
#: :mod:`bundle.doll.controls` (fine-tuned as ``doll_<labels>``), then no pre-training
CONTROL_INITS: tuple[str, ...] = ("doll_shuffled", "doll_gradcam", "doll_ig_single", "doll_oracle", "scratch")


def controls_table(
    df: pd.DataFrame,
    method: str = "doll",
    controls: Sequence[str] = CONTROL_INITS,
    by_structure: bool = False,
    alpha: float = 0.05,
    n_boot: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """``method`` (the DoLL init) against each control in ``controls`` that the sweep has, per task and training size
    (and structure): what the pre-training buys beyond the same pre-training on other labels.

    Each comparison is :func:`statistics_table`'s (the test images as the paired units, Wilcoxon signed-rank, paired
    bootstrap CI), with ``init = method`` and ``reference`` = the control (``mean_diff`` = DoLL - control); Holm's
    correction runs over the whole table (:func:`bundle.stats.paired.adjust_table`). Only (task, size) cells that
    have both are compared. Returns the statistics columns, empty when the sweep has no control.
    """
    import pandas as pd

    from ..stats.paired import adjust_table, compare_inits

    by = ["task", "structure", "train_size"] if by_structure else ["task", "train_size"]
    present = set(df["init"].astype(str))
    frames = []
    for control in controls:
        if control == method or control not in present or method not in present:
            continue
        pair = df[df["init"].astype(str).isin([method, control])]
        table = compare_inits(pair, control, by=by, unit=_UNIT, alpha=alpha, n_boot=n_boot, confidence=confidence,
                              seed=seed)
        frames.append(table[(table["init"].astype(str) == method) & (table["n"] > 0)])  # cells with both
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=[*by, "init", "reference", "n", "mean_init", "mean_reference", "mean_diff",
                                     "ci_low", "ci_high", "wilcoxon_stat", "p_value", "p_holm", "rank_biserial",
                                     "cohens_dz", "significant", "conclusion", "unit", "confidence"])
    table = adjust_table(pd.concat(frames, ignore_index=True), alpha, confidence)
    table["unit"] = _UNIT
    table["confidence"] = confidence
    return table


#: the replicate table's differences (first init minus second), where both inits have runs
REPLICATE_COMPARISONS: tuple[tuple[str, str], ...] = (("doll", "doll_shuffled"), ("doll", "scratch"),
                                                       ("doll_shuffled", "scratch"))


def replicate_table(frames: Mapping[int, pd.DataFrame], scratch: pd.DataFrame | None = None,
                    comparisons: Sequence[tuple[str, str]] = REPLICATE_COMPARISONS) -> pd.DataFrame:
    """Pre-training replicates (``scripts/pretrain_replicates.py``): per task and replicate, each init's mean test
    Dice and the paired differences; then one ``replicate="all"`` row per task and comparison across the replicates.

    Args:
        frames: replicate -> the tidy per-image frame of its runs (``scripts/sweep.py``'s ``collect``).
        scratch: the scratch runs' frame, shared by every replicate (``None``: no scratch).
        comparisons: ``(a, b)`` pairs of inits; a pair is reported where both inits have runs.

    Returns:
        A ``DataFrame``: ``task, train_size, replicate, a, b, mean_a, mean_b, worst_seed_a, worst_seed_b, mean_diff,
        p_value, n, n_favour_a, p_holm``. Per replicate: the means are over the test images of each image's Dice averaged
        over its structures and fine-tuning seeds, ``worst_seed_*`` the lowest fine-tuning seed's mean, ``p_value``
        the two-sided Wilcoxon signed-rank test over the ``n`` test images. Across the replicates
        (``replicate="all"``): the means of the replicates' values, ``n`` replicates, ``n_favour_a`` of them with a
        positive difference and ``p_value`` the two-sided one-sample t-test of their differences (NaN under 2);
        ``p_holm`` is that p-value Holm-corrected over every replicate-level row of the table (every task, size and
        comparison: the family the reading draws its conclusions from), NaN on the per-replicate rows.
    """
    import pandas as pd
    from scipy import stats

    from ..stats.paired import holm, wilcoxon_signed_rank

    def per_image(frame: Any) -> Any:
        return frame.groupby("image")["dice"].mean()

    def worst_seed(frame: Any) -> float:
        return float(frame.groupby("seed")["dice"].mean().min())

    rows: list[dict[str, Any]] = []
    parts = {rep: f for rep, f in frames.items() if f is not None and not f.empty}
    keys = sorted({(t, s) for f in parts.values() for t, s in zip(f["task"], f["train_size"].astype(str))})
    for task, size in keys:
        per_rep: dict[int, dict[str, Any]] = {}
        for rep, frame in sorted(parts.items()):
            cell = frame[(frame["task"] == task) & (frame["train_size"].astype(str) == size)]
            if scratch is not None and not scratch.empty:
                cell = pd.concat([cell, scratch[(scratch["task"] == task)
                                                & (scratch["train_size"].astype(str) == size)]], ignore_index=True)
            per_rep[rep] = {init: g for init, g in cell.groupby("init")}
        for a, b in comparisons:
            diffs: list[dict[str, Any]] = []
            for rep, inits in per_rep.items():
                if a not in inits or b not in inits:
                    continue
                xa, xb = per_image(inits[a]), per_image(inits[b])
                common = xa.index.intersection(xb.index)
                d = (xa[common] - xb[common]).to_numpy()
                row = {"task": task, "train_size": size, "replicate": str(rep), "a": a, "b": b,
                       "mean_a": float(xa[common].mean()), "mean_b": float(xb[common].mean()),
                       "worst_seed_a": worst_seed(inits[a]), "worst_seed_b": worst_seed(inits[b]),
                       "mean_diff": float(d.mean()), "p_value": wilcoxon_signed_rank(d).pvalue, "n": int(d.size),
                       "n_favour_a": int((d > 0).sum())}
                diffs.append(row)
            rows.extend(diffs)
            if diffs:
                values = np.array([r["mean_diff"] for r in diffs])
                p = float(stats.ttest_1samp(values, 0.0).pvalue) if len(values) >= 2 and values.std() > 0 else \
                    float("nan")
                rows.append({"task": task, "train_size": size, "replicate": "all", "a": a, "b": b,
                             "mean_a": float(np.mean([r["mean_a"] for r in diffs])),
                             "mean_b": float(np.mean([r["mean_b"] for r in diffs])),
                             "worst_seed_a": float(min(r["worst_seed_a"] for r in diffs)),
                             "worst_seed_b": float(min(r["worst_seed_b"] for r in diffs)),
                             "mean_diff": float(values.mean()), "p_value": p, "n": len(values),
                             "n_favour_a": int((values > 0).sum())})
    table = pd.DataFrame(rows, columns=["task", "train_size", "replicate", "a", "b", "mean_a", "mean_b",
                                        "worst_seed_a", "worst_seed_b", "mean_diff", "p_value", "n", "n_favour_a"])
    across = (table["replicate"] == "all").to_numpy()
    table["p_holm"] = np.nan
    if across.any():
        table.loc[across, "p_holm"] = holm(table.loc[across, "p_value"].to_numpy())
    return table


def crossval_table(frame: pd.DataFrame, reference: str = "scratch") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cross-validation by patient (``scripts/crossval.py``): every image is tested once, by the fold that held its
    patient out, so the folds' test rows pool into one estimate over all images.

    Args:
        frame: the tidy per-image frame of every fold's runs (``scripts/sweep.py``'s ``collect`` with a ``fold``
            column).
        reference: the init the others are compared with (skipped when absent).

    Returns:
        ``(summary, tests)``. ``summary``: per ``task, train_size, structure, init``: ``n_images``, ``n_folds``,
        ``mean`` (over the images of each image's Dice averaged over seeds), ``worst_seed`` (the lowest seed's mean
        over all images; seed ``s`` of every fold trained with seed ``s``), ``fold_min`` / ``fold_max`` (the
        lowest and highest fold mean) and ``lowest_image``. ``tests``: :func:`bundle.stats.paired.compare_inits`
        of every init against ``reference`` with the images as the paired units (one Holm family).
    """
    import pandas as pd

    from ..stats.paired import compare_inits

    keys = ["task", "train_size", "structure", "init"]
    rows: list[dict[str, Any]] = []
    data = frame.assign(train_size=frame["train_size"].astype(str))
    for key, cell in data.groupby(keys, sort=False):
        per_image = cell.groupby(["fold", "image"])["dice"].mean()
        rows.append({**dict(zip(keys, key)), "n_images": int(per_image.size),
                     "n_folds": int(cell["fold"].nunique()), "mean": float(per_image.mean()),
                     "worst_seed": float(cell.groupby("seed")["dice"].mean().min()),
                     "fold_min": float(per_image.groupby(level="fold").mean().min()),
                     "fold_max": float(per_image.groupby(level="fold").mean().max()),
                     "lowest_image": float(per_image.min())})
    summary = pd.DataFrame(rows, columns=[*keys, "n_images", "n_folds", "mean", "worst_seed", "fold_min",
                                          "fold_max", "lowest_image"])
    if reference in set(data["init"]) and data["init"].nunique() > 1:
        tests = compare_inits(data, reference, by=["task", "train_size", "structure"], unit="image_mean")
    else:
        tests = pd.DataFrame()
    return summary, tests


def replicability_table(df: pd.DataFrame) -> pd.DataFrame:
    """Replicability across seeds (:func:`bundle.stats.paired.replicability`) of the per-image mean Dice, per task,
    init and training size: ``n_seeds, mean, sd, cv, min, max`` of the seeds' mean Dice."""
    from ..stats.paired import replicability

    return replicability(per_image_scores(df), by=["task", "init", "train_size"])


def learning_curves(df: pd.DataFrame, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Mean Dice against training size per task and init, with a bootstrap confidence interval.

    For each ``(task, structure, init, train_size)`` (``structure="all"`` averages the structures of each image) the
    units are the test images, each averaged over seeds; ``mean`` is their mean and ``[ci_low, ci_high]`` the
    percentile bootstrap CI of that mean (:func:`bundle.stats.paired.paired_bootstrap_ci`, deterministic under
    ``seed``). ``seed_sd`` is the SD of the seeds' means (training variability), ``n_seeds`` their number.

    Returns:
        DataFrame ``task, structure, init, train_size, n_images, n_seeds, mean, ci_low, ci_high, seed_sd``.
    """
    import pandas as pd

    from ..stats.paired import paired_bootstrap_ci

    frames = [df.assign(structure="all").groupby(["task", "structure", "init", "train_size", "seed", "image"],
                                                  sort=False)["dice"].mean().reset_index(),
              df.groupby(["task", "structure", "init", "train_size", "seed", "image"], sort=False)["dice"].mean()
              .reset_index()]
    scores = pd.concat(frames, ignore_index=True).dropna(subset=["dice"])
    rows = []
    for (task, structure, init, size), g in scores.groupby(["task", "structure", "init", "train_size"], sort=False):
        units = g.groupby("image")["dice"].mean().to_numpy(dtype=np.float64)
        seeds = g.groupby("seed")["dice"].mean().to_numpy(dtype=np.float64)
        key = zlib.crc32(repr((str(task), str(structure), str(init), str(size))).encode("utf-8"))
        lo, hi = paired_bootstrap_ci(units, None, n_boot=n_boot, confidence=confidence, seed=[seed, key])
        rows.append({"task": task, "structure": structure, "init": init, "train_size": size,
                     "n_images": int(units.size), "n_seeds": int(seeds.size), "mean": float(units.mean()),
                     "ci_low": lo, "ci_high": hi,
                     "seed_sd": float(seeds.std(ddof=1)) if seeds.size > 1 else float("nan")})
    out = pd.DataFrame(rows, columns=["task", "structure", "init", "train_size", "n_images", "n_seeds", "mean",
                                      "ci_low", "ci_high", "seed_sd"])
    out["_all"] = (out["structure"] != "all").astype(int)  # "all" first within each task
    out = sort_by_size(out, ["task", "_all", "structure", "init", "train_size"]).drop(columns="_all")
    return out


#: A structure whose mean test Dice on one seed is below this is "collapsed": a defect of the recipe, flagged in red.
COLLAPSE_DICE = 0.05


def seed_table(df: pd.DataFrame, collapse_below: float = COLLAPSE_DICE) -> pd.DataFrame:
    """Per ``task, structure, init, train_size``: the seeds' mean test Dice and the **worst seed** beside it.

    Each seed's score is its mean over the test images (``structure="all"``: over images and structures). A cell
    where any seed's score of a structure is below ``collapse_below`` is ``collapsed``: the network never learned
    that structure on that seed, a defect of the recipe and not a data point to average.

    Returns:
        DataFrame ``task, structure, init, train_size, n_seeds, mean, worst, worst_seed, best, collapsed,
        collapsed_seeds``.
    """
    import pandas as pd

    per_seed = pd.concat([
        df.groupby(["task", "structure", "init", "train_size", "seed"], sort=False)["dice"].mean().reset_index(),
        df.assign(structure="all").groupby(["task", "structure", "init", "train_size", "seed", "image"], sort=False)
        ["dice"].mean().groupby(["task", "structure", "init", "train_size", "seed"], sort=False).mean()
        .reset_index()], ignore_index=True)
    rows = []
    for (task, structure, init, size), g in per_seed.groupby(["task", "structure", "init", "train_size"],
                                                              sort=False):
        worst = g.loc[g["dice"].idxmin()]
        low = sorted(int(s) for s in g.loc[g["dice"] < collapse_below, "seed"])
        rows.append({"task": task, "structure": structure, "init": init, "train_size": size,
                     "n_seeds": int(len(g)), "mean": float(g["dice"].mean()), "worst": float(worst["dice"]),
                     "worst_seed": int(worst["seed"]), "best": float(g["dice"].max()),
                     "collapsed": bool(low) and structure != "all", "collapsed_seeds": ",".join(map(str, low))})
    out = pd.DataFrame(rows, columns=["task", "structure", "init", "train_size", "n_seeds", "mean", "worst",
                                      "worst_seed", "best", "collapsed", "collapsed_seeds"])
    out["_all"] = (out["structure"] != "all").astype(int)
    return sort_by_size(out, ["task", "_all", "structure", "train_size", "init"]).drop(columns="_all")


def load_val_curves(path: PathLike) -> pd.DataFrame:
    """Read the sweep's validation curves (``sweep_val_curves.csv``: one row per validation of every run, with
    ``task, init, train_size, seed, epoch, steps, val_mean_dice`` and the per-structure ``val_dice_*``).

    Raises:
        BundleInputError: missing file or columns.
    """
    import pandas as pd

    if not os.path.isfile(path):
        raise BundleInputError(path, "validation curves not found (written by scripts/sweep.py)")
    df = pd.read_csv(path, dtype={"task": str, "init": str, "train_size": str})
    missing = [c for c in ("task", "init", "train_size", "seed", "steps", "val_mean_dice") if c not in df.columns]
    if missing:
        raise BundleInputError(path, f"validation curves lack columns {missing}")
    if "mode" in df.columns:
        mode = df["mode"].fillna("full").astype(str)
        df["init"] = np.where(mode == "full", df["init"], df["init"] + ":" + mode)
    df["train_size"] = pd.Series([normalise_size(v) for v in df["train_size"]], index=df.index, dtype=object)
    return _fold_arch(df)


def _run_efficiency(curves: pd.DataFrame, fraction: float, metric: str) -> pd.DataFrame:
    """Per run (``task, init, train_size, seed``): ``best`` (the highest validation ``metric``), ``steps_to`` (the
    first validation step at which the run reaches ``fraction * best``) and ``steps_run`` (its last validation)."""
    import pandas as pd

    runs = []
    for (task, init, size, seed), g in curves.groupby(["task", "init", "train_size", "seed"], sort=False):
        best = float(g[metric].max())
        runs.append({"task": task, "init": init, "train_size": size, "seed": seed, "best": best,
                     "steps_to": int(g.loc[g[metric] >= fraction * best, "steps"].min()),
                     "steps_run": int(g["steps"].max())})
    return pd.DataFrame(runs, columns=["task", "init", "train_size", "seed", "best", "steps_to", "steps_run"])


def efficiency_table(curves: pd.DataFrame, fraction: float = 0.95, metric: str = "val_mean_dice") -> pd.DataFrame:
    """Training efficiency per ``task, init, train_size``: how many optimizer steps each run needs to reach
    ``fraction`` of its own best validation Dice, and where it ends.

    Per run (seed): ``best`` = the highest validation Dice, ``steps_to_<pct>`` = the first validation at which the
    Dice reaches ``fraction * best``, ``steps_run`` = the last validation (the plateau rule or the cap ended the
    run there). Over seeds: mean of each, and the worst (largest) ``steps_to_<pct>``.

    Returns:
        DataFrame ``task, init, train_size, n_seeds, best_mean, best_worst, steps_to_<pct>_mean,
        steps_to_<pct>_max, steps_run_mean``.
    """
    pct = int(round(100 * fraction))
    per_run = _run_efficiency(curves, fraction, metric)
    out = per_run.groupby(["task", "init", "train_size"], sort=False).agg(
        n_seeds=("seed", "count"), best_mean=("best", "mean"), best_worst=("best", "min"),
        **{f"steps_to_{pct}_mean": ("steps_to", "mean"), f"steps_to_{pct}_max": ("steps_to", "max")},
        steps_run_mean=("steps_run", "mean")).reset_index()
    return sort_by_size(out, ["task", "train_size", "init"])


def efficiency_pairs(curves: pd.DataFrame, reference: str = "scratch", fraction: float = 0.95,
                     metric: str = "val_mean_dice") -> pd.DataFrame:
    """Training efficiency, paired: each init's runs against ``reference``'s run of the same ``seed`` (same task and
    size), on the steps to ``fraction`` of each run's best validation Dice and on the steps each run trained.

    Returns:
        DataFrame ``task, train_size, init, reference, n, steps_to_<pct>_diff, n_fewer, p_steps_to, steps_run_diff,
        p_steps_run``: mean differences (init - reference; negative: the init needs fewer steps), how many pairs
        the init needs fewer steps to ``fraction`` in, and two-sided Wilcoxon signed-rank p-values over the pairs.
    """
    import pandas as pd

    from ..stats.paired import wilcoxon_signed_rank

    pct = int(round(100 * fraction))
    per_run = _run_efficiency(curves, fraction, metric)
    rows = []
    for (task, size), g in per_run.groupby(["task", "train_size"], sort=False):
        ref = g[g["init"] == reference].set_index("seed")
        for init in [i for i in dict.fromkeys(g["init"]) if i != reference]:
            other = g[g["init"] == init].set_index("seed")
            common = other.index.intersection(ref.index)
            if not len(common):
                continue
            d_to = (other.loc[common, "steps_to"] - ref.loc[common, "steps_to"]).to_numpy(dtype=float)
            d_run = (other.loc[common, "steps_run"] - ref.loc[common, "steps_run"]).to_numpy(dtype=float)
            rows.append({"task": task, "train_size": size, "init": init, "reference": reference, "n": len(common),
                         f"steps_to_{pct}_diff": float(d_to.mean()), "n_fewer": int((d_to < 0).sum()),
                         "p_steps_to": wilcoxon_signed_rank(d_to).pvalue, "steps_run_diff": float(d_run.mean()),
                         "p_steps_run": wilcoxon_signed_rank(d_run).pvalue})
    return pd.DataFrame(rows, columns=["task", "train_size", "init", "reference", "n", f"steps_to_{pct}_diff",
                                       "n_fewer", "p_steps_to", "steps_run_diff", "p_steps_run"])


def mean_val_curves(curves: pd.DataFrame, metric: str = "val_mean_dice") -> pd.DataFrame:
    """Validation Dice against optimizer steps per ``task, init, train_size``, averaged over seeds (a run that
    stopped earlier carries its last value forward, so the mean is over every seed at every step)."""
    import pandas as pd

    rows = []
    for (task, init, size), g in curves.groupby(["task", "init", "train_size"], sort=False):
        wide = g.pivot_table(index="steps", columns="seed", values=metric, aggfunc="last").sort_index().ffill()
        for steps, vals in wide.iterrows():
            rows.append({"task": task, "init": init, "train_size": size, "steps": int(steps),
                         "mean": float(vals.mean()), "worst": float(vals.min()), "n_seeds": int(vals.count())})
    return sort_by_size(pd.DataFrame(rows, columns=["task", "init", "train_size", "steps", "mean", "worst",
                                                   "n_seeds"]), ["task", "train_size", "init", "steps"])


# --------------------------------------------------------------------------------------------------------------------
# models, test images and inference
# --------------------------------------------------------------------------------------------------------------------
def image_ids(items: Sequence[Mapping[str, Any]], image_key: str = "image") -> list[str]:
    """The ``image`` ids the evaluation gives the items (as
    :class:`bundle.handlers.segmentation.SegmentationCSVWriter`: the file stem, made unique with ``_1``, ``_2`` ...
    in datalist order)."""
    seen: dict[str, int] = {}
    out = []
    for index, item in enumerate(items):
        src = item.get(image_key)
        stem = os.path.basename(str(src)) if src else f"image{index:05d}"
        for suffix in (".nii.gz", ".dcm"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        stem = os.path.splitext(stem)[0]
        k = seen.get(stem, 0)
        seen[stem] = k + 1
        out.append(stem if k == 0 else f"{stem}_{k}")
    return out


def eval_transforms(task: str, image_size: Sequence[int]) -> Any:
    """The deterministic preprocessing of ``configs/train.yaml`` (``load_transforms``): the image loaded with
    :class:`~bundle.transforms.LoadRadiographd` and prepared for the network by
    :class:`~bundle.transforms.PrepareRadiographd`; the label loaded at its original size with the task's
    ``union_groups``."""
    from monai.transforms import Compose, EnsureTyped

    from ..transforms import LoadMaskd, LoadRadiographd, PrepareRadiographd
    from ..tasks import task_spec

    spec = task_spec(task)
    return Compose([
        LoadRadiographd(keys="image"),
        LoadMaskd(keys="label", image_key="image", union_groups=spec.union_groups_list()),
        PrepareRadiographd(keys="image", spatial_size=image_size),
        EnsureTyped(keys=["image", "label"], track_meta=False),
    ])


def load_segmenter(checkpoint: PathLike, out_channels: int, arch: str = "segresnet",
                   device: str | torch.device = "cpu", **kwargs: Any) -> torch.nn.Module:
    """A fine-tuned network from its checkpoint (:func:`bundle.networks.segmentation.build_segmenter`, with the
    residual adapters when the checkpoint has them), in eval mode on ``device``.

    Raises:
        BundleInputError: missing checkpoint, or weights that do not fit the network.
    """
    import torch

    from ..networks.transfer import read_state_dict
    from ..networks.finetune import build_finetune_network

    if not os.path.isfile(checkpoint):
        raise BundleInputError(checkpoint, "checkpoint not found")
    state, _ = read_state_dict(os.fspath(checkpoint), map_location="cpu")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    mode = "adapter" if any(".adapter." in k for k in state) else "full"
    net = build_finetune_network(arch, int(out_channels), mode, **kwargs)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleInputError(checkpoint, f"weights do not fit {arch} with {out_channels} outputs ({e})") from None
    return net.to(torch.device(device) if isinstance(device, str) else device).eval()


def predict_logits(net: torch.nn.Module, image: Any) -> torch.Tensor:
    """Logits ``(C, h, w)`` of one preprocessed image ``(1, h, w)`` (no gradient, on the network's device, returned
    on the CPU)."""
    import torch

    x = torch.as_tensor(image, dtype=torch.float32)
    if x.ndim == 2:
        x = x[None]
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    with torch.no_grad():
        return net(x[None].to(device))[0].float().cpu()


def predict_masks(net: torch.nn.Module, image: Any, size: Sequence[int] | None = None,
                  threshold: float = 0.5) -> np.ndarray:
    """Binary masks ``(C, H, W)`` of one preprocessed image: the logits resized to ``size`` (bilinear,
    ``align_corners=False``, as the evaluation's :class:`~bundle.transforms.ResizeLiked`), then
    ``sigmoid > threshold``."""
    import torch

    logits = predict_logits(net, image)
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = torch.nn.functional.interpolate(logits[None], size=tuple(int(s) for s in size), mode="bilinear",
                                                 align_corners=False)[0]
    return (torch.sigmoid(logits) > threshold).numpy()


def read_mask_dir(mask_dir: PathLike, image_id: str, structures: Sequence[str], shape: Sequence[int]) -> np.ndarray:
    """Saved predictions ``<mask_dir>/<image_id>_<structure>.png`` as bool ``(C, H, W)``.

    Raises:
        BundleInputError: a missing file, or a mask whose size differs from ``shape``.
    """
    from ..data.io import load_mask

    masks = []
    for s in structures:
        path = os.path.join(os.fspath(mask_dir), f"{image_id}_{slug(s)}.png")
        if not os.path.isfile(path):
            raise BundleInputError(path, "predicted mask not found")
        m = load_mask(path).astype(bool)
        if tuple(m.shape) != tuple(shape[-2:]):
            raise BundleInputError(path, f"predicted mask size {m.shape} differs from the reference {tuple(shape)}")
        masks.append(m)
    return np.stack(masks)


def run_checkpoint(models_dir: PathLike, task: str, init: str, train_size: Any, seed: int, mode: str = "full") -> str:
    """``<models_dir>/segmentation/<run_name>/model.pt`` of one fine-tuning run (as ``configs/train.yaml``)."""
    from ..tasks import run_name

    return os.path.join(os.fspath(models_dir), "segmentation", run_name(task, init, train_size, seed, mode),
                        "model.pt")


def _split_init(init: str) -> tuple[str, str]:
    base, _, mode = str(init).partition(":")
    return base, mode or "full"


def available_models(sweep_csv: PathLike, task: str, output_root: PathLike, models_dir: PathLike,
                     split: str = "test") -> dict[str, dict[str, str]]:
    """The sweep's runs of ``task`` that have saved test masks or a checkpoint, grouped by training size.

    Returns:
        ``{train_size label: {"<init>_seed<seed>": mask dir or checkpoint path}}`` (a run's saved masks
        ``<output_root>/segmentation/<run>/masks_<split>`` are preferred to its checkpoint); ``{}`` without a CSV.
    """
    from ..tasks import run_name

    if not os.path.isfile(sweep_csv):
        return {}
    df = load_sweep(sweep_csv)
    df = df[df["task"] == task]
    out: dict[str, dict[str, str]] = {}
    runs = df[["init", "train_size", "seed"]].drop_duplicates()
    for init, size, seed in runs.itertuples(index=False):
        base, mode = _split_init(init)
        name = run_name(task, base, size, int(seed), mode)
        masks = os.path.join(os.fspath(output_root), "segmentation", name, f"masks_{split}")
        ckpt = run_checkpoint(models_dir, task, base, size, int(seed), mode)
        source = masks if os.path.isdir(masks) and os.listdir(masks) else ckpt if os.path.isfile(ckpt) else None
        if source is not None:
            label = f"{base}_seed{int(seed)}" + ("" if mode == "full" else f"_{mode}")
            out.setdefault(str(size), {})[label] = source
    return {k: dict(sorted(out[k].items())) for k in sorted(out, key=size_key)}


def pick_train_size(sweep_csv: PathLike, task: str, output_root: PathLike, models_dir: PathLike,
                    split: str = "test") -> str:
    """The training size with the most available models (:func:`available_models`; ties: the largest size), or
    ``"all"`` when there is none."""
    found = available_models(sweep_csv, task, output_root, models_dir, split)
    if not found:
        return "all"
    return max(found, key=lambda s: (len(found[s]), size_key(s)))


def sweep_models(sweep_csv: PathLike, task: str, train_size: Any, output_root: PathLike, models_dir: PathLike,
                 split: str = "test") -> dict[str, str]:
    """The models of the ensembles: every available run of ``task`` at ``train_size`` (see
    :func:`available_models`), ``{"<init>_seed<seed>": mask dir or checkpoint}``."""
    found = available_models(sweep_csv, task, output_root, models_dir, split)
    return found.get(str(normalise_size(train_size)), {})


def _test_items(datalist: PathLike, split: str, max_images: int | None) -> tuple[list[dict[str, Any]], list[str]]:
    from ..tasks import load_section

    items = load_section(datalist, split, "written by configs/prepare_data.yaml")
    ids = image_ids(items)
    if max_images is not None:
        items, ids = items[: int(max_images)], ids[: int(max_images)]
    if not items:
        raise BundleInputError(datalist, f"no '{split}' items")
    return items, ids


# --------------------------------------------------------------------------------------------------------------------
# Grad-CAM views
# --------------------------------------------------------------------------------------------------------------------
def gradcam_analysis(
    checkpoints: Mapping[str, PathLike],
    datalist: PathLike,
    task: str,
    out_dir: PathLike,
    image_size: Sequence[int] = (128, 128),
    split: str = "test",
    num_images: int = 3,
    mode: str = "hirescam",
    layer: str | None = None,
    arch: str = "segresnet",
    arch_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    tile_size: int = 128,
) -> dict[str, Any]:
    """Grad-CAM per structure (:class:`bundle.explain.gradcam.SegmentationGradCAM`, scores over each model's own
    predicted masks) of a few test images for each model, as overlays and numbers.

    The maps are computed at the network's input size. Per model, image and structure ``gradcam.csv`` has
    ``inside_fraction`` (the share of the map's mass inside the reference structure; NaN for an all-zero map),
    ``max_inside`` (the map's maximum falls inside the reference: the pointing game) and ``pred_area``.
    ``gradcam_panel.png``: one row per (image, model): the image with the reference outlines, then one overlay per
    structure (map in jet colours, reference outline in white).

    Args:
        checkpoints: model name -> checkpoint (e.g. ``{"doll": ..., "scratch": ...}``).
        datalist: the task's datalist JSON.
        task: the task (its structures and label groups).
        out_dir: output folder.
        image_size: network input size.
        split: datalist section of the images.
        num_images: the first ``num_images`` images of the split.
        mode: ``"hirescam"`` (default; robust to the final GroupNorm of the default SegResNet) or ``"gradcam"``.
        layer: the explained layer (default :func:`bundle.explain.gradcam.default_target_layer`).
        arch, arch_kwargs: the network (as ``seg_arch``/``seg_kwargs`` of ``configs/train.yaml``).
        device: torch device.
        tile_size: panel tile size in pixels.

    Returns:
        ``{"rows": DataFrame, "panel": path, "csv": path}``.
    """
    import pandas as pd
    import torch

    from ..explain.gradcam import SegmentationGradCAM, gradcam_overlay
    from ..tasks import task_spec
    from ..visualize import save_grid
    from .plots import multi_overlay

    spec = task_spec(task)
    items, ids = _test_items(datalist, split, num_images)
    transform = eval_transforms(task, image_size)
    data = [transform({"image": it["image"], "label": it["label"]}) for it in items]
    refs = [torch.nn.functional.interpolate(d["label"][None].float(), size=tuple(image_size), mode="nearest")[0]
            .numpy() > 0.5 for d in data]
    rows, tiles, titles = [], [], []
    for name, ckpt in checkpoints.items():
        net = load_segmenter(ckpt, spec.num_classes, arch, device, **dict(arch_kwargs or {}))
        cam = SegmentationGradCAM(net, layer, mode=mode)  # type: ignore[arg-type]
        for image_id, d, ref in zip(ids, data, refs):
            x = torch.as_tensor(d["image"], dtype=torch.float32)
            device_ = next(net.parameters()).device
            heat = cam(x[None].to(device_))[0].cpu().numpy().astype(np.float64)  # (S, H, W)
            pred = cam.masks[0].cpu().numpy() if cam.masks is not None else np.zeros_like(ref)
            img = x[0].numpy()
            tiles.append(multi_overlay(img, ref))
            titles.append(f"{name}: {image_id}")
            for c, s in enumerate(spec.structures):
                total = float(heat[c].sum())
                inside = float(heat[c][ref[c]].sum()) / total if total > 0 else float("nan")
                peak = bool(ref[c].flat[int(np.argmax(heat[c]))]) if total > 0 else False
                rows.append({"task": task, "model": name, "checkpoint": os.fspath(ckpt), "image": image_id,
                             "structure": s, "inside_fraction": inside, "max_inside": int(peak),
                             "pred_area": int(pred[c].sum()), "ref_area": int(ref[c].sum()),
                             "mode": mode, "layer": cam.target_layer})
                tiles.append(gradcam_overlay(img, heat[c], ref[c]))
                titles.append(f"{name} {s}")
        del net
    os.makedirs(out_dir, exist_ok=True)
    table = pd.DataFrame(rows)
    csv = os.path.join(os.fspath(out_dir), "gradcam.csv")
    atomic_write_text(csv, table.to_csv(index=False))
    panel = save_grid(tiles, titles, 1 + spec.num_classes, os.path.join(os.fspath(out_dir), "gradcam_panel.png"),
                      tile_size=tile_size)
    return {"rows": table, "panel": panel, "csv": csv}


# --------------------------------------------------------------------------------------------------------------------
# ensembles and synergy
# --------------------------------------------------------------------------------------------------------------------
def ensemble_analysis(
    models: Mapping[str, PathLike],
    datalist: PathLike,
    task: str,
    out_dir: PathLike,
    image_size: Sequence[int] = (128, 128),
    split: str = "test",
    methods: Sequence[str] = ("union", "intersection", "majority", "staple"),
    max_images: int | None = None,
    arch: str = "segresnet",
    arch_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    panel_image: int = 0,
    tile_size: int = 128,
) -> dict[str, Any]:
    """Mask ensembles across models (:func:`bundle.metrics.ensembles.ensemble_rows`) and the pairwise synergy
    analysis (:func:`bundle.metrics.ensembles.synergy_rows`) on the same test images, at the labels' original size.

    Args:
        models: model name -> a folder of saved predictions (``<image>_<structure>.png``, as the evaluation writes
            them) or a checkpoint (inference is run: :func:`eval_transforms`, :func:`predict_masks`). At least two.
        datalist: the task's datalist JSON (images and reference masks).
        task: the task.
        out_dir: output folder.
        image_size: network input size (checkpoints only).
        split: datalist section.
        methods: ensemble methods.
        max_images: at most this many images (the first of the split).
        arch, arch_kwargs, device: the network (checkpoints only).
        panel_image: index of the image shown in ``ensemble_panel.png``.
        tile_size: panel tile size.

    Returns:
        ``{"rows", "summary", "synergy_rows", "synergy": DataFrames, "panel": path, "files": [paths]}``.
        ``summary``: per ``method, models, structure`` (``"all"``: mean over structures) the mean Dice over
        images; ``synergy``: per pair and structure the mean Dice of each model, of their union and intersection,
        the mean gains over the better model and the share of images where the union (intersection) beats both.
    """
    import pandas as pd

    from ..data.io import load_radiograph, resample_image
    from ..metrics.ensembles import ensemble_masks, ensemble_rows, synergy_rows
    from ..tasks import task_spec
    from ..visualize import save_grid
    from .plots import multi_overlay

    if len(models) < 2:
        raise ValueError(f"ensembles need at least two models, got {list(models)}")
    spec = task_spec(task)
    items, ids = _test_items(datalist, split, max_images)
    transform = eval_transforms(task, image_size)
    nets = {name: load_segmenter(src, spec.num_classes, arch, device, **dict(arch_kwargs or {}))
            for name, src in models.items() if not os.path.isdir(src)}
    rows: list[dict[str, Any]] = []
    syn: list[dict[str, Any]] = []
    shown: dict[str, Any] | None = None
    for k, (item, image_id) in enumerate(zip(items, ids)):
        d = transform({"image": item["image"], "label": item["label"]})
        ref = d["label"].numpy() > 0.5
        preds = {}
        for name, src in models.items():
            if name in nets:
                preds[name] = predict_masks(nets[name], d["image"], ref.shape[-2:])
            else:
                preds[name] = read_mask_dir(src, image_id, spec.structures, ref.shape)
        rows += ensemble_rows(preds, ref, image_id, spec.structures, methods, task=task)
        syn += synergy_rows(preds, ref, image_id, spec.structures, task=task)
        if k == min(panel_image, len(items) - 1):
            # shown on the reference's grid (an image of another size than its masks, e.g. JSRT .IMG 2048 with SCR
            # 1024, is resampled to it as in the evaluation: bundle.transforms.LoadMaskd)
            shown = {"image": resample_image(load_radiograph(item["image"])[0], ref.shape[-2:]), "ref": ref, "preds": preds, "id": image_id,
                     "ens": ensemble_masks(list(preds.values()), methods=methods)}
    table, syn_table = pd.DataFrame(rows), pd.DataFrame(syn)
    mean_all = table.groupby(["task", "image", "method", "models"], sort=False)["dice"].mean().reset_index()
    summary = pd.concat([
        mean_all.groupby(["task", "method", "models"], sort=False)["dice"].agg(["mean", "std", "count"])
        .reset_index().assign(structure="all"),
        table.groupby(["task", "method", "models", "structure"], sort=False)["dice"].agg(["mean", "std", "count"])
        .reset_index()], ignore_index=True)
    summary = summary.rename(columns={"mean": "dice", "std": "dice_sd", "count": "n_images"})
    summary = summary[["task", "structure", "method", "models", "dice", "dice_sd", "n_images"]]
    syn_all = syn_table.groupby(["task", "image", "model_a", "model_b"], sort=False)[
        ["dice_a", "dice_b", "dice_union", "dice_intersection", "best_single", "gain_union", "gain_intersection"]
    ].mean().reset_index().assign(structure="all")
    syn_both = pd.concat([syn_all, syn_table], ignore_index=True)
    synergy = syn_both.groupby(["task", "structure", "model_a", "model_b"], sort=False).agg(
        n_images=("image", "count"), dice_a=("dice_a", "mean"), dice_b=("dice_b", "mean"),
        dice_union=("dice_union", "mean"), dice_intersection=("dice_intersection", "mean"),
        best_single=("best_single", "mean"), gain_union=("gain_union", "mean"),
        gain_intersection=("gain_intersection", "mean"),
        union_wins=("gain_union", lambda g: float((g > 0).mean())),
        intersection_wins=("gain_intersection", lambda g: float((g > 0).mean()))).reset_index()
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    files = []
    for name, frame in (("ensembles_rows", table), ("ensembles", summary), ("synergy_rows", syn_table),
                        ("synergy", synergy)):
        path = os.path.join(out, f"{name}.csv")
        atomic_write_text(path, frame.to_csv(index=False))
        files.append(path)
    panel = None
    if shown is not None:
        dsc = {r["models"] if r["method"] == "single" else r["method"]: r["dice"]
               for r in mean_all[mean_all["image"] == shown["id"]].to_dict("records")}
        img = shown["image"]
        tiles = [multi_overlay(img, shown["ref"])]
        titles = [f"reference {shown['id']}"]
        for name, mask in shown["preds"].items():
            tiles.append(multi_overlay(img, mask))
            titles.append(f"{name} {dsc.get(name, float('nan')):.3f}")
        for method, mask in shown["ens"].items():
            tiles.append(multi_overlay(img, mask))
            titles.append(f"{method} {dsc.get(method, float('nan')):.3f}")
        panel = save_grid(tiles, titles, min(len(tiles), 5), os.path.join(out, "ensemble_panel.png"),
                          tile_size=tile_size)
        files.append(panel)
    return {"rows": table, "summary": summary, "synergy_rows": syn_table, "synergy": synergy, "panel": panel,
            "files": files}


# --------------------------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python (for :func:`bundle.utils.atomic_write_json`, which forbids NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _metric_key(*parts: Any) -> str:
    return "_".join(slug(str(p)).replace(":", "_") for p in parts)


def _missing(paths: Mapping[str, PathLike]) -> list[str]:
    return [f"{k}: {v}" for k, v in paths.items() if not v or not os.path.exists(v)]


@dataclass
class AnalysisContext:
    """What the analysis steps share: where they write, the task and network of the image views, and what they
    collect (``status`` per section, ``files``, ``summary``, MLflow ``metrics``).

    Args:
        out_dir: output folder (``<output_root>/analysis``).
        task: the task of the Grad-CAM and ensemble views.
        datalist: the task's datalist JSON (test images and reference masks).
        split: datalist section of the views.
        image_size: network input size.
        arch, arch_kwargs, device: the segmentation network.
        init_labels: display names of the inits in the figures.
        seed: bootstrap and jitter seed.
    """

    out_dir: PathLike
    task: str = "scr"
    datalist: PathLike | None = None
    split: str = "test"
    image_size: Sequence[int] = (128, 128)
    arch: str = "segresnet"
    arch_kwargs: Mapping[str, Any] | None = None
    device: str | torch.device = "cpu"
    init_labels: Mapping[str, str] | None = None
    seed: int = 0
    status: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = os.fspath(self.out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.summary.setdefault("task", self.task)

    def path(self, name: str) -> str:
        return os.path.join(os.fspath(self.out_dir), name)

    def write_csv(self, name: str, frame: Any) -> str:
        """Write ``frame`` as ``<out_dir>/<name>`` (atomically) and list it among the files."""
        path = self.path(name)
        atomic_write_text(path, frame.to_csv(index=False))
        self.files.append(path)
        return path


class StatisticsStep:
    """Statistics of every init against ``reference`` (:func:`statistics_table`, per structure too), replicability,
    learning curves, Dice distributions and the per-seed table (worst seed, collapsed structures) of the sweep CSV.

    Args:
        sweep_csv: the sweep's tidy CSV (all its tasks enter).
        reference: the reference init.
        alpha, n_boot, confidence, holm_by: statistics settings (:func:`statistics_table`).
    """

    def __init__(self, sweep_csv: PathLike, reference: str = "scratch", alpha: float = 0.05, n_boot: int = 10000,
                 confidence: float = 0.95, holm_by: Sequence[str] | None = None):
        self.sweep_csv, self.reference = sweep_csv, reference
        self.alpha, self.n_boot, self.confidence, self.holm_by = alpha, n_boot, confidence, holm_by

    def __call__(self, ctx: AnalysisContext) -> None:
        from .plots import plot_dice_distributions, plot_learning_curves

        ctx.summary.update(sweep_csv=os.fspath(self.sweep_csv), reference=self.reference)
        ctx.params.update(sweep_csv=os.fspath(self.sweep_csv), reference=self.reference, alpha=self.alpha,
                          n_boot=self.n_boot, confidence=self.confidence, unit=_UNIT, holm_by=str(self.holm_by))
        if not os.path.isfile(self.sweep_csv):
            for section in ("statistics", "learning_curves"):
                ctx.status[section] = f"not run: no sweep CSV at {self.sweep_csv}"
            return
        df = load_sweep(self.sweep_csv)
        ctx.summary.update(n_rows=len(df), tasks=sorted(df["task"].unique()), inits=sorted(df["init"].unique()),
                           train_sizes=[str(s) for s in sorted(set(df["train_size"]), key=size_key)],
                           seeds=sorted(int(s) for s in df["seed"].unique()))
        self._statistics(ctx, df)
        curves = learning_curves(df, self.confidence, self.n_boot, ctx.seed)
        ctx.write_csv("learning_curves.csv", curves)
        scores = per_image_scores(df)
        ctx.write_csv("dice_scores.csv", scores)
        ctx.files.append(plot_learning_curves(curves, ctx.path("learning_curves.png"), ctx.init_labels))
        ctx.files.append(plot_dice_distributions(scores, ctx.path("dice_distributions.png"), ctx.init_labels,
                                                 seed=ctx.seed))
        for r in curves[curves["structure"] == "all"].to_dict("records"):
            ctx.metrics[_metric_key("curve", r["task"], r["init"], f"n{r['train_size']}", "dice")] = r["mean"]
        seeds = seed_table(df)
        ctx.write_csv("seeds.csv", seeds)
        ctx.summary["collapsed"] = [f"{r['task']}/{r['structure']}/{r['init']}/n{r['train_size']} seeds "
                                    f"{r['collapsed_seeds']}" for r in seeds[seeds["collapsed"]].to_dict("records")]
        ctx.metrics["n_collapsed"] = float(len(ctx.summary["collapsed"]))
        ctx.status["learning_curves"] = "done"

    def _statistics(self, ctx: AnalysisContext, df: Any) -> None:
        if self.reference not in set(df["init"]):
            ctx.status["statistics"] = (f"not run: reference init {self.reference!r} not in the sweep "
                                        f"({ctx.summary['inits']})")
            return
        settings = (self.alpha, self.n_boot, self.confidence, self.holm_by, ctx.seed)
        stats = statistics_table(df, self.reference, False, *settings)
        ctx.write_csv("statistics.csv", stats)
        ctx.write_csv("statistics_structures.csv", statistics_table(df, self.reference, True, *settings))
        ctx.write_csv("replicability.csv", replicability_table(df))
        for r in stats.to_dict("records"):
            key = _metric_key("stat", r["task"], r["init"], f"n{r['train_size']}")
            ctx.metrics[f"{key}_mean_diff"], ctx.metrics[f"{key}_p_holm"] = r["mean_diff"], r["p_holm"]
        ctx.summary["n_significant"] = int(stats["significant"].sum())
        ctx.summary["n_comparisons"] = len(stats)
        ctx.status["statistics"] = "done"


class ControlsStep:
    """The DoLL init against the pre-training controls and no pre-training (:func:`controls_table`): ``controls.csv``
    (mean over structures), ``controls_structures.csv`` and ``controls.png`` (mean Dice per init with its CI, one
    panel per task). Not run when the sweep has no control init (``configs/sweep.yaml`` grid ``controls``).

    Args:
        sweep_csv: the sweep's tidy CSV. method: the init compared with the controls.
        alpha, n_boot, confidence: statistics settings.
    """

    def __init__(self, sweep_csv: PathLike, method: str = "doll", alpha: float = 0.05, n_boot: int = 10000,
                 confidence: float = 0.95):
        self.sweep_csv, self.method = sweep_csv, method
        self.alpha, self.n_boot, self.confidence = alpha, n_boot, confidence

    def __call__(self, ctx: AnalysisContext) -> None:
        from .plots import plot_controls

        if not os.path.isfile(self.sweep_csv):
            ctx.status["controls"] = f"not run: no sweep CSV at {self.sweep_csv}"
            return
        df = load_sweep(self.sweep_csv)
        have = [c for c in CONTROL_INITS if c != "scratch" and c in set(df["init"].astype(str))]
        if not have or self.method not in set(df["init"].astype(str)):
            ctx.status["controls"] = ("not run: the sweep has no pre-training control (inits "
                                      f"{', '.join(CONTROL_INITS[:-1])}; configs/sweep.yaml grid controls)")
            return
        settings = dict(alpha=self.alpha, n_boot=self.n_boot, confidence=self.confidence, seed=ctx.seed)
        table = controls_table(df, self.method, **settings)
        ctx.write_csv("controls.csv", table)
        ctx.write_csv("controls_structures.csv", controls_table(df, self.method, by_structure=True, **settings))
        inits = [self.method, *[c for c in CONTROL_INITS if c in set(df["init"].astype(str))]]
        curves = learning_curves(df[df["init"].astype(str).isin(inits)], self.confidence, self.n_boot, ctx.seed)
        cells = {(str(r["task"]), str(r["train_size"])) for r in table.to_dict("records")}
        curves = curves[[(str(t), str(s)) in cells for t, s in zip(curves["task"], curves["train_size"])]]
        ctx.write_csv("controls_means.csv", curves)
        ctx.files.append(plot_controls(curves, ctx.path("controls.png"), ctx.init_labels, order=inits))
        for r in table.to_dict("records"):
            key = _metric_key("control", r["task"], r["reference"], f"n{r['train_size']}")
            ctx.metrics[f"{key}_mean_diff"], ctx.metrics[f"{key}_p_holm"] = r["mean_diff"], r["p_holm"]
        ctx.status["controls"] = "done"


class EfficiencyStep:
    """Training efficiency: validation Dice against optimizer steps per init and the steps to 95% of the final
    Dice (:func:`efficiency_table`), from the sweep's validation curves (``None`` or missing: not run)."""

    def __init__(self, val_curves_csv: PathLike | None):
        self.val_curves_csv = val_curves_csv

    def __call__(self, ctx: AnalysisContext) -> None:
        from .plots import plot_training_efficiency

        if not self.val_curves_csv or not os.path.isfile(self.val_curves_csv):
            ctx.status["efficiency"] = f"not run: no validation curves at {self.val_curves_csv}"
            return
        vc = load_val_curves(self.val_curves_csv)
        eff = efficiency_table(vc)
        ctx.write_csv("efficiency.csv", eff)
        mean_curves = mean_val_curves(vc)
        ctx.write_csv("val_curves_mean.csv", mean_curves)
        ctx.files.append(plot_training_efficiency(mean_curves, ctx.path("training_efficiency.png"), ctx.init_labels))
        for r in eff.to_dict("records"):
            ctx.metrics[_metric_key("steps95", r["task"], r["init"], f"n{r['train_size']}")] = r["steps_to_95_mean"]
        ctx.status["efficiency"] = "done"


class GradCAMStep:
    """Grad-CAM views of several fine-tuned networks on the test images (:func:`gradcam_analysis`).

    Args:
        checkpoints: model name -> checkpoint (e.g. DoLL-init and scratch).
        num_images, mode, layer: see :func:`gradcam_analysis`.
    """

    def __init__(self, checkpoints: Mapping[str, PathLike] | None, num_images: int = 3, mode: str = "hirescam",
                 layer: str | None = None):
        self.checkpoints = dict(checkpoints or {})
        self.num_images, self.mode, self.layer = num_images, mode, layer

    def __call__(self, ctx: AnalysisContext) -> None:
        cams = self.checkpoints
        ctx.params.update(gradcam_mode=self.mode, gradcam_models=",".join(cams))
        problems = _missing({"datalist": ctx.datalist or "", **{f"checkpoint {k}": v for k, v in cams.items()}})
        if not cams or problems:
            ctx.status["gradcam"] = "not run: " + ("no checkpoints given" if not cams else
                                                   "missing " + "; ".join(problems))
            return
        res = gradcam_analysis(cams, os.fspath(ctx.datalist or ""), ctx.task, ctx.out_dir, ctx.image_size, ctx.split,
                               self.num_images, self.mode, self.layer, ctx.arch, ctx.arch_kwargs, ctx.device)
        ctx.files += [res["csv"], res["panel"]]
        for name, g in res["rows"].groupby("model", sort=False):
            ctx.metrics[_metric_key("gradcam", name, "inside_fraction")] = float(g["inside_fraction"].mean())
            ctx.metrics[_metric_key("gradcam", name, "pointing")] = float(g["max_inside"].mean())
        ctx.status["gradcam"] = "done"


class EnsembleStep:
    """Mask ensembles of several models and their synergy (:func:`ensemble_analysis`).

    Args:
        models: model name -> saved-mask folder or checkpoint (:func:`sweep_models`); at least two.
        methods, max_images: see :func:`ensemble_analysis`.
    """

    def __init__(self, models: Mapping[str, PathLike] | None,
                 methods: Sequence[str] = ("union", "intersection", "majority", "staple"),
                 max_images: int | None = 50):
        self.models = dict(models or {})
        self.methods, self.max_images = list(methods), max_images

    def __call__(self, ctx: AnalysisContext) -> None:
        ens = self.models
        ctx.params.update(ensemble_models=",".join(ens), ensemble_methods=",".join(self.methods))
        problems = _missing({"datalist": ctx.datalist or "", **{f"model {k}": v for k, v in ens.items()}})
        if len(ens) < 2 or problems:
            ctx.status["ensembles"] = "not run: " + (f"needs at least two models, got {len(ens)}" if len(ens) < 2
                                                     else "missing " + "; ".join(problems))
            return
        res = ensemble_analysis(ens, os.fspath(ctx.datalist or ""), ctx.task, ctx.out_dir, ctx.image_size, ctx.split,
                                self.methods, self.max_images, ctx.arch, ctx.arch_kwargs, ctx.device)
        ctx.files += res["files"]
        for r in res["summary"][res["summary"]["structure"] == "all"].to_dict("records"):
            name = r["models"] if r["method"] == "single" else r["method"]
            ctx.metrics[_metric_key("ensemble", r["task"], name, "dice")] = r["dice"]
        ctx.summary["ensemble_models"] = {k: os.fspath(v) for k, v in ens.items()}
        ctx.status["ensembles"] = "done"


def run_analysis(context: AnalysisContext, steps: Sequence[Callable[[AnalysisContext], None]],
                 tracking_uri: str | None = None, experiment: str = "cxr_doll_analysis") -> dict[str, Any]:
    """Run the analysis ``steps`` in order (configs/analysis.yaml lists them: :class:`StatisticsStep`,
    :class:`EfficiencyStep`, :class:`GradCAMStep`, :class:`EnsembleStep`), each recording its section's status,
    files and metrics in ``context``; then write ``status.json`` and ``summary.json`` and log one MLflow run.

    Returns:
        ``{"status": {section: "done" | "not run: ..."}, "files": [...], "summary": {...}, "run_id": ...}``.
    """
    for step in steps:
        step(context)
    status, files, summary = context.status, context.files, context.summary
    summary["status"] = status
    for name, obj in (("status.json", status), ("summary.json", summary)):
        path = context.path(name)
        atomic_write_json(path, _jsonable(obj))
        files.append(path)
    run_id = None
    if tracking_uri:
        from ..tracking import log_run

        params = {"task": context.task, **context.params}
        run_id = log_run(tracking_uri, experiment, "analysis", params=params, metrics=context.metrics,
                         artifacts=files, tags={"stage": "analysis", "task": context.task,
                                                **{f"status_{k}": v[:200] for k, v in status.items()}})
    logger.info("analysis: " + ", ".join(f"{k}: {v}" for k, v in status.items()))
    return {"status": status, "files": files, "summary": summary, "run_id": run_id}

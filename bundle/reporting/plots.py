"""Matplotlib figures of the analysis and the report (Agg canvas, no pyplot state): learning curves, Dice
distributions, grouped bars, and multi-structure mask overlays.

Every ``save_*``/plot function writes a PNG atomically (:func:`bundle.utils.atomic_save`) and returns its path.
Figures are built with :class:`matplotlib.figure.Figure` on a :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`
so that nothing depends on the interactive backend or on a global figure state (safe in servers and tests).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..utils import PathLike, atomic_save

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "STRUCTURE_COLOURS",
    "size_key",
    "sort_by_size",
    "new_figure",
    "save_figure",
    "plot_learning_curves",
    "plot_dice_distributions",
    "plot_bars",
    "plot_grouped_bars",
    "multi_overlay",
]

#: RGB colours of the output structures in overlays (channel order).
STRUCTURE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (60, 220, 60), (235, 60, 60), (240, 220, 40), (60, 160, 255), (220, 0, 220), (0, 220, 200))
#: Line colours of the inits (matplotlib "tab10").
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def size_key(value: Any) -> tuple[int, float, str]:
    """Sort key of training-set sizes: numbers ascending, then ``"all"`` (and any other text) last."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def sort_by_size(frame: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """``frame`` sorted by ``cols`` (a stable sort), ``train_size`` in :func:`size_key` order, the others as text;
    the index is reset."""
    order = sorted(range(len(frame)), key=lambda i: tuple(
        size_key(frame[c].iat[i]) if c == "train_size" else (0, 0.0, str(frame[c].iat[i])) for c in cols))
    return frame.iloc[order].reset_index(drop=True)


def new_figure(width: float = 6.4, height: float = 4.0, nrows: int = 1, ncols: int = 1) -> tuple[Any, np.ndarray]:
    """A :class:`~matplotlib.figure.Figure` with an Agg canvas and its axes as a 2-D array ``(nrows, ncols)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(np.asarray(fig.subplots(nrows, ncols, squeeze=False)))
    return fig, axes


def save_figure(fig: Any, path: PathLike, dpi: int = 100) -> str:
    """Save ``fig`` as PNG at ``path`` atomically (tight layout); returns the path."""
    fig.tight_layout()
    path = os.fspath(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path


def _colour(k: int) -> str:
    return _TAB10[k % len(_TAB10)]


def plot_learning_curves(curves: Any, path: PathLike, labels: Mapping[str, str] | None = None,
                         structure: str = "all", value_label: str = "mean Dice") -> str:
    """Learning curves: mean score against training-set size per init, with the confidence band, one panel per task.

    Args:
        curves: table with columns ``task, structure, init, train_size, mean, ci_low, ci_high`` (see
            :func:`bundle.reporting.analysis.learning_curves`).
        path: output PNG.
        labels: display names of the inits.
        structure: which ``structure`` rows to draw (``"all"``: the mean over structures).
        value_label: y-axis label.
    """
    labels = dict(labels or {})
    data = curves[curves["structure"].astype(str) == structure] if "structure" in curves.columns else curves
    tasks = sorted(data["task"].astype(str).unique()) or [""]
    fig, axes = new_figure(5.0 * len(tasks), 3.8, 1, len(tasks))
    for ax, task in zip(axes[0], tasks):
        sub = data[data["task"].astype(str) == task]
        sizes = sorted({str(s) for s in sub["train_size"]}, key=size_key)
        pos = {s: i for i, s in enumerate(sizes)}
        inits = sorted(sub["init"].astype(str).unique())
        for k, init in enumerate(inits):
            g = sub[sub["init"].astype(str) == init].copy()
            g["_x"] = g["train_size"].astype(str).map(pos)
            g = g.sort_values("_x")
            x = g["_x"].to_numpy(dtype=float) + (k - (len(inits) - 1) / 2) * 0.04  # small dodge
            y = g["mean"].to_numpy(dtype=float)
            lo, hi = g["ci_low"].to_numpy(dtype=float), g["ci_high"].to_numpy(dtype=float)
            ax.plot(x, y, marker="o", color=_colour(k), label=labels.get(init, init))
            ax.fill_between(x, lo, hi, color=_colour(k), alpha=0.2, linewidth=0)
            ax.errorbar(x, y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], fmt="none", ecolor=_colour(k),
                        capsize=3, linewidth=1)
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(sizes)
        ax.set_xlabel("labelled training images")
        ax.set_ylabel(value_label)
        ax.set_title(f"{task}: {value_label} (95% CI)" if task else value_label)
        ax.grid(True, alpha=0.3)
        if inits:
            ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_controls(means: Any, path: PathLike, labels: Mapping[str, str] | None = None,
                  order: Sequence[str] | None = None, structure: str = "all", value_label: str = "mean Dice") -> str:
    """The pre-training controls: mean score per init (bars, in ``order``) with its confidence interval, grouped by
    training-set size, one panel per task.

    Args:
        means: table ``task, structure, init, train_size, mean, ci_low, ci_high``
            (:func:`bundle.reporting.analysis.learning_curves`).
        path: output PNG. labels: display names of the inits. order: the inits' order (default: sorted).
        structure: which ``structure`` rows to draw. value_label: y-axis label.
    """
    labels = dict(labels or {})
    data = means[means["structure"].astype(str) == structure] if "structure" in means.columns else means
    tasks = sorted(data["task"].astype(str).unique()) or [""]
    panel_width = max(5.0, 1.6 * len(data["train_size"].unique()) + 2.0)
    fig, axes = new_figure(panel_width * len(tasks), 3.8, 1, len(tasks))
    present = [str(i) for i in data["init"].astype(str).unique()]
    inits = [i for i in (order or sorted(present)) if i in present]
    width = 0.8 / max(1, len(inits))
    for ax, task in zip(axes[0], tasks):
        sub = data[data["task"].astype(str) == task]
        sizes = sorted({str(s) for s in sub["train_size"]}, key=size_key)
        lows = []
        for k, init in enumerate(inits):
            g = sub[sub["init"].astype(str) == init]
            pos = {str(s): i for i, s in enumerate(sizes)}
            x = np.array([pos[str(s)] for s in g["train_size"]], dtype=float) + (k - (len(inits) - 1) / 2) * width
            y = g["mean"].to_numpy(dtype=float)
            lo, hi = g["ci_low"].to_numpy(dtype=float), g["ci_high"].to_numpy(dtype=float)
            lows.extend(lo.tolist())
            ax.bar(x, y, width=width * 0.95, color=_colour(k), label=labels.get(init, init))
            ax.errorbar(x, y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], fmt="none", ecolor="black",
                        capsize=2, linewidth=1)
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([f"{s} images" for s in sizes])
        if lows:
            ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
        ax.set_ylabel(value_label)
        ax.set_title(f"{task}: pre-training controls ({value_label}, 95% CI)" if task else value_label)
        ax.grid(True, axis="y", alpha=0.3)
        if inits:
            ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, path)


def plot_training_efficiency(curves: Any, path: PathLike, labels: Mapping[str, str] | None = None) -> str:
    """Training efficiency: validation Dice against optimizer steps per init (seed mean solid, worst seed dashed),
    one panel per task and training-set size.

    Args:
        curves: table ``task, init, train_size, steps, mean, worst`` (:func:`bundle.reporting.analysis.
            mean_val_curves`).
        path: output PNG.
        labels: display names of the inits.
    """
    labels = dict(labels or {})
    panels = sorted({(str(t), str(s)) for t, s in zip(curves["task"], curves["train_size"])},
                    key=lambda ts: (ts[0], size_key(ts[1]))) or [("", "")]
    ncols = min(4, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = new_figure(4.2 * ncols, 3.3 * nrows, nrows, ncols)
    inits = sorted(curves["init"].astype(str).unique())
    for k, (task, size) in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        sub = curves[(curves["task"].astype(str) == task) & (curves["train_size"].astype(str) == size)]
        for j, init in enumerate(inits):
            g = sub[sub["init"].astype(str) == init].sort_values("steps")
            if g.empty:
                continue
            ax.plot(g["steps"], g["mean"], color=_colour(j), label=labels.get(init, init))
            ax.plot(g["steps"], g["worst"], color=_colour(j), linestyle="--", linewidth=0.8)
        ax.set_title(f"{task}, {size} labelled images" if task else "")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("validation Dice")
        ax.set_ylim(0.0, 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    return save_figure(fig, path)


def plot_dice_distributions(scores: Any, path: PathLike, labels: Mapping[str, str] | None = None,
                            value_col: str = "dice", seed: int = 0) -> str:
    """Box plots with jittered points of per-image scores, grouped by training-set size, one box per init, one
    panel per task.

    Args:
        scores: table with ``task, init, train_size`` and ``value_col`` (e.g. one row per seed and test image).
        path: output PNG.
        labels: display names of the inits.
        value_col: the score column.
        seed: seed of the jitter.
    """
    labels = dict(labels or {})
    rng = np.random.default_rng(seed)
    tasks = sorted(scores["task"].astype(str).unique()) or [""]
    fig, axes = new_figure(5.5 * len(tasks), 3.8, 1, len(tasks))
    for ax, task in zip(axes[0], tasks):
        sub = scores[scores["task"].astype(str) == task]
        sizes = sorted({str(s) for s in sub["train_size"]}, key=size_key)
        inits = sorted(sub["init"].astype(str).unique())
        width = 0.8 / max(len(inits), 1)
        for k, init in enumerate(inits):
            data, positions = [], []
            for i, size in enumerate(sizes):
                v = sub[(sub["init"].astype(str) == init) & (sub["train_size"].astype(str) == size)][value_col]
                v = v.to_numpy(dtype=float)
                v = v[np.isfinite(v)]
                if v.size == 0:
                    continue
                data.append(v)
                positions.append(i + (k - (len(inits) - 1) / 2) * width)
            if not data:
                continue
            bp = ax.boxplot(data, positions=positions, widths=width * 0.85, patch_artist=True, showfliers=False)
            for box in bp["boxes"]:
                box.set_facecolor(_colour(k))
                box.set_alpha(0.35)
            for p, v in zip(positions, data):
                ax.scatter(p + rng.uniform(-width * 0.3, width * 0.3, v.size), v, s=6, color=_colour(k), alpha=0.7,
                           label=None)
            ax.plot([], [], color=_colour(k), linewidth=6, alpha=0.5, label=labels.get(init, init))
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(sizes)
        ax.set_xlabel("labelled training images")
        name = "Dice" if value_col == "dice" else value_col
        ax.set_ylabel(f"per-image {name}")
        ax.set_title(f"{task}: {name} per test image and seed" if task else name)
        ax.grid(True, axis="y", alpha=0.3)
        if inits:
            ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_bars(labels: Sequence[str], values: Sequence[float], path: PathLike, title: str = "",
              xlabel: str = "") -> str:
    """Horizontal bar chart (one bar per label, value written at its end)."""
    vals = np.asarray(values, dtype=float)
    fig, axes = new_figure(6.4, max(1.6, 0.35 * len(labels) + 1.0))
    ax = axes[0, 0]
    y = np.arange(len(labels))
    ax.barh(y, vals, color=_colour(0))
    ax.set_yticks(y)
    ax.set_yticklabels([str(s) for s in labels], fontsize=8)
    ax.invert_yaxis()
    for yi, v in zip(y, vals):
        if np.isfinite(v):
            ax.text(v, yi, f" {v:.3g}", va="center", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_grouped_bars(table: Any, path: PathLike, title: str = "", xlabel: str = "", xlim: tuple[float, float] | None
                      = None) -> str:
    """Grouped horizontal bars of a ``pandas.DataFrame``: one group per row (index), one bar per column."""
    rows, cols = [str(i) for i in table.index], [str(c) for c in table.columns]
    values = table.to_numpy(dtype=float)
    fig, axes = new_figure(6.4, max(2.0, 0.25 * len(rows) * max(len(cols), 1) + 1.0))
    ax = axes[0, 0]
    height = 0.8 / max(len(cols), 1)
    base = np.arange(len(rows))
    for k, col in enumerate(cols):
        ax.barh(base + (k - (len(cols) - 1) / 2) * height, values[:, k], height=height, color=_colour(k), label=col)
    ax.set_yticks(base)
    ax.set_yticklabels(rows, fontsize=8)
    ax.invert_yaxis()
    if xlim is not None:
        ax.set_xlim(*xlim)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def multi_overlay(image: np.ndarray, masks: np.ndarray | None, alpha: float = 0.35) -> np.ndarray:
    """``(H, W, 3)`` uint8: the grey image with each channel of ``masks`` ``(C, H, W)`` blended in its
    :data:`STRUCTURE_COLOURS` colour, with outlines."""
    from ..visualize import contour, overlay_rgb

    rgb = overlay_rgb(image)
    if masks is None:
        return rgb
    m = np.asarray(masks, dtype=bool)
    if m.ndim == 2:
        m = m[None]
    out = rgb.astype(np.float32)
    for c in range(m.shape[0]):
        col = np.asarray(STRUCTURE_COLOURS[c % len(STRUCTURE_COLOURS)], dtype=np.float32)
        out[m[c]] = (1 - alpha) * out[m[c]] + alpha * col
        out[contour(m[c])] = col
    return out.astype(np.uint8)

"""Ensembles of binary masks from several models (raters): union, intersection, majority vote and STAPLE, and the
"synergistic" pairwise analysis of Ghosal and Shah (arXiv:2011.05791).

All functions take a sequence of ``R`` binary masks of one shape (e.g. ``(C, H, W)`` for one image, every model's
prediction), as numpy arrays or torch tensors, or one array stacked as ``(R, ...)``, and return numpy arrays of the
common mask shape. Values must be boolean or 0/1 (see :func:`bundle.metrics.segmentation.as_binary_numpy`).

STAPLE (Warfield, Zou, Wells, *Simultaneous truth and performance level estimation (STAPLE)*, IEEE TMI 23(7),
2004), binary version. Decisions ``D[j, i]`` of rater ``j`` at voxel ``i``; unknown truth ``T[i]``; rater
performance ``p[j] = P(D=1 | T=1)`` (sensitivity) and ``q[j] = P(D=0 | T=0)`` (specificity); prior
``f = P(T=1)``. EM:

- E-step: ``a[i] = f * prod_j p[j]^D[j,i] (1-p[j])^(1-D[j,i])``, ``b[i] = (1-f) * prod_j q[j]^(1-D[j,i])
  (1-q[j])^D[j,i]``, ``W[i] = a[i] / (a[i] + b[i])`` (computed in log space);
- M-step: ``p[j] = sum_i W[i] D[j,i] / sum_i W[i]``, ``q[j] = sum_i (1-W[i]) (1-D[j,i]) / sum_i (1-W[i])``.

Voxels are treated independently (no Markov random field), as in Warfield's eq. (12)-(16). The prior is fixed:
by default the mean of all decisions (the fraction of voxels labelled foreground, averaged over raters), or a given
value. Iteration stops when no ``p`` or ``q`` changes by more than ``tol``, or after ``max_iter`` EM steps; a final
E-step makes the returned posterior ``W`` consistent with the returned ``p`` and ``q``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .segmentation import as_binary_numpy, dice

__all__ = [
    "stack_masks",
    "union",
    "intersection",
    "majority_vote",
    "StapleResult",
    "staple",
    "staple_e_step",
    "staple_m_step",
    "ensemble_masks",
    "ensemble_rows",
    "synergy_rows",
]

_EPS = 1e-10


def stack_masks(masks: Any) -> np.ndarray:
    """Stack ``R`` binary masks (a sequence, or an array already shaped ``(R, ...)``) into a bool ``(R, ...)`` array."""
    if isinstance(masks, (list, tuple)):
        if len(masks) == 0:
            raise ValueError("at least one mask is needed")
        arrs = [as_binary_numpy(m, f"mask {j}") for j, m in enumerate(masks)]
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1:
            raise ValueError(f"all masks must have the same shape, got {sorted(shapes)}")
        return np.stack(arrs)
    arr = as_binary_numpy(masks, "masks")
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise ValueError(f"expected masks stacked as (R, ...), got shape {arr.shape}")
    return arr


def union(masks: Any) -> np.ndarray:
    """Foreground where any rater says foreground (logical OR)."""
    return stack_masks(masks).any(axis=0)


def intersection(masks: Any) -> np.ndarray:
    """Foreground where every rater says foreground (logical AND)."""
    return stack_masks(masks).all(axis=0)


def majority_vote(masks: Any, tie: bool = False) -> np.ndarray:
    """Foreground where more than half of the ``R`` raters say foreground.

    Args:
        tie: the label of a tie, which happens only for an even ``R`` when exactly ``R/2`` raters vote
            foreground. The default ``False`` (background) makes majority vote the "strict majority"; ``True``
            gives "at least half". With an odd ``R`` there are no ties.
    """
    d = stack_masks(masks)
    votes = d.sum(axis=0, dtype=np.int64)
    r = d.shape[0]
    out = 2 * votes > r
    if tie and r % 2 == 0:
        out |= 2 * votes == r
    return out


@dataclass
class StapleResult:
    """Output of :func:`staple`.

    Attributes:
        posterior: soft estimate ``W = P(T=1 | D, p, q)`` with the mask shape, float64 in ``[0, 1]``.
        mask: ``posterior > threshold`` (the hard STAPLE consensus), bool.
        sensitivity: ``p``, shape ``(R,)``.
        specificity: ``q``, shape ``(R,)``.
        prior: the prior ``f = P(T=1)`` used.
        n_iter: EM steps run.
        converged: whether the ``tol`` criterion was met within ``max_iter``.
    """

    posterior: np.ndarray
    mask: np.ndarray
    sensitivity: np.ndarray
    specificity: np.ndarray
    prior: float
    n_iter: int
    converged: bool


def staple_e_step(decisions: np.ndarray, p: np.ndarray, q: np.ndarray, prior: float) -> np.ndarray:
    """STAPLE E-step: the posterior ``W[i] = P(T[i]=1 | D, p, q)`` for decisions ``(R, N)`` (see module docstring).

    ``p`` and ``q`` are clipped to ``[1e-10, 1 - 1e-10]`` so that a perfect rater does not produce ``log(0)``.
    """
    d = np.asarray(decisions, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)[:, None]
    q = np.clip(np.asarray(q, dtype=np.float64), _EPS, 1.0 - _EPS)[:, None]
    f = float(np.clip(prior, _EPS, 1.0 - _EPS))
    log_a = np.log(f) + (d * np.log(p) + (1.0 - d) * np.log1p(-p)).sum(axis=0)
    log_b = np.log1p(-f) + ((1.0 - d) * np.log(q) + d * np.log1p(-q)).sum(axis=0)
    # W = a / (a + b) = sigmoid(log a - log b), computed stably
    z = log_a - log_b
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def staple_m_step(decisions: np.ndarray, posterior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """STAPLE M-step: sensitivities ``p`` and specificities ``q`` ``(R,)`` from decisions ``(R, N)`` and ``W (N,)``.

    When ``sum W == 0`` (no voxel believed foreground) ``p`` is set to 1 (no foreground to miss); likewise
    ``q = 1`` when ``sum (1 - W) == 0``.
    """
    d = np.asarray(decisions, dtype=np.float64)
    w = np.asarray(posterior, dtype=np.float64)
    sw, snw = w.sum(), (1.0 - w).sum()
    p = (d * w).sum(axis=1) / sw if sw > 0 else np.ones(d.shape[0])
    q = ((1.0 - d) * (1.0 - w)).sum(axis=1) / snw if snw > 0 else np.ones(d.shape[0])
    return p, q


def staple(
    masks: Any,
    prior: float | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
    init_sensitivity: float | Sequence[float] = 0.99,
    init_specificity: float | Sequence[float] = 0.99,
    threshold: float = 0.5,
) -> StapleResult:
    """Binary STAPLE (Warfield et al. 2004) over ``R`` raters' masks (see the module docstring for the model).

    Args:
        masks: ``R`` binary masks of one shape, or an array ``(R, ...)``. All voxels of all channels are pooled
            into one EM problem: run STAPLE per structure (channel) to get per-structure ``p`` and ``q``.
        prior: ``P(T=1)``; default: the mean of all decisions.
        max_iter: maximum EM steps (at least 1).
        tol: stop when ``max(|Δp|, |Δq|) <= tol`` between two EM steps.
        init_sensitivity: initial ``p`` (scalar or one per rater).
        init_specificity: initial ``q`` (scalar or one per rater).
        threshold: the hard mask is ``posterior > threshold``.

    Returns:
        :class:`StapleResult`.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    d = stack_masks(masks)
    shape = d.shape[1:]
    r = d.shape[0]
    flat = d.reshape(r, -1).astype(np.float64)
    f = float(flat.mean()) if prior is None else float(prior)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"prior must lie in [0, 1], got {prior}")
    p = np.broadcast_to(np.asarray(init_sensitivity, dtype=np.float64), (r,)).copy()
    q = np.broadcast_to(np.asarray(init_specificity, dtype=np.float64), (r,)).copy()
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        w = staple_e_step(flat, p, q, f)
        p_new, q_new = staple_m_step(flat, w)
        delta = max(float(np.abs(p_new - p).max()), float(np.abs(q_new - q).max()))
        p, q = p_new, q_new
        if delta <= tol:
            converged = True
            break
    w = staple_e_step(flat, p, q, f)
    posterior = w.reshape(shape)
    return StapleResult(posterior=posterior, mask=posterior > threshold, sensitivity=p, specificity=q, prior=f,
                        n_iter=n_iter, converged=converged)


def ensemble_masks(masks: Any, methods: Sequence[str] = ("union", "intersection", "majority", "staple"),
                   per_channel_staple: bool = True, **staple_kwargs: Any) -> dict[str, np.ndarray]:
    """The ensemble masks of ``R`` models' ``(C, H, W)`` predictions, by method name.

    Args:
        masks: ``R`` binary masks ``(C, H, W)`` (or ``(R, C, H, W)``).
        methods: any of ``"union"``, ``"intersection"``, ``"majority"`` (ties -> background), ``"staple"``.
        per_channel_staple: run STAPLE separately for each channel (structure), so that each structure gets its
            own rater performances and prior (default); otherwise one STAPLE over all channels.
        staple_kwargs: passed to :func:`staple`.
    """
    d = stack_masks(masks)
    out: dict[str, np.ndarray] = {}
    for m in methods:
        if m == "union":
            out[m] = union(d)
        elif m == "intersection":
            out[m] = intersection(d)
        elif m == "majority":
            out[m] = majority_vote(d)
        elif m == "staple":
            if per_channel_staple and d.ndim >= 3:
                out[m] = np.stack([staple(d[:, c], **staple_kwargs).mask for c in range(d.shape[1])])
            else:
                out[m] = staple(d, **staple_kwargs).mask
        else:
            raise ValueError(f"unknown ensemble method {m!r} (expected union, intersection, majority, staple)")
    return out


def _names(n: int, structures: Sequence[str] | None) -> list[str]:
    names = [str(i) for i in range(n)] if structures is None else [str(s) for s in structures]
    if len(names) != n:
        raise ValueError(f"{len(names)} structure names for {n} channels")
    return names


def _as_cwh(mask: Any, name: str) -> np.ndarray:
    arr = as_binary_numpy(mask, name)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected (C, H, W) masks for one image, got shape {arr.shape}")
    return arr


def ensemble_rows(
    predictions: Mapping[str, Any],
    reference: Any,
    image_id: str,
    structures: Sequence[str] | None = None,
    methods: Sequence[str] = ("union", "intersection", "majority", "staple"),
    **extra: Any,
) -> list[dict[str, Any]]:
    """Dice of every model alone and of every ensemble of all models, against the reference, for one image.

    Args:
        predictions: model name -> binary masks ``(C, H, W)``.
        reference: reference binary masks ``(C, H, W)``.
        image_id: written in the ``image`` column.
        structures: channel names.
        methods: ensemble methods (see :func:`ensemble_masks`).
        extra: constant columns added first to every row.

    Returns:
        rows ``{*extra, image, structure, method, models, dice}`` where ``method`` is ``"single"`` for a model
        alone (``models`` is its name) or the ensemble method (``models`` joins all names with ``+``).
    """
    if len(predictions) == 0:
        raise ValueError("no predictions given")
    ref = _as_cwh(reference, "reference")
    preds = {k: _as_cwh(v, f"prediction {k!r}") for k, v in predictions.items()}
    names = _names(ref.shape[0], structures)
    rows: list[dict[str, Any]] = []

    def add(method: str, models: str, mask: np.ndarray) -> None:
        dsc = dice(mask, ref)
        for c, s in enumerate(names):
            rows.append({**extra, "image": str(image_id), "structure": s, "method": method, "models": models,
                         "dice": float(dsc[c])})

    for k, v in preds.items():
        add("single", k, v)
    ens = ensemble_masks(list(preds.values()), methods=methods)
    joined = "+".join(preds)
    for m, mask in ens.items():
        add(m, joined, mask)
    return rows


def synergy_rows(
    predictions: Mapping[str, Any],
    reference: Any,
    image_id: str,
    structures: Sequence[str] | None = None,
    **extra: Any,
) -> list[dict[str, Any]]:
    """The "synergistic" pairwise analysis of Ghosal and Shah: for every pair of models, the Dice of the union and
    of the intersection of their masks against the reference, beside each model alone.

    Args:
        predictions: model name -> binary masks ``(C, H, W)`` (at least two models).
        reference: reference binary masks ``(C, H, W)``.
        image_id: written in the ``image`` column.
        structures: channel names.
        extra: constant columns added first to every row.

    Returns:
        one row per (pair, structure): ``{*extra, image, structure, model_a, model_b, dice_a, dice_b,
        dice_union, dice_intersection, best_single, gain_union, gain_intersection}`` with ``best_single =
        max(dice_a, dice_b)`` and ``gain_* = dice_* - best_single`` (positive = the pair beats both models).
    """
    if len(predictions) < 2:
        raise ValueError(f"the synergy analysis needs at least two models, got {len(predictions)}")
    ref = _as_cwh(reference, "reference")
    preds = {k: _as_cwh(v, f"prediction {k!r}") for k, v in predictions.items()}
    for k, v in preds.items():
        if v.shape != ref.shape:
            raise ValueError(f"prediction {k!r} has shape {v.shape}, reference {ref.shape}")
    names = _names(ref.shape[0], structures)
    single = {k: dice(v, ref) for k, v in preds.items()}
    rows: list[dict[str, Any]] = []
    for a, b in itertools.combinations(preds, 2):
        du = dice(preds[a] | preds[b], ref)
        di = dice(preds[a] & preds[b], ref)
        for c, s in enumerate(names):
            da, db = float(single[a][c]), float(single[b][c])
            best = max(da, db)
            rows.append({**extra, "image": str(image_id), "structure": s, "model_a": a, "model_b": b,
                         "dice_a": da, "dice_b": db, "dice_union": float(du[c]), "dice_intersection": float(di[c]),
                         "best_single": best, "gain_union": float(du[c]) - best,
                         "gain_intersection": float(di[c]) - best})
    return rows

"""Deterministic patient-level splits and nested subsets for the low-data protocol.

Every function here is a pure function of its inputs and ``seed`` (``numpy.random.default_rng``): the same items and
seed give the same split on every machine. Items are datalist dictionaries; the patient of an item is
``item[patient_key]`` (default ``"patient"``), or the item's ``image`` path when it has no patient (each image is
then its own patient). Items never straddle a split boundary by patient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["patient_of", "group_by_patient", "patient_split", "split_datalist", "patient_folds", "crossval_datalist",
           "subsample_order", "subsample"]


def patient_of(item: Mapping[str, Any], patient_key: str = "patient") -> str:
    """The patient id of ``item`` as a string (falls back to its ``image`` when it has no patient)."""
    value = item.get(patient_key)
    if value is None or value == "":
        value = item.get("image", "")
        if isinstance(value, (list, tuple)):
            value = value[0] if value else ""
    return str(value)


def group_by_patient(items: Sequence[Mapping[str, Any]], patient_key: str = "patient") -> dict[str, list[int]]:
    """Indices of ``items`` grouped by patient, patients sorted by id (stable, independent of item order)."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(patient_of(item, patient_key), []).append(i)
    return {p: groups[p] for p in sorted(groups)}


def _patient_boundaries_by_fraction(sizes: np.ndarray, fractions: Sequence[float]) -> list[int]:
    """Cut positions in the (shuffled) patient order so that item counts follow ``fractions`` as closely as
    patient granularity allows; every split with a positive fraction gets at least one patient when possible."""
    fr = np.asarray(fractions, dtype=np.float64)
    fr = fr / fr.sum()
    n_pat = len(sizes)
    cum_items = np.concatenate([[0], np.cumsum(sizes)])
    targets = np.cumsum(fr)[:-1] * cum_items[-1]
    cuts = [int(np.argmin(np.abs(cum_items - t))) for t in targets]
    # make the cuts non-decreasing and give each positive-fraction split a patient when there are enough patients
    positive = fr > 0
    out: list[int] = []
    prev = 0
    for k, c in enumerate(cuts):
        need_here = 1 if positive[k] and n_pat >= positive.sum() else 0
        need_after = int(positive[k + 1:].sum()) if n_pat >= positive.sum() else 0
        c = max(c, prev + need_here)
        c = min(c, n_pat - need_after)
        c = max(c, prev)
        out.append(c)
        prev = c
    return out


def patient_split(
    items: Sequence[Mapping[str, Any]],
    fractions: Sequence[float] | None = None,
    counts: Sequence[int | None] | None = None,
    seed: int = 0,
    patient_key: str = "patient",
) -> list[list[Any]]:
    """Split ``items`` into ``len(fractions)`` (or ``len(counts)``) parts with no patient in two parts.

    Patients are sorted by id, shuffled with ``numpy.random.default_rng(seed)``, and cut into consecutive groups.
    Inside each part the items keep their input order.

    Args:
        items: datalist dictionaries.
        fractions: target fraction of *items* per part (normalised to sum 1); cuts fall on patient boundaries, as
            close to the target as the patients' sizes allow, and each part with a positive fraction gets at least
            one patient when there are enough patients.
        counts: number of *patients* per part, exact; one entry may be ``None`` (or ``-1``) for "all the rest".
            Without such an entry, patients beyond ``sum(counts)`` are left out of every part.
            Give exactly one of ``fractions`` and ``counts``.
        seed: seed of the patient shuffle.
        patient_key: the item key that holds the patient id.

    Returns:
        one list of items per part.

    Raises:
        ValueError: on inconsistent arguments (negative fractions, counts larger than the number of patients, ...).
    """
    if (fractions is None) == (counts is None):
        raise ValueError("give exactly one of `fractions` and `counts`")
    groups = group_by_patient(items, patient_key)
    patients = list(groups)
    order = np.random.default_rng(seed).permutation(len(patients))
    shuffled = [patients[i] for i in order]
    sizes = np.array([len(groups[p]) for p in shuffled], dtype=np.int64)

    if fractions is not None:
        if len(fractions) < 1 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
            raise ValueError(f"fractions must be non-negative with a positive sum, got {list(fractions)}")
        cuts = _patient_boundaries_by_fraction(sizes, fractions) if shuffled else [0] * (len(fractions) - 1)
        bounds = [0, *cuts, len(shuffled)]
    else:
        assert counts is not None
        is_rest = [c is None or c == -1 for c in counts]
        if sum(is_rest) > 1:
            raise ValueError(f"at most one count may be None/-1 ('the rest'), got {list(counts)}")
        fixed = [int(c) for c, r in zip(counts, is_rest) if not r]  # type: ignore[arg-type]
        if any(c < 0 for c in fixed):
            raise ValueError(f"counts must be non-negative (or None/-1 for the rest), got {list(counts)}")
        if sum(fixed) > len(shuffled):
            raise ValueError(f"counts {list(counts)} ask for {sum(fixed)} patients but there are {len(shuffled)}")
        resolved = [len(shuffled) - sum(fixed) if r else int(c) for c, r in zip(counts, is_rest)]  # type: ignore
        bounds = [0, *(int(b) for b in np.cumsum(resolved))]

    parts: list[list[Any]] = []
    for k in range(len(bounds) - 1):
        idx = sorted(i for p in shuffled[bounds[k]:bounds[k + 1]] for i in groups[p])
        parts.append([items[i] for i in idx])
    return parts


def split_datalist(
    items: Sequence[Mapping[str, Any]],
    fractions: Mapping[str, float] | Sequence[float] = (0.8, 0.2),
    names: Sequence[str] = ("training", "validation"),
    seed: int = 0,
    patient_key: str = "patient",
) -> dict[str, list[Any]]:
    """:func:`patient_split` by fractions, returned as a datalist section dictionary (``{name: items}``).

    ``fractions`` may be a mapping ``{section: fraction}`` (then ``names`` is ignored).
    """
    if isinstance(fractions, Mapping):
        names, fractions = list(fractions.keys()), list(fractions.values())
    if len(names) != len(fractions):
        raise ValueError(f"{len(names)} names for {len(fractions)} fractions")
    parts = patient_split(items, fractions=list(fractions), seed=seed, patient_key=patient_key)
    return dict(zip(names, parts))


def _fold_indices(items: Sequence[Mapping[str, Any]], num_folds: int, seed: int, patient_key: str) -> list[list[int]]:
    """Sorted item indices of each fold of :func:`patient_folds`."""
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    groups = group_by_patient(items, patient_key)
    patients = list(groups)
    if len(patients) < num_folds:
        raise ValueError(f"{num_folds} folds need at least {num_folds} patients, there are {len(patients)}")
    shuffled = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    shuffled.sort(key=lambda p: -len(groups[p]))  # stable: the shuffle orders patients of one size
    members: list[list[int]] = [[] for _ in range(num_folds)]
    for p in shuffled:
        k = min(range(num_folds), key=lambda j: (len(members[j]), j))
        members[k].extend(groups[p])
    return [sorted(m) for m in members]


def patient_folds(
    items: Sequence[Mapping[str, Any]], num_folds: int, seed: int = 0, patient_key: str = "patient"
) -> list[list[Any]]:
    """Partition ``items`` into ``num_folds`` cross-validation folds with no patient in two folds.

    Patients are sorted by id and shuffled with ``numpy.random.default_rng(seed)``; then, largest first (a stable sort
    of the shuffled order by item count), each patient joins the fold with the fewest items so far (the lowest index
    on a tie). Fold sizes so differ by at most the largest patient's item count. Inside each fold the items keep
    their input order. Every item is in exactly one fold.

    Raises:
        ValueError: when ``num_folds < 2`` or there are fewer patients than folds.
    """
    return [[items[i] for i in fold] for fold in _fold_indices(items, num_folds, seed, patient_key)]


def crossval_datalist(
    items: Sequence[Mapping[str, Any]],
    fold: int,
    num_folds: int,
    validation_fraction: float = 0.25,
    seed: int = 0,
    patient_key: str = "patient",
) -> dict[str, list[Any]]:
    """The datalist of one cross-validation fold: ``test`` is fold ``fold`` of :func:`patient_folds`, and the other
    folds' patients are split by :func:`patient_split` into ``training`` and ``validation`` (``validation_fraction``
    of their items, for the checkpoint choice and the plateau rule). Over the folds every item is tested exactly
    once, by a network that saw none of its patient's images.

    Raises:
        ValueError: for a fold outside ``[0, num_folds)`` or a fraction outside ``(0, 1)``.
    """
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    folds = _fold_indices(items, num_folds, seed, patient_key)
    tested = set(folds[fold])
    rest = [it for i, it in enumerate(items) if i not in tested]
    training, validation = patient_split(rest, fractions=[1 - validation_fraction, validation_fraction], seed=seed,
                                         patient_key=patient_key)
    return {"training": training, "validation": validation, "test": [items[i] for i in folds[fold]]}


def subsample_order(
    items: Sequence[Mapping[str, Any]], seed: int = 0, patient_key: str | None = "patient"
) -> list[int]:
    """A deterministic ordering of ``items`` (indices) whose prefixes are the low-data subsets.

    With ``patient_key``, patients are shuffled and visited round-robin (one item of each patient, then a second of
    each, ...), so a prefix of length ``n`` spreads over as many patients as possible. With ``patient_key=None``
    the items are simply permuted.
    """
    rng = np.random.default_rng(seed)
    if patient_key is None:
        return [int(i) for i in rng.permutation(len(items))]
    groups = group_by_patient(items, patient_key)
    patients = list(groups)
    pat_order = rng.permutation(len(patients))
    # shuffle inside each patient too, with one draw per patient in the sorted patient order (deterministic)
    inner = {p: [groups[p][j] for j in rng.permutation(len(groups[p]))] for p in patients}
    order: list[int] = []
    depth = 0
    while len(order) < len(items):
        for pi in pat_order:
            lst = inner[patients[pi]]
            if depth < len(lst):
                order.append(lst[depth])
        depth += 1
    return order


def subsample(
    items: Sequence[Any], n: int | None, seed: int = 0, patient_key: str | None = "patient"
) -> list[Any]:
    """``n`` items of ``items`` for the low-data protocol, deterministic and nested.

    For a fixed ``items`` and ``seed``, ``subsample(items, 2, s)`` is contained in ``subsample(items, 4, s)``, which
    is contained in ``subsample(items, 8, s)``, ...: each subset is a prefix of :func:`subsample_order`. The result
    keeps the input order. ``n=None`` (or ``n >= len(items)``) returns all items.

    Raises:
        ValueError: when ``n`` is negative.
    """
    if n is None or n >= len(items):
        return list(items)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    key = patient_key if items and isinstance(items[0], Mapping) else None
    chosen = sorted(subsample_order(items, seed, key)[:n])
    return [items[i] for i in chosen]

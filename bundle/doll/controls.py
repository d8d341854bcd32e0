"""Controls for the DoLL pre-training: which labels the segmenter is pre-trained on (``configs/pretrain.yaml``
``pretrain_labels``), so that a fine-tuning comparison can tell what the DoLL labels themselves buy.

- ``doll``: the DoLL of each image (the method).
- ``shuffled``: the DoLL of *another* image of the same split (a seeded random cyclic permutation, Sattolo's
  algorithm, so no image keeps its own labels): the same label statistics (every observation's count, every mask's
  shape) in the wrong place. Pre-training that helps as much with these labels is a generic "learn to segment blobs"
  effect, not diagnosis-oriented localisation.
- ``oracle``: the true lesion masks of the phantom (items with ``lesion``), the ceiling of what localisation labels
  can give. Real datasets have no true lesions: asking for it there is an error naming the datalist item.

Fine-tuning takes these checkpoints as inits ``doll``, ``doll_shuffled`` and ``doll_oracle``
(``bundle.tasks.INIT_CHOICES``); the pre-training writes each under ``<models_dir>/pretrain/<arch>_<labels>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..utils import BundleInputError

#: ``pretrain_labels`` of configs/pretrain.yaml
PRETRAIN_LABELS: tuple[str, ...] = ("doll", "shuffled", "oracle")


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded random cyclic permutation of ``range(n)`` (Sattolo's algorithm): ``perm[i] != i`` for every ``i``
    when ``n >= 2``."""
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: never a fixed point
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def control_items(items: Sequence[Mapping[str, Any]], labels: str = "doll", seed: int = 0) -> list[dict[str, Any]]:
    """The pre-training items of one split with the labels of control ``labels`` (see the module docstring).

    Raises:
        ValueError: unknown ``labels``, or ``shuffled`` with fewer than two items.
        BundleInputError: ``oracle`` on an item without a true lesion mask (names the item's image).
    """
    out = [dict(it) for it in items]
    if labels == "doll":
        return out
    if labels == "shuffled":
        if len(out) < 2:
            raise ValueError("the shuffled control needs at least two items per split")
        perm = derangement(len(out), seed)
        for it, src in zip(out, perm):
            donor = items[int(src)]
            it["label"], it["label_from"] = donor["label"], donor["image"]
            if "targets" in donor:
                it["targets"] = donor["targets"]
        return out
    if labels == "oracle":
        for it in out:
            if not it.get("lesion"):
                raise BundleInputError(it.get("image", "?"), "no true lesion mask ('lesion') for the oracle "
                                                             "pre-training control (phantom data only)")
            it["label"] = it["lesion"]
        return out
    raise ValueError(f"unknown pretrain_labels {labels!r}; choose one of {', '.join(PRETRAIN_LABELS)}")


def pretrain_items(datalist: str, section: str, labels: str = "doll", seed: int = 0,
                   hint: str = "") -> list[dict[str, Any]]:
    """The items of ``section`` of the DoLL datalist with the labels of control ``labels`` (:func:`control_items`)."""
    from ..tasks import load_section

    return control_items(load_section(datalist, section, hint), labels, seed)

"""Controls for the DoLL pre-training: which labels the segmenter is pre-trained on (``configs/pretrain.yaml``
``pretrain_labels``), so that a fine-tuning comparison can tell what the DoLL labels themselves buy.

- ``doll``: the DoLL of each image (the method).
- ``shuffled``: the DoLL of *another* image of the same split (a seeded random cyclic permutation, Sattolo's
  algorithm, so no image keeps its own labels): the same label statistics (every observation's count, every mask's
  shape) in the wrong place. Pre-training that helps as much with these labels is a generic "learn to segment blobs"
  effect, not diagnosis-oriented localisation.
- ``oracle``: the true lesion masks of the phantom (items with ``lesion``), the ceiling of what localisation labels
  can give. Real datasets have no true lesions: asking for it there is an error naming the datalist item.
- ``ig_single``: labels from the IG of one classifier (no boosting across classifiers), and ``gradcam``: labels from
  that classifier's Grad-CAM instead of IG; both through the same targets and post-processing as the DoLL. They are
  DoLL data sets of their own, written by ``configs/generate_doll.yaml --doll_labels ig_single|gradcam`` under
  ``<data_root>/doll_<labels>`` with the datalist ``doll_<labels>.json`` (:func:`doll_datalist_name`); they tell
  whether IG and the boosting matter, or any explanation would do.

Fine-tuning takes these checkpoints as inits ``doll``, ``doll_shuffled``, ``doll_oracle``, ``doll_ig_single`` and
``doll_gradcam`` (``bundle.tasks.INIT_CHOICES``); the pre-training writes each under
``<models_dir>/pretrain/<arch>_<labels>``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..utils import BundleInputError

#: ``pretrain_labels`` of configs/pretrain.yaml
PRETRAIN_LABELS: tuple[str, ...] = ("doll", "shuffled", "oracle", "ig_single", "gradcam")
#: the label sets that are generated DoLL data sets of their own (``configs/generate_doll.yaml --doll_labels``)
GENERATED_LABELS: tuple[str, ...] = ("doll", "ig_single", "gradcam")


def init_pretrain_labels(init: str) -> str | None:
    """The pre-training labels a fine-tuning ``init`` starts from: ``doll`` for ``doll``, ``<labels>`` for a
    control's ``doll_<labels>`` (one of :data:`PRETRAIN_LABELS`), ``None`` for an init without DoLL pre-training
    (``scratch``, ``classifier_encoder``, ``external``)."""
    labels = "doll" if init == "doll" else init[len("doll_"):] if init.startswith("doll_") else ""
    return labels if labels in PRETRAIN_LABELS else None


def doll_datalist_name(labels: str = "doll") -> str:
    """The datalist file (under ``datalist_dir``) that holds the labels of control ``labels``: ``doll.json`` for the
    DoLL and its rearrangements (shuffled, oracle), ``doll_<labels>.json`` for a generated control."""
    if labels not in PRETRAIN_LABELS:
        raise ValueError(f"unknown pretrain_labels {labels!r}; choose one of {', '.join(PRETRAIN_LABELS)}")
    return f"doll_{labels}.json" if labels in GENERATED_LABELS[1:] else "doll.json"


def doll_folder_name(labels: str = "doll") -> str:
    """The folder (under ``data_root``) of generated label set ``labels`` (``doll``, ``doll_ig_single``, ...)."""
    if labels not in GENERATED_LABELS:
        raise ValueError(f"doll_labels {labels!r} is not generated; choose one of {', '.join(GENERATED_LABELS)}")
    return "doll" if labels == "doll" else f"doll_{labels}"


def explainer_of(labels: str = "doll") -> str:
    """The explainer (``IGSettings.explainer``) of generated label set ``labels``: ``gradcam`` or ``ig``."""
    doll_folder_name(labels)  # validates
    return "gradcam" if labels == "gradcam" else "ig"


def gradcam_layer_for(explainer: str, classifier_dir: str, classifier_names: Sequence[str]) -> str | None:
    """The Grad-CAM layer of the first classifier when ``explainer`` (``IGSettings.explainer``: ``ig``, ``gradcam``,
    ``ig_gradcam``) uses Grad-CAM (read from its checkpoint folder,
    :func:`bundle.networks.classifiers.gradcam_layer_of`), else ``None``."""
    if explainer == "ig":
        return None
    from ..networks.classifiers import gradcam_layer_of

    return gradcam_layer_of(os.path.join(classifier_dir, classifier_names[0]))


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
    if labels in GENERATED_LABELS:  # the labels as generated (their own datalist)
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

"""The vocabulary of the segmentation tasks and runs, shared by the configs, the runners and the reporting:

- **Tasks** (:data:`TASKS`, :func:`task_spec`): the datalist file, the output structures and how SCR's five structure
  masks merge into them (``union_groups`` of :class:`bundle.transforms.LoadMaskd`).
- **Low-data protocol** (:func:`parse_train_size`, :func:`subset_items`, :func:`run_name`, :func:`arch_task`,
  :func:`epochs_for`): a nested, seeded subset of the training split (:func:`bundle.data.splits.subsample`), the
  name of the run it gives (with its architecture when not the default), the analysis label of that architecture's
  runs and the number of epochs.
- **Initialisations** (:data:`INIT_CHOICES`).

A light module (no torch): the reporting and the runners import it without the workflows.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .constants import TASK_CHANNELS
from .utils import BundleInputError, PathLike, load_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """A downstream segmentation task.

    Attributes:
        name: the ``task`` id of ``configs/train.yaml``.
        datalist: file name under ``datalist_dir`` (written by :func:`bundle.data.datalists.build_all_datalists`).
        structures: names of the output channels.
        union_groups: for SCR's list of five masks (:data:`bundle.constants.SCR_STRUCTURES` order), the mask indices
            merged into each output channel; ``None`` when the label is one mask file per image.
    """

    name: str
    datalist: str
    structures: tuple[str, ...]
    union_groups: tuple[tuple[int, ...], ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.structures)

    def union_groups_list(self) -> list[list[int]] | None:
        """``union_groups`` as lists (what :class:`~bundle.transforms.LoadMaskd` takes), or ``None``."""
        return None if self.union_groups is None else [list(g) for g in self.union_groups]


#: Downstream tasks of ``configs/train.yaml`` (``--task``). SCR: left/right lung -> lungs, heart, left/right clavicle
#: -> clavicles (SCR_STRUCTURES order: left lung, right lung, heart, left clavicle, right clavicle).
TASKS: dict[str, TaskSpec] = {
    "scr": TaskSpec("scr", "scr.json", TASK_CHANNELS["scr"], ((0, 1), (2,), (3, 4))),
    "lungs": TaskSpec("lungs", "scr.json", TASK_CHANNELS["lungs"], ((0, 1),)),
    "heart": TaskSpec("heart", "scr.json", TASK_CHANNELS["heart"], ((2,),)),
    "clavicles": TaskSpec("clavicles", "scr.json", TASK_CHANNELS["clavicles"], ((3, 4),)),
    "infection": TaskSpec("infection", "qata.json", TASK_CHANNELS["infection"]),
    "real_lungs": TaskSpec("real_lungs", "real_lungs.json", TASK_CHANNELS["real_lungs"]),
}


def task_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task`` (a key of :data:`TASKS`).

    Raises:
        ValueError: unknown task (the message lists the known ones).
    """
    spec = TASKS.get(str(task).lower())
    if spec is None:
        raise ValueError(f"unknown segmentation task {task!r}; choose one of {', '.join(TASKS)}")
    return spec


def parse_train_size(train_size: int | str | None) -> int | None:
    """The number of training images of the low-data protocol: an int (or its string), or ``None`` for "all"
    (``"all"``, ``None``, ``-1``).

    Raises:
        ValueError: zero, a negative number other than -1, or an unreadable value.
    """
    if train_size is None or (isinstance(train_size, str) and train_size.strip().lower() in ("all", "none", "")):
        return None
    try:
        n = int(train_size)
    except (TypeError, ValueError):
        raise ValueError(f"train_size must be a positive integer or 'all', got {train_size!r}") from None
    if n == -1:
        return None
    if n < 1:
        raise ValueError(f"train_size must be a positive integer or 'all', got {train_size!r}")
    return n


def subset_items(items: Sequence[Mapping[str, Any]], train_size: int | str | None, seed: int = 0,
                 patient_key: str | None = "patient") -> list[dict[str, Any]]:
    """``train_size`` items of ``items`` (``"all"``: every item): nested and seeded (the subset of 2 is inside the
    subset of 4 for the same ``seed``), spread over as many patients as possible
    (:func:`bundle.data.splits.subsample`). Asking for more items than there are returns all of them (warned)."""
    from .data.splits import subsample

    n = parse_train_size(train_size)
    if n is not None and n > len(items):
        logger.warning("train_size %d > %d training items: using all of them", n, len(items))
    out = [dict(it) for it in subsample(list(items), n, seed=int(seed), patient_key=patient_key)]
    if not out:
        raise ValueError("the training subset is empty (no training items in the datalist?)")
    logger.info("training subset: %d of %d items (train_size=%s, seed=%s)", len(out), len(items), train_size, seed)
    return out


def load_section(path: PathLike, section: str, hint: str = "") -> list[dict[str, Any]]:
    """Items of one section of a datalist JSON file.

    Raises:
        BundleInputError: missing/unreadable file, or no such section (the message names the file; ``hint`` is
            appended, e.g. which stage writes the file).
    """
    if not os.path.isfile(path):
        raise BundleInputError(path, "datalist not found" + (f" ({hint})" if hint else ""))
    obj = load_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get(section), list):
        raise BundleInputError(path, f"datalist has no '{section}' list" + (f" ({hint})" if hint else ""))
    return [dict(it) for it in obj[section]]


def has_key(items: Sequence[Mapping[str, Any]], key: str) -> bool:
    """Whether every item has ``key`` (and there is at least one item)."""
    return len(items) > 0 and all(key in it for it in items)


#: the segmenter architecture of ``configs/train.yaml`` ``seg_arch`` whose runs carry no architecture in their names
DEFAULT_SEG_ARCH = "segresnet"


def run_name(task: str, init: str, train_size: int | str | None, seed: int, mode: str = "full",
             arch: str | None = DEFAULT_SEG_ARCH) -> str:
    """Name of one fine-tuning run: ``<task>_<init>_n<size|all>_seed<seed>[_<mode>][_<arch>]`` (checkpoint folder,
    output folder and MLflow run name); the architecture is named only when it is not :data:`DEFAULT_SEG_ARCH`, so a
    UNet run never overwrites the SegResNet run of the same cell."""
    n = parse_train_size(train_size)
    name = f"{task}_{init}_n{'all' if n is None else n}_seed{int(seed)}"
    if str(mode) != "full":
        name = f"{name}_{mode}"
    return name if arch in (None, "", DEFAULT_SEG_ARCH) else f"{name}_{arch}"


def arch_task(task: str, arch: str | None = DEFAULT_SEG_ARCH) -> str:
    """The task label of the analysis for runs of one architecture: ``task`` for :data:`DEFAULT_SEG_ARCH` (or none),
    ``<task>:<arch>`` otherwise, so that each architecture's inits are compared among themselves (DoLL-UNet against
    scratch-UNet) and get their own tables, curves and panels."""
    return task if arch in (None, "", DEFAULT_SEG_ARCH) or str(arch) == "nan" else f"{task}:{arch}"


#: ``init`` ids of ``configs/train.yaml`` -> strategies of :func:`bundle.networks.transfer.initialise_segmenter`.
INIT_CHOICES: dict[str, str] = {"doll": "doll", "scratch": "random", "classifier_encoder": "classifier",
                                "external": "external",
                                # pre-trained on control labels (bundle.doll.controls): loaded as the DoLL checkpoint
                                "doll_shuffled": "doll", "doll_oracle": "doll", "doll_ig_single": "doll",
                                "doll_gradcam": "doll"}


def epochs_for(num_iterations: int, epoch_length: int) -> int:
    """Number of epochs of ``epoch_length`` steps that cover ``num_iterations`` optimiser steps (at least 1)."""
    return max(1, math.ceil(int(num_iterations) / max(1, int(epoch_length))))


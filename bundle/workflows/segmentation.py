"""Pieces of the segmentation stages that the configs wire: DoLL pre-training (``configs/pretrain.yaml``), fine-tuning
(``configs/train.yaml``), evaluation (``configs/evaluate.yaml``) and the low-data sweep (``scripts/sweep.py``).

- **Tasks** (:data:`TASKS`, :func:`task_spec`): the datalist file, the output structures and how SCR's five structure
  masks merge into them (``union_groups`` of :class:`bundle.data.transforms.LoadMaskd`).
- **Low-data protocol** (:func:`parse_train_size`, :func:`subset_items`, :func:`run_name`): a nested, seeded subset
  of the training split (:func:`bundle.data.splits.subsample`) and the name of the run it gives.
- **Initialisation and fine-tuning** (:data:`INIT_CHOICES`, :func:`build_finetune_network`, :class:`FinetuneInit`):
  ``doll`` / ``scratch`` / ``classifier_encoder`` / ``external`` weights, a new head, then the fine-tuning mode
  (``full`` / ``warmup`` / ``adapter``); the :class:`~bundle.networks.transfer.TransferReport` is logged and saved.
- **Transforms**: :class:`RandAffineJointd` (the fast joint image/mask affine augmentation) and
  :class:`ResizeLiked` (predictions back to the label's original size for evaluation).
- **Metrics and handlers**: :class:`MultiLabelDice` (mean and per-structure Dice of sigmoid outputs),
  :class:`SegmentationCSVWriter` (per-image Dice/IoU/HD95 rows per structure with the run's tags, and the
  predicted masks as PNG), :class:`ResumableTraining` (resume that honours a larger ``max_epochs``),
  :class:`FinetuneHandler` (the fine-tuning mode's warm-up handler as a config component), :class:`NullHandler`.
- **Oracle DoLL** (:func:`write_oracle_doll`): a DoLL datalist made from the phantom's true lesion masks, so the
  segmentation stages can run (tests, measurements) before the classifier and DoLL stages have.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from torch import nn

from ..constants import OBSERVATIONS, TASK_CHANNELS, slug
from ..utils import BundleInputError, PathLike, atomic_write_json, atomic_write_text, load_json
from .checkpoint import ResumableCheckpoint

__all__ = [
    "TASKS",
    "INIT_CHOICES",
    "TaskSpec",
    "task_spec",
    "parse_train_size",
    "subset_items",
    "load_section",
    "has_key",
    "run_name",
    "build_finetune_network",
    "FinetuneInit",
    "ResizeLiked",
    "RandAffineJointd",
    "MultiLabelDice",
    "SegmentationCSVWriter",
    "ResumableTraining",
    "NullHandler",
    "FinetuneHandler",
    "write_oracle_doll",
    "epochs_for",
    "per_channel_dice",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------------------------
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
        """``union_groups`` as lists (what :class:`~bundle.data.transforms.LoadMaskd` takes), or ``None``."""
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


# --------------------------------------------------------------------------------------------------------------------
# low-data protocol
# --------------------------------------------------------------------------------------------------------------------
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
    from ..data.splits import subsample

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


def run_name(task: str, init: str, train_size: int | str | None, seed: int, mode: str = "full") -> str:
    """Name of one fine-tuning run: ``<task>_<init>_n<size|all>_seed<seed>[_<mode>]`` (checkpoint folder, output
    folder and MLflow run name)."""
    n = parse_train_size(train_size)
    name = f"{task}_{init}_n{'all' if n is None else n}_seed{int(seed)}"
    return name if str(mode) == "full" else f"{name}_{mode}"


# --------------------------------------------------------------------------------------------------------------------
# initialisation and fine-tuning
# --------------------------------------------------------------------------------------------------------------------
#: ``init`` ids of ``configs/train.yaml`` -> strategies of :func:`bundle.networks.transfer.initialise_segmenter`.
INIT_CHOICES: dict[str, str] = {"doll": "doll", "scratch": "random", "classifier_encoder": "classifier",
                                "external": "external"}


def build_finetune_network(arch: str, out_channels: int, mode: str = "full", in_channels: int = 1,
                           adapter_reduction: int = 4, network_kwargs: Mapping[str, Any] | None = None,
                           **kwargs: Any) -> nn.Module:
    """The network as it is saved: :func:`bundle.networks.build_segmenter` with ``out_channels`` outputs, plus the
    residual adapters in ``adapter`` mode (so a checkpoint of any mode loads into this network).

    Args:
        arch: ``segresnet`` or ``unet``.
        out_channels: 14 for DoLL pre-training; the task's structures for fine-tuning.
        mode: the fine-tuning mode (``adapter`` adds the adapters).
        in_channels: 1 for radiographs.
        adapter_reduction: bottleneck ratio of the adapters.
        network_kwargs, kwargs: arguments of the MONAI network (e.g. ``{"init_filters": 16}``), the config-friendly
            mapping and keywords alike.
    """
    from ..networks.finetune import add_adapters
    from ..networks.segmentation import build_segmenter

    net = build_segmenter(arch, in_channels=in_channels, out_channels=int(out_channels),
                          **{**dict(network_kwargs or {}), **kwargs})
    if str(mode).lower() == "adapter":
        add_adapters(net, reduction=adapter_reduction)
    return net


class NullHandler:
    """A handler that does nothing (stands in for an optional handler in a config's handler list)."""

    def attach(self, engine: Engine) -> None:
        return None


class FinetuneHandler:
    """Attach the fine-tuning mode's handler of a :class:`FinetuneInit` (the encoder warm-up in ``warmup`` mode;
    nothing otherwise). A config component (a dict with ``_target_``), so tools that edit handler lists, such as
    MONAI Label's bundle train task, can read it; attach it after the checkpoint handler so a resumed run knows its
    epoch."""

    def __init__(self, finetune: "FinetuneInit"):
        self.finetune = finetune

    def attach(self, engine: Engine) -> None:
        self.finetune.handler.attach(engine)


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


class FinetuneInit:
    """Initialise a downstream network and prepare it for a fine-tuning mode (instantiated by ``configs/train.yaml``).

    Steps: (1) load weights by ``init``: ``doll`` (a DoLL pre-trained segmenter,
    :func:`~bundle.networks.transfer.load_pretrained`), ``classifier_encoder`` (the encoder of a
    ``segresnet_encoder`` classifier, :func:`~bundle.networks.transfer.load_encoder_from_classifier`), ``external``
    (any local state-dict file, :func:`~bundle.networks.transfer.load_external`) or ``scratch`` (nothing); with
    ``reset_head`` the head is never loaded (the downstream classes are new), so it keeps the fresh initialisation
    of ``network`` (seeded by ``set_determinism``); (2) move to ``device``; (3)
    :func:`~bundle.networks.finetune.prepare_finetune` (``full`` / ``warmup`` / ``adapter``). The
    :class:`~bundle.networks.transfer.TransferReport` (loaded / skipped / re-initialised tensors) is logged and
    written to ``report_path`` as JSON (rank 0 only).

    Args:
        network: the downstream network (:func:`build_finetune_network`), built with the task's output channels.
        init: ``doll``, ``scratch``, ``classifier_encoder`` or ``external``.
        checkpoint: the weights file of ``init`` (ignored for ``scratch``).
        mode: ``full``, ``warmup`` or ``adapter``.
        warmup_epochs: ``warmup`` mode: epochs with a frozen encoder.
        encoder_lr: optional learning rate of the encoder's param group (``full``/``warmup``).
        adapter_reduction: ``adapter`` mode: bottleneck ratio.
        reset_head: never load the head (``doll``/``external``).
        strict_shapes: ``doll``: a shape mismatch outside the head is an error (another configuration).
        min_fraction: fail when fewer than this fraction of the non-head tensors load (``doll``/``external``).
        output_bias_prior: start the (new) head's output logits at ``logit(prior)`` (one fraction, or one per
            structure; :func:`bundle.networks.segmentation.set_output_bias`), so that no sigmoid channel of a small
            structure is driven to all-negative in the first steps; ``None`` keeps MONAI's initialisation. Only
            applied to a head that was not loaded (``reset_head`` or ``scratch``).
        report_path: JSON file for the report (``None``: not written).
        device: where the network goes.

    Attributes:
        network: the prepared network (on ``device``); ``params``: the optimiser's parameters (or param groups);
        handler: the warm-up handler (``warmup`` mode) or a :class:`NullHandler`; ``report``: the
        TransferReport (``None`` for ``scratch``); ``summary``: the fine-tuning summary.

    Raises:
        ValueError: unknown ``init``/``mode``, or no checkpoint for an ``init`` that needs one.
        BundleInputError: missing checkpoint, or a checkpoint that does not match the network (nothing matched, a
            non-head shape mismatch, too few tensors): the message starts with the file's path.
    """

    def __init__(self, network: nn.Module, init: str = "scratch", checkpoint: PathLike | None = None,
                 mode: str = "full", warmup_epochs: int = 0, encoder_lr: float | None = None,
                 adapter_reduction: int = 4, reset_head: bool = True, strict_shapes: bool = True,
                 min_fraction: float = 0.5, output_bias_prior: float | Sequence[float] | None = None,
                 report_path: PathLike | None = None, device: str | torch.device | None = None):
        from ..networks.finetune import prepare_finetune
        from ..networks.segmentation import head_module_names
        from ..networks.transfer import load_encoder_from_classifier, load_external, load_pretrained

        name = str(init).lower()
        if name not in INIT_CHOICES:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INIT_CHOICES)}")
        self.init = name
        self.mode = str(mode).lower()
        self.checkpoint = None if name == "scratch" or not checkpoint else os.fspath(checkpoint)
        self.report = None
        if name != "scratch":
            if not self.checkpoint:
                what = "--external_weights" if name == "external" else "--init_checkpoint"
                raise ValueError(f"init={name!r} needs a weights file: set {what} to a local checkpoint path")
            if not os.path.isfile(self.checkpoint):
                hints = {"doll": "run configs/pretrain.yaml first, or set --init_checkpoint",
                         "classifier_encoder": "train a segresnet_encoder classifier (configs/train_classifier.yaml "
                                               "--classifier_arch segresnet_encoder) or set --init_checkpoint",
                         "external": "set --external_weights to a local state-dict file"}
                raise BundleInputError(self.checkpoint, f"{name} checkpoint not found ({hints[name]})")
            head = head_module_names(network) if reset_head else []
            if name == "doll":
                self.report = load_pretrained(network, self.checkpoint, exclude=head, strict_shapes=strict_shapes,
                                              min_fraction=min_fraction)
            elif name == "classifier_encoder":
                self.report = load_encoder_from_classifier(network, self.checkpoint)
            else:
                self.report = load_external(network, self.checkpoint, exclude=head, min_fraction=min_fraction)
        else:
            logger.info("init=scratch: random initialisation of %s", type(network).__name__)
        self.output_bias = None
        if isinstance(output_bias_prior, str):  # a command-line override: "null"/"none"/"" switch it off
            text = output_bias_prior.strip().lower()
            output_bias_prior = None if text in ("", "none", "null") else float(text)
        if output_bias_prior is not None and (reset_head or name == "scratch"):
            from ..networks.segmentation import set_output_bias

            self.output_bias = set_output_bias(network, output_bias_prior)
        if device is not None:
            network = network.to(device)
        self.setup = prepare_finetune(network, self.mode, warmup_epochs=int(warmup_epochs), encoder_lr=encoder_lr,
                                      adapter_reduction=int(adapter_reduction))
        self.network = network
        self.summary = self.setup.summary
        if report_path is not None and _is_rank0():
            atomic_write_json(report_path, self.as_dict())

    @property
    def params(self) -> list[Any]:
        """The optimiser's parameters (a list, or param groups when ``encoder_lr`` is set)."""
        return self.setup.params

    @property
    def handler(self) -> Any:
        """The :class:`~bundle.networks.finetune.EncoderWarmupHandler` (``warmup`` mode) or a :class:`NullHandler`."""
        return self.setup.handler if self.setup.handler is not None else NullHandler()

    @property
    def tracking_params(self) -> dict[str, Any]:
        """Flat params for MLflow: init, checkpoint, mode, trainable/frozen counts and the transfer counts."""
        out: dict[str, Any] = {"init": self.init, "init_checkpoint": self.checkpoint or "",
                               "finetune_mode": self.mode, "trainable_params": self.summary.trainable,
                               "frozen_params": self.summary.frozen}
        if self.output_bias is not None:
            out["output_bias"] = ",".join(f"{b:.3f}" for b in self.output_bias)
        if self.report is not None:
            scalars = self.report.scalars()
            out.update({k: (int(v) if float(v).is_integer() else round(v, 4)) for k, v in scalars.items()})
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable record: init, checkpoint, the full transfer report and the fine-tuning summary."""
        return {"init": self.init, "checkpoint": self.checkpoint, "mode": self.mode,
                "report": None if self.report is None else self.report.as_dict(),
                "reinitialised": None if self.report is None else list(self.report.reinitialised),
                "finetune": self.summary.as_dict()}


# --------------------------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------------------------
class ResizeLiked(MapTransform):
    """Resize ``keys`` (channel-first ``(C, h, w)``) to the spatial size of ``ref_key`` (e.g. predictions back to the
    label's original size for evaluation). Use on logits or probabilities, before thresholding.

    Args:
        keys: what to resize (e.g. ``pred``).
        ref_key: the item whose last two dimensions give the size (e.g. ``label``).
        mode: ``bilinear`` (default) or ``nearest`` (``torch.nn.functional.interpolate`` modes).
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "label", mode: str = "bilinear",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        size = tuple(d[self.ref_key].shape[-2:])
        for key in self.key_iterator(d):
            x = d[key]
            if tuple(x.shape[-2:]) == size:
                continue
            t = torch.as_tensor(x).float()[None]
            kwargs = {"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
            out = torch.nn.functional.interpolate(t, size=size, mode=self.mode, **kwargs)[0]
            d[key] = out.as_tensor() if hasattr(out, "as_tensor") else out
        return d


class RandAffineJointd(RandomizableTransform, MapTransform):
    """Random 2-D rotation, scaling and translation of several keys with **one** sampling grid, in float32 with
    ``torch.nn.functional.grid_sample``: the augmentation of the segmentation stages (image and masks move together).

    The same family of transforms as :class:`monai.transforms.RandAffined` with ``rotate_range``, ``scale_range`` and
    ``translate_range`` (no shear), about 5-10x cheaper on the CPU for 2-D images (MONAI's resamples in float64 and
    rebuilds the grid per key): at 128 x 128 and batch 8 MONAI's version cost about a fifth of a SegResNet training
    step on 2 cores, which the training loop would wait for (``scripts/bench_train.py``).

    Args:
        keys: channel-first ``(C, H, W)`` tensors of the same spatial size.
        prob: probability of transforming an item.
        rotate_range: angle drawn from ``U(-rotate_range, rotate_range)`` radians.
        scale_range: per-axis scale ``1 + U(-s, s)``: a number or ``(s_rows, s_cols)``.
        translate_range: per-axis shift ``U(-t, t)`` pixels: a number or ``(t_rows, t_cols)``.
        mode: ``bilinear`` / ``nearest`` / ``bicubic``, one or one per key (``nearest`` for masks).
        padding_mode: ``zeros`` / ``border`` / ``reflection``, one or one per key.

    Outputs keep each input's dtype (integer masks sampled with ``nearest`` stay exact); metadata is dropped.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.1, rotate_range: float = 0.0,
                 scale_range: float | Sequence[float] = 0.0, translate_range: float | Sequence[float] = 0.0,
                 mode: str | Sequence[str] = "bilinear", padding_mode: str | Sequence[str] = "border",
                 allow_missing_keys: bool = False):
        from monai.utils import ensure_tuple_rep

        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.rotate_range = float(rotate_range)
        self.scale_range = tuple(float(v) for v in ensure_tuple_rep(scale_range, 2))
        self.translate_range = tuple(float(v) for v in ensure_tuple_rep(translate_range, 2))
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        self._params = (0.0, 1.0, 1.0, 0.0, 0.0)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        angle = self.R.uniform(-self.rotate_range, self.rotate_range)
        s_rows, s_cols = (1.0 + self.R.uniform(-s, s) for s in self.scale_range)
        t_rows, t_cols = (self.R.uniform(-t, t) for t in self.translate_range)
        self._params = (float(angle), float(s_rows), float(s_cols), float(t_rows), float(t_cols))

    def theta(self, height: int, width: int) -> torch.Tensor:
        """The ``(1, 2, 3)`` matrix of ``affine_grid`` (normalised coordinates) for the drawn pixel-space affine."""
        angle, s_rows, s_cols, t_rows, t_cols = self._params
        c, s = math.cos(angle), math.sin(angle)
        lin = np.array([[c * s_cols, -s * s_rows], [s * s_cols, c * s_rows]])  # (x, y) pixel axes
        d = np.diag([2.0 / width, 2.0 / height])
        theta = np.zeros((2, 3))
        theta[:, :2] = d @ lin @ np.linalg.inv(d)
        theta[:, 2] = d @ np.array([t_cols, t_rows])
        return torch.as_tensor(theta, dtype=torch.float32)[None]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        grid = None
        for key, mode, padding in self.key_iterator(d, self.mode, self.padding_mode):
            x = d[key]
            x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
            if grid is None:
                grid = torch.nn.functional.affine_grid(self.theta(*x.shape[-2:]), [1, 1, *x.shape[-2:]],
                                                       align_corners=False)
            out = torch.nn.functional.grid_sample(x[None].float(), grid, mode=mode, padding_mode=padding,
                                                  align_corners=False)[0]
            if not x.is_floating_point():
                out = out.round().to(x.dtype)
            elif out.dtype != x.dtype:
                out = out.to(x.dtype)
            d[key] = out
        return d


# --------------------------------------------------------------------------------------------------------------------
# metrics and handlers
# --------------------------------------------------------------------------------------------------------------------
def _stack(x: Any) -> torch.Tensor:
    if isinstance(x, (list, tuple)):  # a decollated batch
        return torch.stack([torch.as_tensor(v) for v in x])
    return torch.as_tensor(x)


def per_channel_dice(pred: torch.Tensor, ref: torch.Tensor, ignore_empty: bool = True) -> torch.Tensor:
    """Dice per image and channel of binary ``(B, C, H, W)`` tensors (float64 ``(B, C)``): 1.0 when both are empty,
    ``NaN`` where the reference is empty when ``ignore_empty``."""
    p, r = pred > 0.5, ref > 0.5
    dims = tuple(range(2, p.dim()))
    inter = (p & r).sum(dims).double()
    ref_area = r.sum(dims).double()
    total = p.sum(dims).double() + ref_area
    d = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    if ignore_empty:
        d = torch.where(ref_area > 0, d, torch.full_like(d, float("nan")))
    return d


class MultiLabelDice(Metric):
    """Mean Dice of multi-label binary predictions ``(B, C, H, W)`` (threshold the sigmoid first, e.g. with
    ``AsDiscreted(threshold=0.5)``), averaged over every (image, channel) pair that counts; the per-channel means
    are added to ``engine.state.metrics`` as ``<prefix><structure>``.

    Args:
        output_transform: gives ``(pred, label)``, e.g. ``monai.handlers.from_engine(['pred', 'label'])``.
        names: channel names (default ``0, 1, ...``).
        ignore_empty: skip pairs whose reference is empty (DoLL: most observations are absent from an image);
            otherwise an empty reference with an empty prediction scores 1 and with any prediction 0.
        prefix: prefix of the per-channel metric names (``None``: not added).
        device: ignite's metric device.

    The value is 0.0 when no pair counts (so a best-metric comparison still works). Under DDP the per-image values
    are gathered across ranks.
    """

    def __init__(self, output_transform: Callable = lambda x: x, names: Sequence[str] | None = None,
                 ignore_empty: bool = True, prefix: str | None = "dice_", device: str | torch.device = "cpu"):
        self.names = None if names is None else [str(n) for n in names]
        self.ignore_empty = ignore_empty
        self.prefix = prefix
        self._last: np.ndarray = np.zeros(0)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._values: list[torch.Tensor] = []

    def update(self, output: Sequence[Any]) -> None:
        pred, ref = _stack(output[0]).detach(), _stack(output[1]).detach()
        if pred.shape != ref.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(ref.shape)} differ in shape")
        self._values.append(per_channel_dice(pred, ref, self.ignore_empty).cpu())

    def _gathered(self) -> torch.Tensor:
        import ignite.distributed as idist

        values = torch.cat(self._values) if self._values else torch.zeros(0, len(self.names or []),
                                                                           dtype=torch.float64)
        if idist.get_world_size() > 1:
            values = idist.all_gather(values)
        return values

    def compute(self) -> float:
        values = self._gathered().numpy()
        with np.errstate(all="ignore"):
            finite = np.isfinite(values)
            self._last = np.array([np.nan if not finite[:, c].any() else float(np.nanmean(values[:, c]))
                                   for c in range(values.shape[1])]) if values.size else np.zeros(0)
            return float(np.nanmean(values)) if finite.any() else 0.0

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        if self.prefix is None:
            return
        for c, value in enumerate(self._last):
            if np.isfinite(value):
                label = self.names[c] if self.names is not None and c < len(self.names) else str(c)
                engine.state.metrics[f"{self.prefix}{slug(label)}"] = float(value)


class SegmentationCSVWriter:
    """Per-image, per-structure Dice, IoU and HD95 (:func:`bundle.metrics.segmentation.segmentation_rows`) of an
    evaluator, written as one tidy CSV with the run's ``tags`` as leading columns; optionally the predicted masks.

    At every iteration the (decollated, thresholded) ``pred`` and ``label`` of each image are compared; at the end
    of the epoch the CSV is written atomically and the means per structure (``<prefix>dice_<structure>``,
    ``..._iou_...``, ``..._hd95_...``; HD95 averages the finite values) and ``<prefix>mean_dice`` are added to
    ``engine.state.metrics`` (attach before the MLflow handler so it logs them).

    Args:
        path: the CSV file.
        structures: channel names.
        tags: constant columns (e.g. ``task``, ``init``, ``train_size``, ``seed``, ``mode``).
        image_key: the item key with the image path (kept by ``CopyItemsd`` before loading); its file stem is the
            ``image`` column (made unique within the run).
        pred_key, label_key: binary prediction and reference ``(C, H, W)``.
        mask_dir: when set, ``<mask_dir>/<image>_<structure>.png`` (0/255) is written for every prediction.
        metric_prefix: prefix of the summary metrics.
        hd95_one_empty: HD95 when exactly one mask is empty: ``nan`` (default) or ``diagonal``.
        enabled: ``False`` makes a no-op (ranks > 0).
    """

    COLUMNS = ("image", "structure", "dice", "iou", "hd95", "pred_area", "ref_area")

    def __init__(self, path: PathLike, structures: Sequence[str], tags: Mapping[str, Any] | None = None,
                 image_key: str = "image_path", pred_key: str = "pred", label_key: str = "label",
                 mask_dir: PathLike | None = None, metric_prefix: str = "test_", hd95_one_empty: str = "nan",
                 enabled: bool = True):
        self.path = os.fspath(path)
        self.structures = [str(s) for s in structures]
        self.tags = dict(tags or {})
        self.image_key = image_key
        self.pred_key = pred_key
        self.label_key = label_key
        self.mask_dir = None if mask_dir is None else os.fspath(mask_dir)
        self.metric_prefix = metric_prefix
        self.hd95_one_empty = hd95_one_empty
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._seen: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.finish)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows, self._seen = [], {}

    def _image_id(self, item: Mapping[str, Any], index: int) -> str:
        src = item.get(self.image_key)
        if src is None and hasattr(item.get("image"), "meta"):
            src = item["image"].meta.get("filename_or_obj")
        stem = os.path.basename(str(src)) if src else f"image{index:05d}"
        for suffix in (".nii.gz", ".dcm"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        stem = os.path.splitext(stem)[0]
        k = self._seen.get(stem, 0)
        self._seen[stem] = k + 1
        return stem if k == 0 else f"{stem}_{k}"

    def collect(self, engine: Engine) -> None:
        from ..data.io import save_png
        from ..metrics.segmentation import segmentation_rows

        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):  # not decollated
            raise ValueError("SegmentationCSVWriter needs a decollated evaluator output (decollate=True)")
        batch = batch if isinstance(batch, list) else [{}] * len(output)
        for b, o in zip(batch, output):
            item = {**b, **o}
            pred = torch.as_tensor(item[self.pred_key]).detach().cpu() > 0.5
            ref = torch.as_tensor(item[self.label_key]).detach().cpu() > 0.5
            image_id = self._image_id(item, len(self.rows) // max(len(self.structures), 1))
            self.rows.extend(segmentation_rows(pred.numpy(), ref.numpy(), image_id, self.structures,
                                               hd95_one_empty=self.hd95_one_empty, **self.tags))
            if self.mask_dir is not None:
                for c, name in enumerate(self.structures):
                    mask = pred[c].numpy().astype(np.uint8) * 255
                    save_png(os.path.join(self.mask_dir, f"{image_id}_{slug(name)}.png"), mask)

    def summary(self) -> dict[str, float]:
        """Means over images per structure (HD95: over its finite values) and the overall mean Dice."""
        out: dict[str, float] = {}
        p = self.metric_prefix
        for name in self.structures:
            rows = [r for r in self.rows if r["structure"] == name]
            if not rows:
                continue
            for metric in ("dice", "iou", "hd95"):
                vals = np.array([r[metric] for r in rows], dtype=np.float64)
                if np.isfinite(vals).any():
                    out[f"{p}{metric}_{slug(name)}"] = float(np.nanmean(vals))
        if self.rows:
            out[f"{p}mean_dice"] = float(np.mean([r["dice"] for r in self.rows]))
        return out

    def finish(self, engine: Engine) -> None:
        import pandas as pd

        columns = [*self.tags, *self.COLUMNS]
        frame = pd.DataFrame(self.rows, columns=columns)
        atomic_write_text(self.path, frame.to_csv(index=False))
        metrics = self.summary()
        engine.state.metrics.update(metrics)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        logger.info("wrote %d rows (%d images) to %s: %s", len(frame), len(self._seen), self.path, shown)


class ResumableTraining(ResumableCheckpoint):
    """:class:`~bundle.workflows.checkpoint.ResumableCheckpoint` that keeps the *configured* training length.

    ignite's ``Engine.load_state_dict`` restores ``max_epochs`` (and ``epoch_length``) from the checkpoint, so a run
    resumed with a larger ``max_epochs`` would stop at the old one, and a finished run would start again from
    epoch 0 (ignite restarts a "done" state). Here the configured values are kept: a run resumed with a larger
    ``max_epochs`` continues after the last saved epoch; a run that already reached ``max_epochs`` does nothing
    (logged; the trainer's ``epoch_length`` is set to 0, which MONAI's ``Workflow.run`` skips).

    A run ended early by a plateau rule (:class:`monai.handlers.EarlyStopHandler` terminating the trainer) is
    complete too: the epoch at which it stopped is saved with ``last.pt`` (``"stopped"``), and a re-run of it does
    nothing, as for a run that reached ``max_epochs``.
    """

    class _Stopped:
        """The epoch at which the trainer was terminated (``None``: not terminated); saved in ``last.pt``."""

        def __init__(self) -> None:
            self.epoch: int | None = None

        def state_dict(self) -> dict[str, int | None]:
            return {"epoch": self.epoch}

        def load_state_dict(self, state: Mapping[str, int | None]) -> None:
            self.epoch = state.get("epoch")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped = self._Stopped()

    def _objects(self, engine: Engine) -> dict[str, Any]:
        return {**super()._objects(engine), "stopped": self.stopped}

    def attach(self, engine: Engine) -> None:
        # before the parent's COMPLETED save, so the saved state knows the run was stopped
        engine.add_event_handler(Events.TERMINATE, self._terminated)
        super().attach(engine)

    def _terminated(self, engine: Engine) -> None:
        self.stopped.epoch = int(engine.state.epoch)
        logger.info(f"training stopped at epoch {engine.state.epoch} (validation plateau)")

    def load(self, engine: Engine) -> None:
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        super().load(engine)
        if self.stopped.epoch is not None:
            logger.info(f"training already complete ({self.last_path}: stopped at epoch {self.stopped.epoch} on a "
                        "validation plateau); nothing to do")
            engine.state.epoch_length = 0
            return
        if epoch_length is not None and engine.state.epoch_length != epoch_length:
            # an epoch of another length: continue counting whole epochs from the saved epoch
            engine.state.iteration = engine.state.epoch * int(epoch_length)
            engine.state.epoch_length = epoch_length
        if max_epochs is not None:
            engine.state.max_epochs = max_epochs
            if engine.state.epoch >= max_epochs:
                logger.info(f"training already complete ({self.last_path}: epoch {engine.state.epoch} of "
                            f"max_epochs {max_epochs}); nothing to do (raise max_epochs to train more)")
                engine.state.epoch_length = 0
            else:
                logger.info(f"resuming at epoch {engine.state.epoch} of {max_epochs}")


# --------------------------------------------------------------------------------------------------------------------
# oracle DoLL (tests, measurements)
# --------------------------------------------------------------------------------------------------------------------
def write_oracle_doll(chexpert_datalist: PathLike, doll_dir: PathLike, doll_datalist: PathLike,
                      image_size: Sequence[int] = (128, 128), sections: Sequence[str] = ("training", "validation"),
                      max_items: int | None = None) -> dict[str, int]:
    """Write a DoLL datalist from the phantom's **true** lesion masks (an oracle DoLL: the upper bound of what the
    IG-to-DoLL stage can give), so pre-training can run without the classifier and DoLL stages.

    Each item of ``sections`` of the CheXpert datalist that has a ``lesion`` bit mask gets a DoLL bit-mask PNG at
    ``image_size`` (nearest-neighbour resize of the 256 px lesion mask, same bits) under ``doll_dir``, and an item
    ``{"image", "label", "targets", "patient", "lesion"}`` in ``doll_datalist`` (DoLL stage format). Files are
    written atomically; existing masks are kept.

    Returns:
        the number of items per section.
    """
    from PIL import Image

    from ..data.io import encode_bitmask, load_bitmask, save_png
    from ..data.phantom import LESIONS_DIR

    datalist = load_json(chexpert_datalist)
    out: dict[str, list[dict[str, Any]]] = {}
    h, w = (int(image_size[0]), int(image_size[1]))
    for section in sections:
        items = [it for it in datalist.get(section, []) if it.get("lesion")]
        if max_items is not None:
            items = items[: int(max_items)]
        out[section] = []
        for it in items:
            parts = os.path.normpath(it["lesion"]).split(os.sep)
            rel = parts[parts.index(LESIONS_DIR) + 1:] if LESIONS_DIR in parts else parts[-4:]
            path = os.path.join(os.fspath(doll_dir), *rel)
            masks = load_bitmask(it["lesion"], len(OBSERVATIONS))
            if not os.path.exists(path):
                small = np.stack([np.asarray(Image.fromarray(m * 255).resize((w, h), Image.NEAREST)) > 0
                                  for m in masks])
                save_png(path, encode_bitmask(small))
            targets = [k for k in range(1, len(OBSERVATIONS)) if masks[k].any()]  # indices, as the DoLL stage
            out[section].append({"image": it["image"], "label": os.path.abspath(path), "targets": targets,
                                 "patient": it.get("patient", ""), "lesion": it["lesion"]})
    atomic_write_json(doll_datalist, {"name": "oracle DoLL (true lesion masks)", "image_size": [h, w],
                                      "observations": list(OBSERVATIONS), **out})
    return {k: len(v) for k, v in out.items()}


def epochs_for(num_iterations: int, epoch_length: int) -> int:
    """Number of epochs of ``epoch_length`` steps that cover ``num_iterations`` optimiser steps (at least 1)."""
    return max(1, math.ceil(int(num_iterations) / max(1, int(epoch_length))))

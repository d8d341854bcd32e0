"""Fine-tuning a pre-trained segmenter on a downstream task: new head, fine-tuning modes and their optimiser params.

Modes (one config id, :func:`prepare_finetune`):

- ``full``: every parameter trainable (optionally a separate learning rate for the encoder, ``encoder_lr``).
- ``warmup``: the encoder is frozen for the first ``warmup_epochs`` epochs, then everything trains.
  :class:`EncoderWarmupHandler` does the freezing (at ``STARTED``) and the unfreezing (at ``EPOCH_COMPLETED`` of
  epoch ``warmup_epochs``). The optimiser receives **all** parameters from the start: frozen ones have
  ``requires_grad=False`` and no gradient, so torch optimisers (SGD, Adam, AdamW, including weight decay) skip
  them until they are unfrozen.
- ``adapter``: a light segmentation adapter. Every pre-trained weight is frozen; the trainable parameters are the
  (new) head and small residual bottleneck adapters inserted after each decoder stage::

      y = x + W_up(ReLU(W_down(x)))      W_down: 1x1 conv C -> C/r,  W_up: 1x1 conv C/r -> C, zero-initialised

  Because ``W_up`` starts at zero, the adapted network computes exactly the pre-trained function at
  initialisation (only the head is new), and the adapters learn a task-specific correction of the decoder features
  with ~C^2/2 parameters per stage (r=4). Adapters are appended as a child named ``adapter`` to each decoder stage
  (a ``Sequential``), so every pre-trained parameter keeps its name (pre-trained checkpoints still load by name
  and shape), and the network stays TorchScript-able. A network trained in this mode must be rebuilt with
  :func:`add_adapters` before its checkpoint is loaded (e.g. in the inference config).

Normalisation layers: the default networks use GroupNorm (SegResNet) and InstanceNorm without affine parameters
(UNet); neither keeps running statistics, so a frozen part behaves identically in train and eval mode (GroupNorm's
affine weights are frozen with the rest). Networks built with BatchNorm keep updating running statistics in train
mode even when their weights are frozen; here, frozen BatchNorm layers get ``momentum=0`` (their running statistics
stay fixed; they still normalise with batch statistics in train mode) and their momentum is restored on unfreezing.

Distributed training: freeze after wrapping in ``DistributedDataParallel`` (which is why the warm-up handler
freezes at ``STARTED``, not in its constructor) and wrap with ``find_unused_parameters=True`` in ``warmup`` mode, so
DDP synchronises the encoder once it is unfrozen. In ``adapter`` mode the frozen set never changes: prepare first,
then wrap.

Config wiring (a sketch; ids are the stage config's)::

    network_def: {_target_: bundle.networks.build_segmenter, arch: "@arch", out_channels: 3}
    network: "$@network_def.to(@device)"
    init_report: "$bundle.networks.initialise_segmenter(@network, @init, @init_path)"
    finetune: "$bundle.networks.prepare_finetune(@network, @finetune_mode, warmup_epochs=@warmup_epochs)"
    optimizer: {_target_: torch.optim.AdamW, params: "$@finetune.params", lr: 1.0e-3}
    train#handlers: "$[...] + @finetune.handlers"
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Sequence

import torch
from monai.networks.blocks.segresnet_block import get_conv_layer
from monai.networks.layers.factories import Act, Conv
from monai.networks.nets import SegResNet, UNet
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..tasks import INIT_CHOICES
from ..utils import BundleInputError, PathLike, atomic_write_json

from .segmentation import (decoder_stage_names, encoder_module_names, head_module_names, matches_prefix,
                           network_parts, unwrap)

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "ADAPTER_NAME",
    "FINETUNE_MODES",
    "EncoderWarmupHandler",
    "FinetuneSetup",
    "FinetuneSummary",
    "ResidualAdapter",
    "add_adapters",
    "adapter_module_names",
    "prepare_finetune",
    "replace_head",
    "set_trainable",
]

logger = logging.getLogger(__name__)

FINETUNE_MODES = ("full", "warmup", "adapter")
#: Child name of the adapter appended to each decoder stage.
ADAPTER_NAME = "adapter"
_MOMENTUM_ATTR = "_finetune_saved_momentum"


# --------------------------------------------------------------------------------------------------------------------
# head
# --------------------------------------------------------------------------------------------------------------------
def _first_conv(module: nn.Module) -> nn.modules.conv._ConvNd:
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m
    raise ValueError(f"{type(module).__name__} has no convolution")


def replace_head(net: nn.Module, out_channels: int) -> nn.Module:
    """Give ``net`` a new, randomly initialised head with ``out_channels`` outputs (in place; returns ``net``).

    The new head is built the way the network builds it (PyTorch's default initialisation, drawn from the global
    torch RNG: seed with :func:`monai.utils.set_determinism` for a reproducible head) on the old head's device and
    dtype; ``net.out_channels`` is updated. SegResNet: ``conv_final.2`` (1x1 conv) is replaced; UNet: ``model.2``
    (the outermost up layer, transposed conv [+ residual unit]) is rebuilt.

    Raises:
        ValueError: unsupported network, or ``out_channels < 1``.
    """
    if int(out_channels) < 1:
        raise ValueError(f"out_channels must be >= 1, got {out_channels}")
    root = unwrap(net)
    parts = network_parts(root)
    (head_name,) = parts.head
    old = root.get_submodule(head_name)
    ref = next(iter(old.parameters()), None)
    in_channels = int(_first_conv(old).in_channels)
    if isinstance(root, SegResNet):
        new = get_conv_layer(root.spatial_dims, in_channels, int(out_channels), kernel_size=1, bias=True)
    elif isinstance(root, UNet):
        new = root._get_up_layer(in_channels, int(out_channels), root.strides[0], True)
    else:  # pragma: no cover - network_parts already rejects others
        raise ValueError(f"cannot replace the head of {type(root).__name__}")
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    parent_name, _, child = head_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if child.isdigit():
        parent[int(child)] = new  # a Sequential
    else:
        setattr(parent, child, new)
    root.out_channels = int(out_channels)
    logger.info("new head %s for %s: %d -> %d output channels (randomly initialised)", head_name,
                type(root).__name__, in_channels, out_channels)
    return net


# --------------------------------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------------------------------
class ResidualAdapter(nn.Module):
    """Residual bottleneck adapter ``x + up(act(down(x)))`` of 1x1 convolutions; ``up`` is zero-initialised, so the
    adapter is the identity at initialisation.

    Args:
        spatial_dims: 2 or 3.
        channels: input and output channels.
        reduction: bottleneck ratio (hidden channels ``max(1, channels // reduction)``).
        act: activation (a MONAI ``Act`` name).
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 4, act: str = "relu"):
        super().__init__()
        hidden = max(1, int(channels) // int(reduction))
        conv = Conv[Conv.CONV, spatial_dims]
        self.down = conv(channels, hidden, kernel_size=1, bias=True)
        self.act = Act[act]()
        self.up = conv(hidden, channels, kernel_size=1, bias=True)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def _last_conv_out(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError(f"{type(module).__name__} has no convolution")
    return int(convs[-1].out_channels)


def add_adapters(net: nn.Module, reduction: int = 4) -> list[str]:
    """Append a :class:`ResidualAdapter` (child ``adapter``) to every decoder stage of ``net`` (idempotent: stages
    that have one keep it). Returns the adapter module names (e.g. ``up_layers.0.adapter``)."""
    root = unwrap(net)
    spatial_dims = int(getattr(root, "spatial_dims", getattr(root, "dimensions", 2)))
    names = []
    for stage_name in decoder_stage_names(root):
        stage = root.get_submodule(stage_name)
        if not isinstance(stage, nn.Sequential):
            raise TypeError(f"decoder stage {stage_name} is a {type(stage).__name__}, not a Sequential: cannot "
                            "append an adapter")
        if ADAPTER_NAME not in stage._modules:
            ref = next(iter(stage.parameters()))
            adapter = ResidualAdapter(spatial_dims, _last_conv_out(stage), reduction=reduction)
            stage.add_module(ADAPTER_NAME, adapter.to(device=ref.device, dtype=ref.dtype))
        names.append(f"{stage_name}.{ADAPTER_NAME}")
    return names


def adapter_module_names(net: nn.Module) -> list[str]:
    """Names of the :class:`ResidualAdapter` modules in ``net``."""
    return [n for n, m in unwrap(net).named_modules() if isinstance(m, ResidualAdapter)]


# --------------------------------------------------------------------------------------------------------------------
# freezing
# --------------------------------------------------------------------------------------------------------------------
def _freeze_bn_stats(bn: _BatchNorm, frozen: bool) -> None:
    if frozen and not hasattr(bn, _MOMENTUM_ATTR):
        setattr(bn, _MOMENTUM_ATTR, bn.momentum)
        bn.momentum = 0.0
    elif not frozen and hasattr(bn, _MOMENTUM_ATTR):
        bn.momentum = getattr(bn, _MOMENTUM_ATTR)
        delattr(bn, _MOMENTUM_ATTR)


def set_trainable(net: nn.Module, trainable: bool, prefixes: Sequence[str] | None = None) -> int:
    """Set ``requires_grad`` of the parameters under the module ``prefixes`` (all when None); freezing also drops
    their gradients and fixes the running statistics of BatchNorm layers there (see the module docstring).
    Returns the number of parameter values (elements) changed."""
    root = unwrap(net)
    count = 0
    for name, p in root.named_parameters():
        if prefixes is None or matches_prefix(name, prefixes):
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None
            count += p.numel()
    for name, m in root.named_modules():
        if isinstance(m, _BatchNorm) and (prefixes is None or matches_prefix(name, prefixes)):
            _freeze_bn_stats(m, not trainable)
    return count


class EncoderWarmupHandler:
    """Freeze the encoder for the first ``warmup_epochs`` epochs of an ignite engine, then unfreeze it.

    At ``Events.STARTED`` the encoder is frozen unless the engine is already past the warm-up (a resumed run: attach
    this handler after MONAI's ``CheckpointLoader``); at ``Events.EPOCH_COMPLETED`` with
    ``engine.state.epoch >= warmup_epochs`` it is unfrozen, so epochs ``1..warmup_epochs`` train with a frozen
    encoder. Both transitions are logged.

    Args:
        net: the network (``DistributedDataParallel`` wrappers are unwrapped; see the module docstring for DDP).
        warmup_epochs: epochs with a frozen encoder (0: never frozen).
        encoder_names: module prefixes or parameter names of the encoder (default:
            :func:`bundle.networks.segmentation.encoder_module_names`).
    """

    def __init__(self, net: nn.Module, warmup_epochs: int, encoder_names: Sequence[str] | None = None):
        if int(warmup_epochs) < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.net = net
        self.warmup_epochs = int(warmup_epochs)
        self.encoder_names = list(encoder_names) if encoder_names is not None else encoder_module_names(net)
        if not any(matches_prefix(n, self.encoder_names) for n, _ in unwrap(net).named_parameters()):
            raise ValueError(f"no parameter of {type(unwrap(net)).__name__} matches encoder_names "
                             f"{self.encoder_names}")
        self.frozen = False

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self.started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.started)
        if not engine.has_event_handler(self.epoch_completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def freeze(self) -> int:
        """Freeze the encoder now; returns the number of frozen values."""
        self.frozen = True
        return set_trainable(self.net, False, self.encoder_names)

    def unfreeze(self) -> int:
        """Unfreeze the encoder now; returns the number of unfrozen values."""
        self.frozen = False
        return set_trainable(self.net, True, self.encoder_names)

    def started(self, engine: Engine) -> None:
        if engine.state.epoch < self.warmup_epochs:
            n = self.freeze()
            logger.info("encoder warm-up: %d encoder parameters frozen until the end of epoch %d", n,
                        self.warmup_epochs)
        elif self.frozen:
            self.unfreeze()

    def epoch_completed(self, engine: Engine) -> None:
        if self.frozen and engine.state.epoch >= self.warmup_epochs:
            n = self.unfreeze()
            logger.info("encoder warm-up over after epoch %d: %d encoder parameters unfrozen", engine.state.epoch, n)


# --------------------------------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class FinetuneSummary:
    """Counts of parameter values (elements) by state after :func:`prepare_finetune`.

    ``trainable``/``frozen`` are the state now; in ``warmup`` mode ``frozen_during_warmup`` more values (the
    encoder) are frozen by the handler for the first ``warmup_epochs`` epochs.
    """

    mode: str
    trainable: int
    frozen: int
    trainable_tensors: int
    frozen_tensors: int
    frozen_during_warmup: int = 0
    warmup_epochs: int = 0
    adapters: list[str] = field(default_factory=list)
    adapter_params: int = 0
    head: list[str] = field(default_factory=list)
    head_params: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"finetune_mode": self.mode, "trainable_params": self.trainable, "frozen_params": self.frozen,
                "trainable_tensors": self.trainable_tensors, "frozen_tensors": self.frozen_tensors,
                "frozen_during_warmup": self.frozen_during_warmup, "warmup_epochs": self.warmup_epochs,
                "adapter_params": self.adapter_params, "head_params": self.head_params,
                "adapters": list(self.adapters), "head": list(self.head)}

    def __str__(self) -> str:
        total = self.trainable + self.frozen
        s = (f"fine-tuning mode {self.mode!r}: {self.trainable:,} trainable / {self.frozen:,} frozen parameters "
             f"({100 * self.trainable / max(total, 1):.1f}% trainable; head {self.head_params:,}")
        if self.adapters:
            s += f", {len(self.adapters)} adapters {self.adapter_params:,}"
        s += ")"
        if self.mode == "warmup":
            s += f"; encoder ({self.frozen_during_warmup:,}) frozen for the first {self.warmup_epochs} epochs"
        return s


@dataclass
class FinetuneSetup:
    """What :func:`prepare_finetune` returns.

    Attributes:
        params: for the optimiser: a list of parameters, or param groups (dicts) when ``encoder_lr`` is set.
        summary: trainable vs frozen counts.
        handler: the :class:`EncoderWarmupHandler` to attach to the trainer (``warmup`` mode), else None.
    """

    params: list[Any]
    summary: FinetuneSummary
    handler: EncoderWarmupHandler | None = None

    @property
    def handlers(self) -> list[EncoderWarmupHandler]:
        """``[handler]`` or ``[]``: to concatenate with a trainer's handler list in any mode."""
        return [] if self.handler is None else [self.handler]


def prepare_finetune(net: nn.Module, mode: str = "full", *, warmup_epochs: int = 0, encoder_lr: float | None = None,
                     adapter_reduction: int = 4) -> FinetuneSetup:
    """Set ``requires_grad`` for a fine-tuning mode and return the optimiser parameters (see the module docstring).

    Call after the head has its downstream size (:func:`replace_head`, or build the network with the downstream
    ``out_channels`` and load with :func:`bundle.networks.transfer.load_pretrained`). Idempotent: calling it twice
    does not add adapters twice.

    Args:
        net: SegResNet or UNet (possibly DDP-wrapped).
        mode: ``"full"``, ``"warmup"`` or ``"adapter"``.
        warmup_epochs: ``warmup`` mode: epochs with a frozen encoder.
        encoder_lr: ``full``/``warmup``: learning rate of the encoder's param group (the other group uses the
            optimiser's default); None: a single list of parameters.
        adapter_reduction: ``adapter`` mode: bottleneck ratio of the adapters.

    Returns:
        :class:`FinetuneSetup` (``params``, ``summary``, ``handler``); the summary is also logged.
    """
    name = str(mode).lower()
    if name not in FINETUNE_MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(FINETUNE_MODES)}")
    root = unwrap(net)
    head = head_module_names(root)
    encoder = encoder_module_names(root)
    handler = None
    adapters: list[str] = []
    if name == "adapter":
        adapters = add_adapters(root, reduction=adapter_reduction)
        set_trainable(root, False)
        set_trainable(root, True, head + adapters)
    else:
        set_trainable(root, True)
        if name == "warmup":
            handler = EncoderWarmupHandler(root, warmup_epochs, encoder_names=encoder)

    named = list(root.named_parameters())
    trainable = [p for _, p in named if p.requires_grad]
    params: list[Any]
    if name != "adapter" and encoder_lr is not None:
        enc = [p for n, p in named if matches_prefix(n, encoder)]
        rest = [p for n, p in named if not matches_prefix(n, encoder)]
        params = [{"params": enc, "lr": float(encoder_lr)}, {"params": rest}]
    else:
        params = trainable
    summary = FinetuneSummary(
        mode=name,
        trainable=sum(p.numel() for p in trainable),
        frozen=sum(p.numel() for _, p in named if not p.requires_grad),
        trainable_tensors=len(trainable),
        frozen_tensors=len(named) - len(trainable),
        frozen_during_warmup=(sum(p.numel() for n, p in named if matches_prefix(n, encoder))
                              if name == "warmup" and warmup_epochs > 0 else 0),
        warmup_epochs=int(warmup_epochs) if name == "warmup" else 0,
        adapters=adapters,
        adapter_params=sum(p.numel() for n, p in named if matches_prefix(n, adapters)),
        head=head,
        head_params=sum(p.numel() for n, p in named if matches_prefix(n, head)),
    )
    logger.info("%s", summary)
    return FinetuneSetup(params=params, summary=summary, handler=handler)


def default_init(doll_checkpoint: str | os.PathLike) -> str:
    """The initialisation a fine-tuning run gets when none is named: ``"doll"`` when the DoLL pre-trained checkpoint
    exists, else ``"scratch"`` with a warning (e.g. a Model Zoo or MONAI Label user who trains ``configs/train.yaml``
    without the pre-training stage: MONAI Label then starts from ``models/model.pt`` itself). Sweeps and the pipeline
    always name the init, so their comparisons never depend on this fallback."""
    if os.path.isfile(doll_checkpoint):
        return "doll"
    logging.getLogger(__name__).warning(
        f"no DoLL pre-trained checkpoint at {doll_checkpoint}: training from scratch (run configs/pretrain.yaml "
        "first, or name the initialisation with --init)")
    return "scratch"


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
    from .finetune import add_adapters
    from .segmentation import build_segmenter

    net = build_segmenter(arch, in_channels=in_channels, out_channels=int(out_channels),
                          **{**dict(network_kwargs or {}), **kwargs})
    if str(mode).lower() == "adapter":
        add_adapters(net, reduction=adapter_reduction)
    return net


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
        handler: the warm-up handler (``warmup`` mode) or ``None``; ``report``: the
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
        from .finetune import prepare_finetune
        from .segmentation import head_module_names
        from .transfer import load_encoder_from_classifier, load_external, load_pretrained

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
                         "doll_shuffled": "run configs/pretrain.yaml --pretrain_labels shuffled first",
                         "doll_oracle": "run configs/pretrain.yaml --pretrain_labels oracle first",
                         "doll_ig_single": "run configs/generate_doll.yaml and configs/pretrain.yaml with "
                                           "--doll_labels / --pretrain_labels ig_single first",
                         "doll_gradcam": "run configs/generate_doll.yaml and configs/pretrain.yaml with "
                                         "--doll_labels / --pretrain_labels gradcam first",
                         "classifier_encoder": "train a segresnet_encoder classifier (configs/train_classifier.yaml "
                                               "--classifier_arch segresnet_encoder) or set --init_checkpoint",
                         "external": "set --external_weights to a local state-dict file"}
                raise BundleInputError(self.checkpoint, f"{name} checkpoint not found ({hints[name]})")
            head = head_module_names(network) if reset_head else []
            if INIT_CHOICES[name] == "doll":
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
            from .segmentation import set_output_bias

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
        """The :class:`~bundle.networks.finetune.EncoderWarmupHandler` (``warmup`` mode), else ``None``."""
        return self.setup.handler

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


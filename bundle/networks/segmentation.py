"""Segmentation networks for DoLL pre-training and downstream fine-tuning, and a map of their parts.

``build_segmenter(arch, ...)`` returns a network whose forward gives **logits** ``(B, out_channels, H, W)``; the
sigmoid is applied by the loss (:class:`bundle.networks.losses.WeightedDiceBCELoss`) and by post-processing, since
the labels are multi-label (14 DoLL observations, or lungs/heart/clavicles that may overlap). Architectures, chosen
by the single config id ``arch``:

- ``segresnet`` (default): :class:`monai.networks.nets.SegResNet`, ``init_filters=8``, ``blocks_down=(1, 2, 2, 4)``,
  ``blocks_up=(1, 1, 1)``.
- ``unet``: :class:`monai.networks.nets.UNet`, ``channels=(16, 32, 64, 128, 256)``, ``strides=(2, 2, 2, 2)``,
  ``num_res_units=2``.

Both need ``H`` and ``W`` divisible by 16 (``UNet`` halves four times; SegResNet three times).

Parts (used by weight transfer, head replacement, freezing and adapters), as module names of the network:

- **SegResNet**
    - encoder: ``convInit``, ``down_layers`` (the names the ``segresnet_encoder`` classifier keeps);
    - head: ``conv_final.2``, the final 1x1 convolution (``conv_final.0`` is a GroupNorm, ``.1`` a ReLU);
    - decoder: everything else: ``up_samples``, ``up_layers``, ``conv_final.0``.
- **UNet** (MONAI's recursive ``model = Sequential(down, SkipConnection(Sequential(down, ..., up)), up)``;
  shown for the default 5 channels, i.e. 4 levels and a bottom layer; any ``num_res_units``):
    - encoder: the down layer of each level and the bottom layer: ``model.0``, ``model.1.submodule.0``,
      ``model.1.submodule.1.submodule.0``, ``model.1.submodule.1.submodule.1.submodule.0``,
      ``model.1.submodule.1.submodule.1.submodule.1.submodule``;
    - head: ``model.2``, the up layer of the outermost level, which maps to ``out_channels``. With
      ``num_res_units > 0`` it is ``Sequential(transposed conv + ADN, ResidualUnit)`` (``model.2.0.*``,
      ``model.2.1.*``; both convolutions have ``out_channels`` outputs, plus a PReLU slope ``model.2.0.adn.A``);
      with ``num_res_units == 0`` a single transposed convolution (``model.2.conv.*``);
    - decoder: the up layers of the inner levels: ``model.1.submodule.1.submodule.1.submodule.2``,
      ``model.1.submodule.1.submodule.2``, ``model.1.submodule.2``.

"Decoder stages" (:func:`decoder_stage_names`) are where :mod:`bundle.networks.finetune` inserts adapters: SegResNet's
``up_layers.{i}`` and UNet's inner up layers, deepest first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import SegResNet, UNet
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "NetworkParts",
    "build_segmenter",
    "decoder_stage_names",
    "encoder_module_names",
    "encoder_parameter_names",
    "head_module_names",
    "head_out_channels",
    "head_parameter_names",
    "matches_prefix",
    "network_parts",
    "part_of",
    "set_output_bias",
    "unwrap",
]

ARCHITECTURES = ("segresnet", "unet")

#: Defaults of each architecture; ``build_segmenter`` keyword arguments override them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "segresnet": {"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1)},
    "unet": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2},
}


def build_segmenter(arch: str = "segresnet", in_channels: int = 1, out_channels: int = 14, spatial_dims: int = 2,
                    **kwargs: Any) -> nn.Module:
    """Build a segmentation network that outputs logits ``(B, out_channels, *spatial)``.

    Args:
        arch: ``"segresnet"`` or ``"unet"`` (case-insensitive).
        in_channels: input channels (1 for radiographs).
        out_channels: output channels (14 DoLL observations in pre-training; the downstream structures after).
        spatial_dims: 2 for radiographs.
        kwargs: passed to the MONAI network, overriding :data:`DEFAULTS` (e.g. ``init_filters=16``,
            ``dropout_prob=0.1`` for SegResNet; ``channels``, ``num_res_units``, ``norm`` for UNet).

    Raises:
        ValueError: unknown ``arch``.
    """
    name = str(arch).lower()
    if name not in DEFAULTS:
        raise ValueError(f"unknown segmentation architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    cfg = {**DEFAULTS[name], **kwargs}
    for key in ("blocks_down", "blocks_up", "channels", "strides"):
        if key in cfg and isinstance(cfg[key], list):
            cfg[key] = tuple(cfg[key])  # YAML gives lists
    if name == "segresnet":
        return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **cfg)
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **cfg)


@dataclass(frozen=True)
class NetworkParts:
    """Module names of a network's parts (see the module docstring). The decoder is "everything else"."""

    arch: str
    encoder: tuple[str, ...]
    decoder_stages: tuple[str, ...]
    head: tuple[str, ...]


def unwrap(net: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or ``net`` itself)."""
    while isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        net = net.module
    return net


def _segresnet_parts(net: SegResNet) -> NetworkParts:
    if not getattr(net, "use_conv_final", True) or not hasattr(net, "conv_final"):
        raise ValueError("SegResNet built with use_conv_final=False has no head (conv_final)")
    head_index = len(net.conv_final) - 1
    return NetworkParts(arch="segresnet", encoder=("convInit", "down_layers"),
                        decoder_stages=tuple(f"up_layers.{i}" for i in range(len(net.up_layers))),
                        head=(f"conv_final.{head_index}",))


def _unet_parts(net: UNet) -> NetworkParts:
    """Walk MONAI's recursive ``Sequential(down, SkipConnection(sub), up)`` structure from the top level."""
    encoder, ups = [], []
    prefix, block = "model", net.model
    while (isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection)
           and type(block) is nn.Sequential):
        encoder.append(f"{prefix}.0")
        ups.append(f"{prefix}.2")
        prefix, block = f"{prefix}.1.submodule", block[1].submodule
    if not ups:
        raise ValueError(f"unrecognised UNet structure ({type(net).__name__}): expected "
                         "model = Sequential(down, SkipConnection(...), up)")
    encoder.append(prefix)  # the bottom layer
    return NetworkParts(arch="unet", encoder=tuple(encoder), decoder_stages=tuple(reversed(ups[1:])),
                        head=(ups[0],))


def network_parts(net: nn.Module) -> NetworkParts:
    """Encoder, decoder-stage and head module names of a SegResNet or UNet (``DDP`` wrappers are unwrapped).

    Raises:
        ValueError: the network is neither (the message names its class).
    """
    net = unwrap(net)
    if isinstance(net, SegResNet):
        return _segresnet_parts(net)
    if isinstance(net, UNet):
        return _unet_parts(net)
    raise ValueError(f"no part map for {type(net).__name__}: supported segmenters are SegResNet and UNet "
                     f"(build them with bundle.networks.build_segmenter)")


def encoder_module_names(net: nn.Module) -> list[str]:
    """Module names forming the encoder (SegResNet: ``["convInit", "down_layers"]``)."""
    return list(network_parts(net).encoder)


def decoder_stage_names(net: nn.Module) -> list[str]:
    """Module names of the decoder stages, deepest first (where adapters go)."""
    return list(network_parts(net).decoder_stages)


def head_module_names(net: nn.Module) -> list[str]:
    """Module names forming the head (SegResNet: ``["conv_final.2"]``; UNet: ``["model.2"]``)."""
    return list(network_parts(net).head)


def matches_prefix(name: str, prefixes: Iterable[str]) -> bool:
    """Whether parameter/buffer ``name`` lies in one of the modules ``prefixes`` (or is one of them)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def encoder_parameter_names(net: nn.Module) -> list[str]:
    """Names (as in ``net.named_parameters()``, wrapper prefix removed) of the encoder's parameters."""
    prefixes = network_parts(net).encoder
    return [n for n, _ in unwrap(net).named_parameters() if matches_prefix(n, prefixes)]


def head_parameter_names(net: nn.Module) -> list[str]:
    """Names of the head's parameters."""
    prefixes = network_parts(net).head
    return [n for n, _ in unwrap(net).named_parameters() if matches_prefix(n, prefixes)]


def part_of(name: str, parts: NetworkParts) -> str:
    """``"encoder"``, ``"head"`` or ``"decoder"`` for a parameter/buffer name."""
    if matches_prefix(name, parts.encoder):
        return "encoder"
    if matches_prefix(name, parts.head):
        return "head"
    return "decoder"


def head_out_channels(net: nn.Module) -> int:
    """Number of output channels of the head (the last convolution's ``out_channels``)."""
    root = unwrap(net)
    head = root.get_submodule(head_module_names(root)[-1])
    convs = [m for m in head.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError(f"the head of {type(root).__name__} has no convolution")
    return int(convs[-1].out_channels)



def set_output_bias(net: nn.Module, prior: float | Sequence[float]) -> list[float]:
    """Set the bias of the head's last convolution to ``logit(prior)`` per output channel.

    A sigmoid output whose bias starts at 0 predicts 0.5 everywhere; for a small structure (clavicles cover ~1% of
    a radiograph) the background pixels' cross-entropy then drives every logit of that channel far below 0 within
    the first steps, where the sigmoid saturates and the Dice gradient vanishes: the channel "dies" and never
    recovers in a short budget. Starting each channel at its foreground prior (RetinaNet's prior initialisation,
    Lin et al. 2017) removes that first push. ``prior`` is one fraction for every channel or one per channel,
    each in (0, 1).

    Returns:
        the biases set (logits).

    Raises:
        ValueError: a prior outside (0, 1) or a count that does not match the head's channels.
    """
    root = unwrap(net)
    head = root.get_submodule(head_module_names(root)[-1])
    convs = [m for m in head.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs or convs[-1].bias is None:
        raise ValueError(f"the head of {type(root).__name__} has no convolution with a bias")
    conv = convs[-1]
    n = int(conv.out_channels)
    priors = [float(prior)] * n if isinstance(prior, (int, float)) else [float(p) for p in prior]
    if len(priors) != n:
        raise ValueError(f"{len(priors)} output-bias priors for a head of {n} channels")
    if any(not 0.0 < p < 1.0 for p in priors):
        raise ValueError(f"output-bias priors must lie in (0, 1), got {priors}")
    logits = [math.log(p / (1.0 - p)) for p in priors]
    with torch.no_grad():
        conv.bias.copy_(torch.tensor(logits, dtype=conv.bias.dtype))
    return logits

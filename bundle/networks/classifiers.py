"""Multi-label chest X-ray classifiers (14 CheXpert observations), built by name.

``build_classifier(arch, ...)`` returns a network whose forward gives logits ``(B, num_classes)``. Architectures:

- ``densenet121``: MONAI's DenseNet121 (the paper's classifier; the GPU default).
- ``densenet_small``: the same DenseNet design, narrower and shallower (the CPU default; ~25x fewer FLOPs).
- ``resnet18``: MONAI's ResNet-18 (a second architecture for boosting across classifiers).
- ``segresnet_encoder``: the encoder of the segmentation network (:class:`monai.networks.nets.SegResNet`) with a
  global-pooling head. Its encoder parameters keep SegResNet's names (``convInit.*``, ``down_layers.*``) so a
  classifier checkpoint initialises a segmenter directly (the "classifier-encoder" baseline).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.networks.layers.factories import Act, Norm
from monai.networks.nets import DenseNet, DenseNet121, SegResNet, resnet18
from torch import nn

ARCHITECTURES = ("densenet121", "densenet_small", "resnet18", "segresnet_encoder")


class SegResNetEncoderClassifier(nn.Module):
    """SegResNet's encoder (``convInit`` + ``down_layers``) followed by norm, ReLU, global average pooling and a
    linear layer. Encoder hyper-parameters are those of :class:`~monai.networks.nets.SegResNet`.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 14, init_filters: int = 8,
                 blocks_down: Sequence[int] = (1, 2, 2, 4), norm: tuple | str = ("GROUP", {"num_groups": 8}),
                 dropout_prob: float = 0.0):
        super().__init__()
        seg = SegResNet(spatial_dims=spatial_dims, init_filters=init_filters, in_channels=in_channels,
                        out_channels=1, blocks_down=tuple(blocks_down), norm=norm)
        self.convInit = seg.convInit
        self.down_layers = seg.down_layers
        channels = init_filters * 2 ** (len(blocks_down) - 1)
        norm_name, norm_args = (norm, {}) if isinstance(norm, str) else norm
        norm_type = Norm[norm_name.upper(), spatial_dims] if norm_name.upper() != "GROUP" else nn.GroupNorm
        norm_layer = (nn.GroupNorm(num_channels=channels, **norm_args) if norm_type is nn.GroupNorm
                      else norm_type(channels, **norm_args))
        pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.head = nn.Sequential(norm_layer, Act["relu"](inplace=False), pool, nn.Flatten(1),
                                  nn.Dropout(dropout_prob), nn.Linear(channels, num_classes))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convInit(x)
        for down in self.down_layers:
            x = down(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))


def build_classifier(arch: str = "densenet_small", in_channels: int = 1, num_classes: int = 14,
                     spatial_dims: int = 2, **kwargs: Any) -> nn.Module:
    """Build a classifier by architecture name (see the module docstring). ``kwargs`` go to the network."""
    arch = arch.lower()
    if arch == "densenet121":
        return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **kwargs)
    if arch == "densenet_small":
        cfg = {"init_features": 16, "growth_rate": 12, "block_config": (3, 6, 12, 8), "bn_size": 4}
        cfg.update(kwargs)
        return DenseNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **cfg)
    if arch == "resnet18":
        return resnet18(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes, **kwargs)
    if arch == "segresnet_encoder":
        return SegResNetEncoderClassifier(spatial_dims=spatial_dims, in_channels=in_channels,
                                          num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown classifier architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def save_spec(ckpt_dir: str, arch: str, num_classes: int = 14, in_channels: int = 1, **kwargs: Any) -> str:
    """Write ``<ckpt_dir>/classifier.json`` (architecture and arguments) so later stages can rebuild the network."""
    import os

    from ..utils import atomic_write_json

    path = os.path.join(ckpt_dir, "classifier.json")
    atomic_write_json(path, {"arch": arch, "num_classes": num_classes, "in_channels": in_channels, "kwargs": kwargs})
    return path


#: Grad-CAM layer of each classifier architecture (the last feature map before pooling, after its activation).
GRADCAM_LAYERS: dict[str, str] = {
    "densenet121": "class_layers.relu",
    "densenet_small": "class_layers.relu",
    "resnet18": "layer4",
    "segresnet_encoder": "head.1",
}


def gradcam_layer_of(ckpt_dir: str) -> str:
    """The Grad-CAM layer of the classifier saved in ``ckpt_dir`` (from its ``classifier.json``)."""
    import os

    from ..utils import load_json

    return GRADCAM_LAYERS[load_json(os.path.join(ckpt_dir, "classifier.json"))["arch"]]

"""Networks: classifiers, segmenters and their parts, weight transfer, fine-tuning modes and losses.

- :mod:`.classifiers`: ``build_classifier`` (14-observation classifiers).
- :mod:`.segmentation`: ``build_segmenter`` (SegResNet / UNet) and the encoder/decoder/head map.
- :mod:`.transfer`: ``load_pretrained``, ``load_encoder_from_classifier``, ``load_external`` -> ``TransferReport``.
- :mod:`.finetune`: ``replace_head``, ``prepare_finetune`` (``full`` / ``warmup`` / ``adapter``),
  ``EncoderWarmupHandler``.
- :mod:`.losses`: ``WeightedDiceBCELoss``.
- :mod:`.precision`: ``AutocastInferer`` (bfloat16 training on CPU), ``cpu_bf16_supported``.
"""

from __future__ import annotations

from .classifiers import build_classifier
from .finetune import (EncoderWarmupHandler, FinetuneSetup, FinetuneSummary, ResidualAdapter, add_adapters,
                       prepare_finetune, replace_head, set_trainable)
from .losses import WeightedDiceBCELoss
from .precision import AutocastInferer, cpu_bf16_supported
from .segmentation import (build_segmenter, decoder_stage_names, encoder_module_names, encoder_parameter_names,
                           head_module_names, head_parameter_names, network_parts)
from .transfer import (TransferReport, initialise_segmenter, load_encoder_from_classifier, load_external,
                       load_pretrained, read_state_dict)

__all__ = [
    "AutocastInferer",
    "EncoderWarmupHandler",
    "FinetuneSetup",
    "FinetuneSummary",
    "ResidualAdapter",
    "TransferReport",
    "WeightedDiceBCELoss",
    "add_adapters",
    "build_classifier",
    "build_segmenter",
    "cpu_bf16_supported",
    "decoder_stage_names",
    "encoder_module_names",
    "encoder_parameter_names",
    "head_module_names",
    "head_parameter_names",
    "initialise_segmenter",
    "load_encoder_from_classifier",
    "load_external",
    "load_pretrained",
    "network_parts",
    "prepare_finetune",
    "read_state_dict",
    "replace_head",
    "set_trainable",
]


from .._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__)

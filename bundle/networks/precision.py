"""Mixed precision for training on CPU: a MONAI inferer that runs the network under ``torch.autocast``.

MONAI's ``SupervisedTrainer(amp=True)`` autocasts on CUDA only (float16 with a ``GradScaler``). On a CPU with native
bfloat16 (AVX512-BF16 or AMX: oneDNN runs its convolutions in bfloat16), autocast to bfloat16 cuts the segmenters'
training step by about a quarter (SegResNet, batch 8 at 128 px, one thread: 0.18 s against 0.24 s,
``scripts/bench_precision.py``). bfloat16 keeps float32's exponent range, so no loss scaling is needed.

:class:`AutocastInferer` is the training inferer (``train#inferer``) of ``configs/train.yaml`` (on where the CPU has
native bfloat16) and ``configs/pretrain.yaml`` (off by default: the DoLL pre-training fitted its labels less well in
bfloat16 on 2 of 3 seeds, for ~35 s saved; see the config's comment). Only the network's forward runs under autocast,
and so its backward, whose kernels follow the forward's dtypes; the prediction is cast back to float32 before the
loss, the weights and the optimizer stay float32, and validation and test inference stay float32. On a CPU without
native bfloat16 the autocast would be emulated and slower, so ``train.yaml`` enables it with
:func:`cpu_bf16_supported` (``cpu_bf16`` id; ``--cpu_bf16 false`` forces float32). Autocast on ``"cpu"`` does not
touch CUDA tensors: on a GPU the inferer is a plain forward (use ``--amp true`` there).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer

from ..utils import as_bool

__all__ = ["AutocastInferer", "cpu_bf16_supported"]


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 natively in oneDNN (AVX512-BF16, AMX): where CPU autocast pays off."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the mkldnn ops
        return False


class AutocastInferer(Inferer):
    """Run ``network(inputs)`` under ``torch.autocast(device_type, dtype)`` and return a float32 prediction.

    Args:
        enabled: autocast on (``False``: a plain forward, bit for bit MONAI's ``SimpleInferer``); a command line's
            ``"true"``/``"false"`` is read as such (:func:`bundle.utils.as_bool`).
        device_type: the autocast device type (``"cpu"``; tensors of other devices are not affected).
        dtype: the autocast dtype (``torch.bfloat16``; a string such as ``"bfloat16"`` is accepted for configs).
    """

    def __init__(self, enabled: bool = True, device_type: str = "cpu", dtype: torch.dtype | str = torch.bfloat16):
        super().__init__()
        self.enabled = as_bool(enabled, "AutocastInferer: enabled")
        self.device_type = str(device_type)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"AutocastInferer: dtype must be a torch dtype or its name, got {dtype!r}")

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return network(inputs, *args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = network(inputs, *args, **kwargs)
        return _to_float32(out)


def _to_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    return out

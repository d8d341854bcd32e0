"""Segmentation losses for multi-label sigmoid outputs: Dice + (background-weighted) BCE or focal loss.

Pre-training on DoLL follows PSSL (arXiv:2207.03335): pseudo masks derived from explanations are reliable where
they mark an object and unreliable elsewhere, so the cross-entropy term weights background pixels by
``background_weight`` (0.1) against 1.0 for object pixels. "Background" is per channel: a pixel is background for
observation ``c`` where the DoLL mask of ``c`` is 0. With soft targets ``t`` in [0, 1] the weight interpolates,
``w = background_weight + (1 - background_weight) * t``. With ``background_weight=1`` the loss is plain
Dice + BCE (the fine-tuning loss).

Note on MONAI's ``DiceCELoss(sigmoid=True)``: it uses ``BCEWithLogitsLoss`` only for **one** output channel; with
more channels it uses softmax cross-entropy (mutually exclusive classes) regardless of ``sigmoid``. For multi-label
outputs (DoLL's 14 channels, overlapping lungs/heart/clavicles) this module's loss is the right one; it equals
``DiceCELoss(sigmoid=True)`` for a single channel and ``DiceLoss(sigmoid=True) + BCEWithLogitsLoss()`` for any
number of channels when ``background_weight=1``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch.nn.modules.loss import _Loss

__all__ = ["WeightedDiceBCELoss"]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor (drops MONAI ``MetaTensor`` metadata so the loss is a plain scalar)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


class WeightedDiceBCELoss(_Loss):
    """``dice_weight * Dice + bce_weight * weighted BCE`` (or weighted focal loss) on logits ``(B, C, *spatial)``.

    Args:
        background_weight: weight of background (target 0) pixels in the BCE/focal term; objects weigh 1.0
            (PSSL: 0.1). 1.0 gives the unweighted loss.
        dice_weight: weight of the Dice term (MONAI ``DiceLoss(sigmoid=True, include_background=True)``; every
            channel is a foreground class).
        bce_weight: weight of the BCE (or focal) term.
        focal: use the sigmoid focal loss ``(1 - p_t)^gamma * BCE`` (MONAI's formulation) instead of BCE.
        gamma: focal exponent.
        smooth_nr, smooth_dr, squared_pred, jaccard, batch: passed to :class:`monai.losses.DiceLoss`
            (``batch=True`` computes Dice over the whole batch per channel, which avoids the large loss of empty
            channels, frequent in DoLL where most observations are absent from an image).
        sync_batch: under ``torch.distributed`` (more than one rank) with ``batch=True``, sum the Dice's
            intersection and volumes over every rank's batch (an autograd-aware all-reduce) so that the Dice is the
            one of the global batch: with DDP's gradient averaging, ``n`` ranks of ``B / n`` images then give the
            gradient of one process on ``B`` images. Without it each rank's Dice covers its own share only, a
            different loss where channels are rare. Ignored in a single process and with ``batch=False`` (per-image
            Dice averaged over images is already exact under DDP).

    The BCE term is ``mean(w * bce)`` over all elements (as ``F.binary_cross_entropy_with_logits(weight=w)``).
    """

    def __init__(self, background_weight: float = 0.1, dice_weight: float = 1.0, bce_weight: float = 1.0,
                 focal: bool = False, gamma: float = 2.0, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 squared_pred: bool = False, jaccard: bool = False, batch: bool = False,
                 sync_batch: bool = True) -> None:
        super().__init__(reduction="mean")
        for name, value in (("background_weight", background_weight), ("dice_weight", dice_weight),
                            ("bce_weight", bce_weight), ("gamma", gamma)):
            if float(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.background_weight = float(background_weight)
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.focal = bool(focal)
        self.gamma = float(gamma)
        self.dice = DiceLoss(include_background=True, sigmoid=True, squared_pred=squared_pred, jaccard=jaccard,
                             reduction="mean", smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch)
        self.sync_batch = bool(sync_batch) and bool(batch)

    @staticmethod
    def _world_size() -> int:
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def global_batch_dice(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MONAI's batch Dice loss (sigmoid, every channel, mean over channels) with the per-channel sums
        all-reduced over the ranks (``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the
        gradient): every rank returns the Dice of the global batch."""
        from torch.distributed.nn.functional import all_reduce

        d = self.dice
        p = torch.sigmoid(input)
        dims = [0, *range(2, input.dim())]
        sums = torch.stack([(p * target).sum(dims),
                            (target ** 2 if d.squared_pred else target).sum(dims),
                            (p ** 2 if d.squared_pred else p).sum(dims)])
        intersection, ground, pred = all_reduce(sums)
        denominator = ground + pred
        if d.jaccard:
            denominator = 2.0 * (denominator - intersection)
        return (1.0 - (2.0 * intersection + d.smooth_nr) / (denominator + d.smooth_dr)).mean()

    def pixel_weights(self, target: torch.Tensor) -> torch.Tensor:
        """Per-element weights of the BCE term: ``background_weight`` on background, 1 on objects."""
        return self.background_weight + (1.0 - self.background_weight) * target

    def components(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms: ``{"dice", "bce" (or focal), "total"}`` (unweighted terms and the weighted total)."""
        input, target = _plain(input), _plain(target)
        if input.shape != target.shape:
            raise ValueError(f"input (logits) and target must have the same shape (B, C, *spatial); got "
                             f"{tuple(input.shape)} and {tuple(target.shape)}")
        if input.dim() < 3:
            raise ValueError(f"expected (B, C, *spatial) tensors, got shape {tuple(input.shape)}")
        target = target.to(dtype=input.dtype)
        w = self.pixel_weights(target)
        per_element = F.binary_cross_entropy_with_logits(input, target, reduction="none")
        if self.focal:
            # (1 - p_t)^gamma computed in log space, as monai.losses.focal_loss.sigmoid_focal_loss
            per_element = torch.exp(self.gamma * F.logsigmoid(-input * (target * 2 - 1))) * per_element
        cls = (w * per_element).mean()
        if self.dice_weight <= 0:
            dice = input.new_zeros(())
        elif self.sync_batch and self._world_size() > 1:
            dice = self.global_batch_dice(input, target)
        else:
            dice = self.dice(input, target)
        total = self.dice_weight * dice + self.bce_weight * cls
        return {"dice": dice, "focal" if self.focal else "bce": cls, "total": total}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: ``input`` logits and ``target`` masks in [0, 1], both ``(B, C, *spatial)``. Returns a scalar."""
        return self.components(input, target)["total"]


class MaskedBCEWithLogitsLoss(torch.nn.Module):
    """Binary cross-entropy with logits averaged over the labelled (non-NaN) entries only.

    Args:
        pos_weight: optional per-class weight of positives (as in ``torch.nn.BCEWithLogitsLoss``).
    """

    def __init__(self, pos_weight: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = ~torch.isnan(target)
        target = torch.nan_to_num(target, nan=0.0)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target, pos_weight=self.pos_weight, reduction="none")
        n = valid.sum()
        return (loss * valid).sum() / n.clamp_min(1)


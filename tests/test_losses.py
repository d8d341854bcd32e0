"""WeightedDiceBCELoss against hand computations and MONAI's losses."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss, DiceLoss, FocalLoss

from bundle.networks.losses import WeightedDiceBCELoss


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """B=1, C=2, 2x2: channel 0 has one object pixel, channel 1 two."""
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]], [[-0.5, 1.5], [1.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]])
    return logits, target


def _hand(logits: torch.Tensor, target: torch.Tensor, bg: float, nr: float = 1e-5, dr: float = 1e-5,
          gamma: float | None = None) -> tuple[float, float]:
    """Dice loss and weighted BCE/focal term, element by element in plain Python."""
    x, t = logits.flatten(2).tolist()[0], target.flatten(2).tolist()[0]
    dices, terms = [], []
    for xc, tc in zip(x, t):
        p = [1 / (1 + math.exp(-v)) for v in xc]
        inter = sum(pi * ti for pi, ti in zip(p, tc))
        dices.append(1 - (2 * inter + nr) / (sum(p) + sum(tc) + dr))
        for pi, ti in zip(p, tc):
            bce = -(ti * math.log(pi) + (1 - ti) * math.log(1 - pi))
            if gamma is not None:
                pt = pi if ti == 1 else 1 - pi
                bce *= (1 - pt) ** gamma
            terms.append((1.0 if ti == 1 else bg) * bce)
    return sum(dices) / len(dices), sum(terms) / len(terms)


@pytest.mark.parametrize("bg", [0.1, 1.0])
def test_against_hand_computation(bg):
    logits, target = _tiny()
    loss = WeightedDiceBCELoss(background_weight=bg, dice_weight=0.7, bce_weight=1.3)
    dice, bce = _hand(logits, target, bg)
    parts = loss.components(logits, target)
    assert parts["dice"].item() == pytest.approx(dice, rel=1e-6)
    assert parts["bce"].item() == pytest.approx(bce, rel=1e-6)
    assert loss(logits, target).item() == pytest.approx(0.7 * dice + 1.3 * bce, rel=1e-6)


def test_focal_against_hand_computation_and_monai():
    logits, target = _tiny()
    loss = WeightedDiceBCELoss(background_weight=0.1, focal=True, gamma=2.0)
    dice, focal = _hand(logits, target, 0.1, gamma=2.0)
    assert loss(logits, target).item() == pytest.approx(dice + focal, rel=1e-6)
    # unweighted focal term equals MONAI's sigmoid FocalLoss
    plain = WeightedDiceBCELoss(background_weight=1.0, dice_weight=0.0, focal=True, gamma=2.0)
    ref = FocalLoss(gamma=2.0, use_softmax=False)(logits, target)
    assert torch.allclose(plain(logits, target), ref, rtol=1e-6)


def test_background_down_weighting():
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    empty = torch.zeros_like(logits)
    full = torch.ones_like(logits)
    weighted = WeightedDiceBCELoss(background_weight=0.1, dice_weight=0.0)
    plain = WeightedDiceBCELoss(background_weight=1.0, dice_weight=0.0)
    assert weighted(logits, empty).item() == pytest.approx(0.1 * plain(logits, empty).item(), rel=1e-6)
    assert weighted(logits, full).item() == pytest.approx(plain(logits, full).item(), rel=1e-6)  # objects: 1.0
    # soft targets interpolate the weight
    assert torch.allclose(weighted.pixel_weights(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.1, 0.55, 1.0]))


def test_equals_monai_dice_ce_for_one_channel():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 16, 16, generator=g)
    target = (torch.rand(3, 1, 16, 16, generator=g) > 0.6).float()
    ours = WeightedDiceBCELoss(background_weight=1.0)(logits, target)
    ref = DiceCELoss(sigmoid=True)(logits, target)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_multilabel_equals_dice_plus_bce_not_monai_dice_ce():
    """MONAI's DiceCELoss uses softmax CE for C > 1 even with sigmoid=True: ours stays multi-label (BCE)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 16, 16, generator=g)
    target = (torch.rand(2, 4, 16, 16, generator=g) > 0.5).float()  # overlapping labels
    ours = WeightedDiceBCELoss(background_weight=1.0, batch=True)(logits, target)
    ref = DiceLoss(sigmoid=True, batch=True)(logits, target) + torch.nn.BCEWithLogitsLoss()(logits, target)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours, DiceCELoss(sigmoid=True, batch=True)(logits, target), rtol=1e-3)


def test_gradients_metatensor_and_errors():
    logits, target = _tiny()
    leaf = logits.clone().requires_grad_(True)
    out = WeightedDiceBCELoss()(MetaTensor(leaf), MetaTensor(target))
    assert type(out) is torch.Tensor and out.dim() == 0
    out.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        WeightedDiceBCELoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="background_weight must be >= 0"):
        WeightedDiceBCELoss(background_weight=-0.1)


_DDP_CASES = {"plain": {}, "squared_jaccard": {"squared_pred": True, "jaccard": True}}


def _ddp_batch() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny conv net and a batch of 4 images, 3 channels, where channel 2 is absent from the first two images
    (rare channels are where a per-rank batch Dice differs from the global one)."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    x = torch.randn(4, 1, 8, 8)
    y = (torch.rand(4, 3, 8, 8) > 0.6).float()
    y[:2, 2] = 0
    return net, x, y


def _ddp_loss_worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    for name, kwargs in _DDP_CASES.items():
        for sync in (True, False):
            net, x, y = _ddp_batch()
            ddp = torch.nn.parallel.DistributedDataParallel(net)
            loss_fn = WeightedDiceBCELoss(background_weight=0.1, batch=True, sync_batch=sync, **kwargs)
            share = slice(2 * rank, 2 * rank + 2)  # each rank: half of the batch
            parts = loss_fn.components(ddp(x[share]), y[share])
            parts["total"].backward()
            results[(name, sync)] = {"dice": parts["dice"].item(), "total": parts["total"].item(),
                                     "grads": [p.grad.clone() for p in net.parameters()]}
    if rank == 0:
        torch.save(results, out_file)
    from bundle.utils import shutdown_distributed

    shutdown_distributed(ddp)  # the last wrapper's reducer freed before its group (a freed-late one can hang exit)


def test_batch_dice_over_ranks_equals_one_process():
    """Under DDP with ``batch=True`` (the pre-training Dice), two gloo ranks of 2 images each give the Dice value
    and the parameter gradients of one process on the 4 images (``sync_batch``, the default), plain and squared /
    Jaccard Dice alike; without the sync each rank's Dice covers its own 2 images and the gradient differs. The
    one-process reference is MONAI's ``DiceLoss(batch=True)`` through the loss."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/ddp.pt"
        mp.start_processes(_ddp_loss_worker, args=(f"{tmp}/init", out), nprocs=2, join=True, start_method="spawn")
        results = torch.load(out, weights_only=False)
    for name, kwargs in _DDP_CASES.items():
        net, x, y = _ddp_batch()
        loss_fn = WeightedDiceBCELoss(background_weight=0.1, batch=True, **kwargs)
        parts = loss_fn.components(net(x), y)
        reference = DiceLoss(sigmoid=True, batch=True, **kwargs)(net(x), y)
        assert parts["dice"].item() == pytest.approx(reference.item(), rel=1e-6)
        parts["total"].backward()
        grads = [p.grad for p in net.parameters()]
        synced, unsynced = results[(name, True)], results[(name, False)]
        assert synced["dice"] == pytest.approx(parts["dice"].item(), rel=1e-5)
        for g_ddp, g in zip(synced["grads"], grads):
            torch.testing.assert_close(g_ddp, g, rtol=1e-4, atol=1e-6)
        assert unsynced["dice"] != pytest.approx(parts["dice"].item(), rel=1e-3)
        assert max((a - b).abs().max().item() for a, b in zip(unsynced["grads"], grads)) > 1e-3

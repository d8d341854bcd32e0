"""Grad-CAM for segmentation networks: an analytic case, MONAI's GradCAM, a trained SegResNet, and saving."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bundle.explain.gradcam import (
    SegmentationGradCAM,
    SegmentationScore,
    box_to_mask,
    default_target_layer,
    gradcam_overlay,
    gradcam_segmentation,
    save_gradcam,
)


def _two_layer_net(seed: int = 0) -> nn.Module:
    """A 1x1 conv 'feature' layer (2 -> 3 channels) and a 1x1 conv head (3 -> 2 structures)."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(feature=nn.Conv2d(2, 3, 1), head=nn.Conv2d(3, 2, 1)))


def test_known_answer_two_layer_net():
    net = _two_layer_net().double()
    x = torch.randn(2, 2, 6, 8, dtype=torch.float64)
    a = net.feature(x).detach()  # (B, K, H, W)
    logits = net(x).detach()
    w_head = net.head.weight.detach()[:, :, 0, 0]  # (C, K)
    b_head = net.head.bias.detach()
    regions = torch.from_numpy(box_to_mask([(1, 2, 4, 7), (0, 0, 6, 3)], (6, 8)))
    area = regions.flatten(1).sum(1).double() / (6 * 8)  # |M_c| / (H W)

    cam = SegmentationGradCAM(net, "feature", normalize=None)
    got = cam(x, regions=regions)
    # dS_c/dA_k(p) = w_ck 1[p in M_c]  ->  weights = w_ck |M_c|/(HW)  ->  ReLU(sum_k weights A_k)
    expected = F.relu(torch.einsum("ck,bkhw->bchw", w_head * area[:, None], a))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cam.scores, (logits * regions).flatten(2).sum(-1))
    np.testing.assert_allclose(cam.weight_ratio.numpy(), np.ones((2, 2)))  # spatially constant gradients

    # HiResCAM: ReLU(sum_k w_ck 1[p in M_c] A_k(p)) = ReLU(logit_c - bias_c) inside M_c, 0 outside
    hires = SegmentationGradCAM(net, "feature", normalize=None, mode="hirescam")(x, regions=regions)
    torch.testing.assert_close(hires, F.relu(logits - b_head.view(1, -1, 1, 1)) * regions, rtol=1e-12, atol=1e-12)

    # predicted masks (sigmoid > threshold) as regions, one structure only, and min-max normalisation
    thr = 0.4
    pred = torch.sigmoid(logits[:, 1:2]) > thr
    assert pred.any() and not pred.all()
    got1 = SegmentationGradCAM(net, "feature", threshold=thr)(x, structures=[1])
    area1 = pred.flatten(2).double().mean(-1)  # (B, 1)
    raw = F.relu(torch.einsum("k,bkhw->bhw", w_head[1], a)[:, None] * area1[..., None, None])
    lo, hi = raw.amin((2, 3), keepdim=True), raw.amax((2, 3), keepdim=True)
    torch.testing.assert_close(got1, (raw - lo) / (hi - lo), rtol=1e-10, atol=1e-10)
    assert got1.shape == (2, 1, 6, 8) and float(got1.min()) == 0.0 and float(got1.max()) == 1.0


def test_monai_gradcam_agrees():
    from monai.networks.nets import SegResNet, UNet
    from monai.visualize import GradCAM

    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    regions = torch.from_numpy(box_to_mask([(4, 4, 16, 14), (18, 16, 30, 30)], (32, 32)))
    nets = {
        "segresnet": (SegResNet(spatial_dims=2, in_channels=1, out_channels=2, init_filters=8,
                                blocks_down=(1, 2, 2), blocks_up=(1, 1), norm="BATCH"),
                      ["down_layers.2", "up_layers.0", "up_layers.1"]),
        "unet": (UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                      num_res_units=1), ["model.1", "model.2.0"]),
    }
    for name, (net, layers) in nets.items():
        net.train()  # our call and MONAI's must both run in eval mode and restore the mode
        for layer in layers:
            ours_obj = SegmentationGradCAM(net, layer, normalize=None)
            ours = ours_obj(x, regions=regions)
            assert net.training, "the network's mode must be restored"
            wrapper = SegmentationScore(net, regions)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                monai_cam = GradCAM(nn_module=wrapper, target_layers=f"net.{layer}", postprocessing=lambda t: t)
                theirs = torch.cat([monai_cam(x, class_idx=c) for c in range(2)], 1)
            assert float(ours.max()) > 1e-3, f"{name} {layer}: a trivial all-zero map would not test anything"
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6 * float(ours.max()))
            assert ours.shape == (2, 2, 32, 32)
    assert default_target_layer(nets["segresnet"][0]) == "up_layers.1"
    assert default_target_layer(nets["unet"][0]) == "model.2.0"


def _half_images(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel 0: bright discs, only in the left half; channel 1: dark discs, only in the right half."""
    g = np.random.default_rng(seed)
    x = g.normal(0, 0.1, (n, 1, size, size)).astype(np.float32)
    y = np.zeros((n, 2, size, size), np.float32)
    yy, xx = np.mgrid[:size, :size]
    half = size // 2
    for i in range(n):
        for ch, (lo, hi), sign in ((0, (3, half - 3), 1.0), (1, (half + 3, size - 3), -1.0)):
            for _ in range(2):
                r, c, rad = g.integers(4, size - 4), g.integers(lo, hi), g.integers(2, 4)
                disc = (yy - r) ** 2 + (xx - c) ** 2 <= rad**2
                x[i, 0][disc] += sign
                y[i, ch][disc] = 1
    return torch.from_numpy(x), torch.from_numpy(y)


def test_trained_segresnet_heatmap_on_the_right_half(one_thread):
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    x, y = _half_images(64, 0)
    net = SegResNet(spatial_dims=2, in_channels=1, out_channels=2, init_filters=8, blocks_down=(1, 1), blocks_up=(1,))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, 64, (8,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = _half_images(6, 1)
    net.eval()
    with torch.no_grad():
        pred = torch.sigmoid(net(xt)) > 0.5
    dsc = 2 * (pred & (yt > 0)).sum((0, 2, 3)) / (pred.sum((0, 2, 3)) + yt.sum((0, 2, 3)))
    assert (dsc > 0.9).all(), f"the tiny SegResNet did not learn the task (Dice {dsc.tolist()})"

    def left_fraction(cam: torch.Tensor) -> torch.Tensor:
        return cam[..., :16].sum((-2, -1)) / cam.sum((-2, -1))

    # Grad-CAM after the last normalisation (the ReLU feeding the 1x1 head)
    gc = SegmentationGradCAM(net, "act_mod")
    frac = left_fraction(gc(xt))
    assert (frac[:, 0] > 0.9).all() and (frac[:, 1] < 0.1).all(), frac
    # ... where it is known: ReLU(|M_c|/(HW) * (logit_c - bias_c))
    raw = SegmentationGradCAM(net, "act_mod", normalize=None)(xt)
    bias = net.conv_final[2].conv.bias.detach().view(1, -1, 1, 1)
    area = gc.masks.flatten(2).float().mean(-1)[..., None, None]
    torch.testing.assert_close(raw, F.relu(area * (gc.logits - bias)), rtol=1e-4, atol=1e-5)
    # HiResCAM at the last decoder block
    frac = left_fraction(gradcam_segmentation(net, xt[0], "up_layers.0", mode="hirescam"))
    assert frac[0] > 0.8 and frac[1] < 0.2, frac
    frac = left_fraction(SegmentationGradCAM(net, "up_layers.0", mode="hirescam")(xt))
    assert (frac[:, 0] > 0.8).all() and (frac[:, 1] < 0.2).all(), frac
    # classic Grad-CAM at the last decoder block: the GroupNorm of conv_final (one channel per group) makes the
    # score shift-invariant per channel, so the weights vanish and a warning says so
    gc = SegmentationGradCAM(net, "up_layers.0")
    with pytest.warns(RuntimeWarning, match="weights vanish"):
        gc(xt)
    assert (gc.weight_ratio < 1e-3).all()


def test_regions_softmax_empty_and_errors():
    net = _two_layer_net()
    x = torch.randn(1, 2, 6, 8)
    # an empty region gives an all-zero map (no NaN), also after normalisation
    regions = np.zeros((2, 6, 8), bool)
    regions[0, 2:4, 2:4] = True
    out = gradcam_segmentation(net, x[0], "feature", regions=regions)
    assert out.shape == (2, 6, 8) and out.dtype == np.float32
    assert np.isfinite(out).all() and not out[1].any() and out[0].max() == pytest.approx(1.0)
    # softmax: regions are the argmax of the logits
    cam = SegmentationGradCAM(net, "feature", activation="softmax")
    cam(x)
    np.testing.assert_array_equal(cam.masks[0, 0].numpy(), (net(x).argmax(1)[0] == 0).numpy())
    # works inside torch.inference_mode() / no_grad(), as evaluation code often runs
    with torch.inference_mode():
        inside = SegmentationGradCAM(net, "feature", normalize=None)(x, regions=regions)
    torch.testing.assert_close(inside, SegmentationGradCAM(net, "feature", normalize=None)(x, regions=regions))
    # a frozen network still gets gradients (the input requires grad)
    for p in net.parameters():
        p.requires_grad_(False)
    assert SegmentationGradCAM(net, "feature", normalize=None)(x, regions=regions).abs().sum() > 0
    with pytest.raises(ValueError, match="not found"):
        SegmentationGradCAM(net, "nope")
    with pytest.raises(ValueError, match="regions must have shape"):
        SegmentationGradCAM(net, "feature")(x, regions=np.ones((3, 6, 8)))
    with pytest.raises(ValueError, match="out of range"):
        SegmentationGradCAM(net, "feature")(x, structures=[5])
    np.testing.assert_array_equal(box_to_mask([(1, 1, 3, 4)], (4, 5))[0].sum(), 6)


def test_colormap_overlay_and_save(tmp_path):
    from PIL import Image

    from bundle.visualize import colormap

    jet = colormap(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]))   # matplotlib's jet: dark blue .. green .. dark red, clipped
    np.testing.assert_allclose(jet[[0, 1, 3, 4]], [[0, 0, 0.5], [0, 0, 0.5], [0.5, 0, 0], [0.5, 0, 0]], atol=0.01)
    assert jet[2, 1] > 0.9 and jet[2, 1] > jet[2, 0] and jet[2, 1] > jet[2, 2]
    img = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    heat = np.zeros((2, 8, 8), np.float32)
    heat[0, 2:5, 2:5] = 1.0
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:7, 1:7] = True
    ov = gradcam_overlay(img, heat[0], masks[0], contour_color=(0, 255, 0))
    assert ov.shape == (8, 8, 3) and ov.dtype == np.uint8
    assert tuple(ov[1, 3]) == (0, 255, 0) and tuple(ov[3, 3]) != (0, 255, 0)  # outline only
    assert ov[3, 3, 0] > ov[3, 3, 2]  # hot = red in the heated area
    paths = save_gradcam(tmp_path / "sub" / "case.1", heat, img, masks, ["left lung", "heart"])
    assert set(paths) == {"npy", "left lung", "heart"}
    np.testing.assert_array_equal(np.load(paths["npy"]), heat)
    assert paths["left lung"].endswith("case.1_left_lung.png")
    with Image.open(paths["left lung"]) as im:
        np.testing.assert_array_equal(np.asarray(im), gradcam_overlay(img, heat[0], masks[0]))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "case.1.npy", "case.1_heart.png", "case.1_left_lung.png"]  # no temporary files left
    with pytest.raises(ValueError, match="structure names"):
        save_gradcam(tmp_path / "x", heat, img, structures=["a"])


def test_explaining_leaves_the_network_as_it_was():
    """MONAI's CAM classes register hooks for good and switch ``inplace`` off: both are undone after each call."""
    net = _two_layer_net()
    net.feature.add_module("act", torch.nn.ReLU(inplace=True)) if isinstance(net.feature, torch.nn.Sequential) else None
    hooks = lambda: sum(len(m._forward_hooks) + len(m._backward_hooks) for m in net.modules())  # noqa: E731
    inplace = {n: m.inplace for n, m in net.named_modules() if hasattr(m, "inplace")}
    x = torch.randn(1, 2, 6, 8)
    for mode in ("gradcam", "hirescam"):
        for _ in range(3):
            SegmentationGradCAM(net, "feature", mode=mode)(x)
    assert hooks() == 0
    assert {n: m.inplace for n, m in net.named_modules() if hasattr(m, "inplace")} == inplace

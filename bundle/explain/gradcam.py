"""Grad-CAM for segmentation networks (the visual explanations of Ghosal and Shah, arXiv:2011.05791).

Grad-CAM (Selvaraju et al., arXiv:1610.02391) explains a scalar score through the activations ``A`` (``K``
channels) of a chosen layer: ``weights_k = mean_{u,v} dS/dA_k(u,v)``, ``map = ReLU(sum_k weights_k A_k)``. For a
segmentation network with logits ``y`` of shape ``(C, H, W)``, the score of structure ``c`` is the sum of its logits
over a region ``M_c``:

    ``S_c = sum_{(i,j) in M_c} y_c(i, j)``

where ``M_c`` is by default the predicted mask of ``c`` (``sigmoid(y_c) > threshold`` for multi-label outputs, or
``argmax_k y_k == c`` with ``activation="softmax"``), or a region the user gives (a mask or a box, see
:func:`box_to_mask`). When ``M_c`` is empty the score is 0, its gradient is 0 and the heatmap is all zeros.
The map is upsampled to the input size (bilinear, ``align_corners=False``, as MONAI's ``default_upsampler``) and
normalised per structure to ``[0, 1]`` (``"minmax"``: ``(m - min) / (max - min)``, an all-constant map becomes 0;
``"max"``: ``m / max``; ``None``: raw).

With ``mode="hirescam"`` (Draelos and Carin, arXiv:2011.08891) the gradient is not averaged:
``map = ReLU(sum_k dS/dA_k(u,v) * A_k(u,v))``. For the last layer before a 1x1 head both modes give
``ReLU(y_c - bias_c)`` up to a factor (inside ``M_c`` for HiResCAM).

Grad-CAM weights vanish after per-channel spatial normalisation: if the layer reaches the logits only through an
InstanceNorm, or a GroupNorm with one channel per group (MONAI's ``SegResNet`` with ``init_filters=8`` and its default
8 groups ends in such a GroupNorm, ``conv_final.0``; MONAI's ``UNet`` uses InstanceNorm), adding a constant to an
activation channel does not change the score, so ``sum_{u,v} dS/dA_k(u,v) = 0``: the weights are 0 up to rounding
and zero-padding border effects and the Grad-CAM map is noise. :class:`SegmentationGradCAM` measures this
(``weight_ratio``) and warns; use ``mode="hirescam"`` or a layer after the last normalisation (SegResNet:
``"act_mod"``, the ReLU of ``conv_final``; UNet: ``"model.2.0"``).

The maps are computed by MONAI's :class:`monai.visualize.GradCAM` (and :class:`HiResCAM`, its ``compute_map``
without the averaging) applied to :class:`SegmentationScore` (the network wrapped so that it outputs one score per
structure), with ``postprocessing`` set to the identity (MONAI's default normaliser maps the maximum to 0); the hooks
MONAI registers are removed after each call, so explaining a network leaves it as it was.

Layers are named as in ``net.named_modules()``: for MONAI's ``SegResNet`` e.g. ``"down_layers.2"`` (encoder) or
``"up_layers.0"`` ... ``"up_layers.<last>"`` (decoder; the last is at full resolution); for MONAI's ``UNet``
``"model.0"`` (first encoder block), ``"model.1"`` (everything below the first level, concatenated with its skip
input) or ``"model.2.0"`` (the last up-sampling convolution, full resolution). :func:`default_target_layer` picks one.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from torch import nn

from ..utils import PathLike, atomic_save
from ..visualize import colormap

__all__ = [
    "HiResCAM",
    "gradcam_maps",
    "SegmentationGradCAM",
    "SegmentationScore",
    "box_to_mask",
    "default_target_layer",
    "gradcam_segmentation",
    "gradcam_overlay",
    "save_gradcam",
]

Normalize = Literal["minmax", "max"] | None
Mode = Literal["gradcam", "hirescam"]

#: Below this ratio ``sum_k |mean_p g_k| / sum_k mean_p |g_k|`` the Grad-CAM weights are considered to vanish.
VANISHING_WEIGHT_RATIO = 1e-3


def box_to_mask(boxes: Sequence[Sequence[int]], shape: Sequence[int]) -> np.ndarray:
    """Boolean masks ``(len(boxes), H, W)`` from boxes ``(row0, col0, row1, col1)`` (half-open, pixel indices)."""
    h, w = int(shape[-2]), int(shape[-1])
    out = np.zeros((len(boxes), h, w), dtype=bool)
    for k, box in enumerate(boxes):
        if len(box) != 4:
            raise ValueError(f"a box is (row0, col0, row1, col1), got {box}")
        r0, c0, r1, c1 = (int(v) for v in box)
        out[k, max(r0, 0):min(r1, h), max(c0, 0):min(c1, w)] = True
    return out


def default_target_layer(net: nn.Module) -> str:
    """A default layer for MONAI's ``SegResNet`` (the last decoder block, ``up_layers.<last>``, full resolution;
    with GroupNorm of one channel per group use ``mode="hirescam"`` there, see the module docstring) and ``UNet``
    (``"model.2.0"``, the last up-sampling convolution with its norm and activation, or ``"model.1"`` when the top
    level is a bare convolution)."""
    names = dict(net.named_modules())
    if "up_layers.0" in names and hasattr(net, "up_layers"):
        return f"up_layers.{len(net.up_layers) - 1}"  # type: ignore[arg-type]
    if "model.2.0" in names:
        return "model.2.0"
    if "model.1" in names:
        return "model.1"
    raise ValueError(f"no default Grad-CAM layer for {type(net).__name__}: pass target_layer (one of "
                     f"{[n for n in names if n][:20]} ...)")


def _find_module(net: nn.Module, name: str) -> nn.Module:
    for n, m in net.named_modules(remove_duplicate=False):  # aliases too (SegResNet: act_mod = conv_final.1)
        if n == name:
            return m
    candidates = [n for n, _ in net.named_modules() if n]
    raise ValueError(f"layer {name!r} not found in {type(net).__name__}; layers are e.g. {candidates[:30]}")


def _normalize(maps: torch.Tensor, mode: Normalize) -> torch.Tensor:
    """Per-map normalisation over the last two dims."""
    if mode is None:
        return maps
    flat = maps.flatten(-2)
    hi = flat.max(-1).values[..., None, None]
    if mode == "max":
        return torch.where(hi > 0, maps / torch.where(hi > 0, hi, torch.ones_like(hi)), torch.zeros_like(maps))
    if mode == "minmax":
        lo = flat.min(-1).values[..., None, None]
        rng = hi - lo
        return torch.where(rng > 0, (maps - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                           torch.zeros_like(maps))
    raise ValueError(f"normalize must be 'minmax', 'max' or None, got {mode!r}")


class SegmentationScore(nn.Module):
    """Wrap a segmentation network so that it outputs one score per structure, ``(B, C)``: the sum of each
    channel's logits over fixed regions (``(C, H, W)`` or ``(B, C, H, W)``, 0/1). With this wrapper any
    classification explainer (e.g. :class:`monai.visualize.GradCAM`, with layer names prefixed by ``"net."``)
    explains the segmentation score of :class:`SegmentationGradCAM`.
    """

    def __init__(self, net: nn.Module, regions: torch.Tensor | np.ndarray):
        super().__init__()
        self.net = net
        self.register_buffer("regions", torch.as_tensor(np.asarray(regions, dtype=np.float32)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        regions = self.regions.to(logits.dtype)
        if regions.ndim == 3:
            regions = regions[None]
        return (logits * regions).flatten(2).sum(-1)


class SegmentationGradCAM:
    """Grad-CAM per structure for a 2-D segmentation network (see the module docstring for the definition).

    Args:
        net: a network mapping ``(B, C_in, H, W)`` to logits ``(B, C, H', W')`` (MONAI ``SegResNet``, ``UNet`` ...).
        target_layer: name of the module whose output activations are explained (``net.named_modules()``);
            default: :func:`default_target_layer`. If the module runs several times in one forward pass, the last
            call is used.
        threshold: probability threshold of the predicted masks (``activation="sigmoid"``).
        activation: ``"sigmoid"`` (multi-label outputs, the bundle's convention) or ``"softmax"`` (mutually
            exclusive classes: ``M_c = argmax == c``).
        normalize: ``"minmax"`` (default), ``"max"`` or ``None``.
        mode: ``"gradcam"`` (default; channel weights = spatially averaged gradients) or ``"hirescam"``
            (element-wise ``ReLU(sum_k dS/dA_k * A_k)``, Draelos and Carin, arXiv:2011.08891; no averaging).
        warn_vanishing: warn (``RuntimeWarning``) when the Grad-CAM weights vanish (see below).

    Vanishing weights: when the layer reaches the logits only through a normalisation over space per channel
    (InstanceNorm, or GroupNorm with one channel per group, as in the final block of MONAI's ``SegResNet`` with
    ``init_filters=8`` and 8 groups), the score does not change when a constant is added to an activation channel,
    so ``sum_p dS/dA_k(p) = 0`` and the Grad-CAM weights are 0 up to rounding (and zero-padding border effects):
    the map is noise. ``self.weight_ratio`` (``(B, S)``, ``sum_k |mean_p g_k| / sum_k mean_p |g_k|``, NaN for an
    empty region) measures it; below ``VANISHING_WEIGHT_RATIO`` a warning suggests ``mode="hirescam"``, or a layer
    after the last normalisation (SegResNet: ``"act_mod"``, the ReLU of ``conv_final``).

    After a call, ``self.masks`` (``(B, S, H', W')`` bool, the regions used), ``self.scores`` (``(B, S)``) and
    ``self.logits`` hold the intermediate results. The network is run in ``eval()`` mode and put back in its mode.
    """

    def __init__(
        self,
        net: nn.Module,
        target_layer: str | None = None,
        threshold: float = 0.5,
        activation: Literal["sigmoid", "softmax"] = "sigmoid",
        normalize: Normalize = "minmax",
        mode: Mode = "gradcam",
        warn_vanishing: bool = True,
    ):
        if mode not in ("gradcam", "hirescam"):
            raise ValueError(f"mode must be 'gradcam' or 'hirescam', got {mode!r}")
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
        self.net = net
        self.target_layer = target_layer or default_target_layer(net)
        self.layer = _find_module(net, self.target_layer)
        self.threshold = float(threshold)
        self.activation = activation
        self.normalize = normalize
        self.mode = mode
        self.warn_vanishing = warn_vanishing
        self.weight_ratio: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def _predicted_masks(self, logits: torch.Tensor, structures: Sequence[int]) -> torch.Tensor:
        if self.activation == "sigmoid":
            return torch.sigmoid(logits[:, list(structures)]) > self.threshold
        winner = logits.argmax(1, keepdim=True)
        idx = torch.as_tensor(list(structures), device=logits.device).view(1, -1, 1, 1)
        return winner == idx

    def __call__(
        self,
        x: torch.Tensor,
        structures: Sequence[int] | None = None,
        regions: torch.Tensor | np.ndarray | None = None,
    ) -> torch.Tensor:
        """Grad-CAM maps for input ``x`` ``(B, C_in, H, W)`` (or one image ``(C_in, H, W)``).

        Args:
            x: input batch.
            structures: output channels to explain (default: all).
            regions: optional regions ``M_c`` for the scores, ``(S, H', W')`` or ``(B, S, H', W')`` (0/1 or bool,
                one per structure in ``structures``, at the logits' resolution); default: the predicted masks.

        Returns:
            ``(B, S, H, W)`` float tensor (``(S, H, W)`` for one unbatched image), detached, on ``x``'s device.
        """
        unbatched = x.ndim == 3
        if unbatched:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"expected input (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
        training = self.net.training
        layer = "net." + self.target_layer
        try:
            self.net.eval()
            with torch.inference_mode(False), torch.enable_grad(), _temporary_hooks(self.net):
                inp = x.detach().clone().requires_grad_(True)  # so a frozen network still builds a graph
                with torch.no_grad():
                    logits = self.net(inp)
                if logits.ndim != 4:
                    raise ValueError(f"expected 2-D segmentation logits (B, C, H, W), got {tuple(logits.shape)}")
                structs = list(range(logits.shape[1])) if structures is None else [int(s) for s in structures]
                if not structs:
                    raise ValueError("structures must name at least one output channel")
                if any(not 0 <= s < logits.shape[1] for s in structs):
                    raise ValueError(f"structures {structs} out of range for {logits.shape[1]} output channels")
                masks = self._regions(logits, structs, regions)
                full = torch.zeros_like(logits)
                full[:, structs] = masks.to(logits.dtype)
                # MONAI's GradCAM (or its HiResCAM variant) on the score network: one score per output channel
                explainer = (GradCAM if self.mode == "gradcam" else HiResCAM)(
                    nn_module=SegmentationScore(self.net, full), target_layers=layer, postprocessing=_identity)
                cams, ratios = [], []
                for s in structs:
                    cams.append(explainer.compute_map(inp, class_idx=s)[:, 0])  # (B, h, w)
                    ratios.append(_weight_ratio(explainer.nn_module.gradients[layer]))
            cam = torch.stack(cams, 1).detach()
            ratio = torch.stack(ratios, 1)
            if cam.shape[-2:] != x.shape[-2:]:
                cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
            cam = _normalize(cam, self.normalize)
        finally:
            self.net.train(training)
        sel = logits[:, structs]
        self.masks, self.logits = masks.detach(), logits.detach()
        self.scores = (sel * masks.to(sel.dtype)).flatten(2).sum(-1)
        self.weight_ratio = ratio.detach()
        if self.mode == "gradcam" and self.warn_vanishing:
            low = ratio < VANISHING_WEIGHT_RATIO  # NaN (empty region) compares False
            if bool(low.any()):
                bad = sorted({structs[j] for j in torch.nonzero(low)[:, 1].tolist()})
                warnings.warn(
                    f"Grad-CAM weights vanish at layer {self.target_layer!r} for structures {bad} (ratio "
                    f"{float(ratio[low].max()):.1e}): the score is invariant to per-channel shifts of this layer "
                    "(instance/group normalisation downstream), so the map is noise; use mode='hirescam' or a layer "
                    "after the last normalisation", RuntimeWarning, stacklevel=2)
        return cam[0] if unbatched else cam

    def _regions(self, logits: torch.Tensor, structs: list[int],
                 regions: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        """The score regions ``(B, S, h, w)`` (bool): the predicted masks, or ``regions`` checked and broadcast."""
        if regions is None:
            return self._predicted_masks(logits.detach(), structs)
        masks = torch.as_tensor(np.asarray(regions) if not isinstance(regions, torch.Tensor) else regions)
        masks = masks.to(logits.device) != 0
        if masks.ndim == 3:
            masks = masks[None].expand(logits.shape[0], -1, -1, -1)
        want = (logits.shape[0], len(structs), *logits.shape[2:])
        if tuple(masks.shape) != want:
            raise ValueError(f"regions must have shape {want[1:]} or {want}, got {tuple(masks.shape)}")
        return masks


class HiResCAM(GradCAM):
    """HiResCAM (Draelos and Carin, arXiv:2011.08891) as MONAI's :class:`monai.visualize.GradCAM` without the spatial
    averaging of the gradients: ``map = ReLU(sum_k dS/dA_k(u, v) * A_k(u, v))``."""

    def compute_map(self, x: torch.Tensor, class_idx: int | None = None, retain_graph: bool = False,
                    layer_idx: int = -1, **kwargs: Any) -> torch.Tensor:
        _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        return F.relu((grad[layer_idx] * acti[layer_idx]).sum(1, keepdim=True))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _weight_ratio(grad: torch.Tensor) -> torch.Tensor:
    """``sum_k |mean_p g_k| / sum_k mean_p |g_k|`` per image (NaN where the gradient is all zero: empty region)."""
    weights = grad.detach().flatten(2).mean(-1)  # (B, K)
    scale = grad.detach().abs().flatten(2).mean(-1).sum(1)  # (B,)
    return torch.where(scale > 0, weights.abs().sum(1) / torch.where(scale > 0, scale, 1.0),
                       torch.full_like(scale, float("nan")))


@contextlib.contextmanager
def _temporary_hooks(net: nn.Module) -> Iterator[None]:
    """Remove, on exit, the forward/backward hooks registered on ``net``'s modules inside the block (MONAI's CAM
    classes register theirs for good), and restore the ``inplace`` flags MONAI switches off."""
    before = {m: (set(m._forward_hooks), set(m._backward_hooks), m.__dict__.get("inplace")) for m in net.modules()}
    try:
        yield
    finally:
        for module, (fwd, bwd, inplace) in before.items():
            for key in set(module._forward_hooks) - fwd:
                del module._forward_hooks[key]
            for key in set(module._backward_hooks) - bwd:
                del module._backward_hooks[key]
            if inplace is not None:
                module.__dict__["inplace"] = inplace


def gradcam_maps(classifier: torch.nn.Module, layer: str, images: torch.Tensor,
                 targets: list[list[int]], num_classes: int) -> torch.Tensor:
    """``(B, K, H, W)`` Grad-CAM maps (MONAI's :class:`~monai.visualize.GradCAM`) of ``classifier`` for each image's
    targets (zero elsewhere), un-normalised: ReLU of the gradient-weighted activations of ``layer``, upsampled to
    the image size. MONAI's default post-processing is replaced by the identity, because it *flips* magnitudes
    (it maps (min, max) to (1, 0), a display convention): the DoLL post-processing normalises the maps itself."""
    from monai.visualize import GradCAM

    cam = GradCAM(nn_module=classifier, target_layers=layer, postprocessing=lambda x: x)
    b, _, h, w = images.shape
    out = torch.zeros((b, num_classes, h, w))
    with torch.enable_grad():
        for i, row in enumerate(targets):
            for c in row:
                out[i, c] = cam(images[i: i + 1], class_idx=c)[0, 0].detach().float().cpu()
    return out


def gradcam_segmentation(
    net: nn.Module,
    image: torch.Tensor | np.ndarray,
    target_layer: str | None = None,
    structures: Sequence[int] | None = None,
    regions: torch.Tensor | np.ndarray | None = None,
    threshold: float = 0.5,
    activation: Literal["sigmoid", "softmax"] = "sigmoid",
    normalize: Normalize = "minmax",
    mode: Mode = "gradcam",
) -> np.ndarray:
    """Grad-CAM heatmaps of one image as a float32 numpy array ``(S, H, W)`` (see :class:`SegmentationGradCAM`).

    Args:
        net: the segmentation network (its device is used).
        image: ``(H, W)`` or ``(C_in, H, W)`` image (numpy or torch).
        target_layer: layer name (default: :func:`default_target_layer`).
        structures: output channels to explain (default: all).
        regions: optional score regions ``(S, H, W)`` (masks, or :func:`box_to_mask` of boxes).
        threshold: predicted-mask probability threshold.
        activation: ``"sigmoid"`` or ``"softmax"``.
        normalize: ``"minmax"``, ``"max"`` or ``None``.
        mode: ``"gradcam"`` or ``"hirescam"`` (see :class:`SegmentationGradCAM`).
    """
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image, dtype=torch.float32)
    if x.ndim == 2:
        x = x[None]
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    cam = SegmentationGradCAM(net, target_layer, threshold=threshold, activation=activation, normalize=normalize,
                              mode=mode)
    return cam(x.to(device), structures=structures, regions=regions).cpu().numpy().astype(np.float32)


def gradcam_overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    mask: np.ndarray | None = None,
    alpha: float = 0.45,
    contour_color: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    """RGB uint8 overlay ``(H, W, 3)``: the grey image (min-max scaled), blended with the jet-coloured heatmap
    (``(1 - alpha) * image + alpha * jet(heatmap)``), and the outline of ``mask`` drawn in ``contour_color``."""
    from scipy.ndimage import binary_erosion

    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[0] if img.shape[0] in (1, 3) else img[..., 0]
    heat = np.asarray(heatmap, dtype=np.float64)
    if img.shape != heat.shape:
        raise ValueError(f"image {img.shape} and heatmap {heat.shape} must have the same (H, W) shape")
    lo, hi = float(img.min()), float(img.max())
    grey = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    rgb = (1.0 - alpha) * grey[..., None] + alpha * colormap(heat, "jet")
    out = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    if mask is not None:
        m = np.asarray(mask) != 0
        if m.shape != heat.shape:
            raise ValueError(f"mask {m.shape} and heatmap {heat.shape} must have the same shape")
        edge = m & ~binary_erosion(m, border_value=0)
        out[edge] = np.asarray(contour_color, dtype=np.uint8)
    return out


def save_gradcam(
    path_prefix: PathLike,
    heatmaps: np.ndarray,
    image: np.ndarray,
    masks: np.ndarray | None = None,
    structures: Sequence[str] | None = None,
    alpha: float = 0.45,
) -> dict[str, str]:
    """Save Grad-CAM heatmaps ``(S, H, W)`` as ``<prefix>.npy`` and one overlay PNG per structure,
    ``<prefix>_<structure>.png`` (spaces in names become ``_``), every file written atomically.

    Args:
        path_prefix: output path without extension, e.g. ``out/gradcam/JPCLN001``.
        heatmaps: ``(S, H, W)`` maps in ``[0, 1]``.
        image: the input image ``(H, W)`` (or ``(1, H, W)``).
        masks: optional ``(S, H, W)`` masks whose outlines are drawn (e.g. the predicted masks).
        structures: names used in the PNG file names (default ``0, 1, ...``).
        alpha: heatmap opacity.

    Returns:
        ``{"npy": path, <structure>: png path, ...}``.
    """
    from ..data.io import save_png

    heat = np.asarray(heatmaps, dtype=np.float32)
    if heat.ndim == 2:
        heat = heat[None]
    if heat.ndim != 3:
        raise ValueError(f"heatmaps must be (S, H, W), got {heat.shape}")
    names = [str(i) for i in range(heat.shape[0])] if structures is None else [str(s) for s in structures]
    if len(names) != heat.shape[0]:
        raise ValueError(f"{len(names)} structure names for {heat.shape[0]} heatmaps")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.shape != heat.shape:
            raise ValueError(f"masks {masks.shape} and heatmaps {heat.shape} must have the same shape")
    prefix = os.fspath(path_prefix)
    out = {"npy": prefix + ".npy"}
    def write_npy(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to some names
            np.save(f, heat)

    atomic_save(out["npy"], write_npy)
    for k, name in enumerate(names):
        png = f"{prefix}_{name.replace(' ', '_').replace(os.sep, '_')}.png"
        save_png(png, gradcam_overlay(image, heat[k], None if masks is None else masks[k], alpha=alpha))
        out[name] = png
    return out

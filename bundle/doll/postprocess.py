"""Explanation maps to masks: the post-processing steps of the DoLL recipe, one function each.

All functions take and return torch tensors shaped ``(N, H, W)`` (a stack of maps), on any device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def positive_evidence(maps: torch.Tensor) -> torch.Tensor:
    """Keep the evidence for the class (positive attributions), summed over input channels when ``(N, C, H, W)``."""
    if maps.dim() == 4:
        maps = maps.sum(1)
    return maps.clamp_min(0)


def gaussian_smooth(maps: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, H, W)`` maps (``sigma`` in pixels, reflect padding; 0 = no-op).
    ``sigma`` is one number or one per map (``(N,)``: the maps of each value are smoothed together)."""
    if isinstance(sigma, torch.Tensor) and sigma.numel() > 1:
        sigmas = sigma.flatten().cpu()
        if sigmas.numel() != maps.shape[0]:
            raise ValueError(f"smoothing sigma: one number or one per map ({maps.shape[0]}), got {sigmas.numel()}")
        out = maps.clone()
        for value in torch.unique(sigmas).tolist():
            rows = torch.nonzero(sigmas == value).view(-1).to(maps.device)
            out[rows] = gaussian_smooth(maps[rows], float(value))
        return out
    sigma = float(sigma)
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = maps.unsqueeze(1)
    pad_h, pad_w = min(radius, maps.shape[-2] - 1), min(radius, maps.shape[-1] - 1)
    out = F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect")
    out = F.conv2d(out, k[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, pad_h, pad_h), mode="reflect")
    out = F.conv2d(out, k[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1))
    return out.squeeze(1)


def rowwise_quantile(flat: torch.Tensor, q: float, max_numel: int = 1 << 24) -> torch.Tensor:
    """``q``-quantile of each row of ``(N, P)`` ``flat`` (``torch.quantile`` per row; rows in chunks of at most
    ``max_numel`` values, ``torch.quantile``'s input limit, so that a batch of many large maps works)."""
    rows = max(1, max_numel // max(1, flat.shape[1]))
    return torch.cat([torch.quantile(flat[i: i + rows], q, dim=1) for i in range(0, flat.shape[0], rows)]) \
        if flat.shape[0] else flat.new_zeros(0)


def normalize_maps(maps: torch.Tensor, mode: str = "max", percentile: float = 99.0, clip: bool = True) -> torch.Tensor:
    """Scale each map by its maximum (``"max"``: to ``[0, 1]``) or its ``percentile`` (``"percentile"``).

    With ``clip`` (the default) the result is clipped to ``[0, 1]``: after ``"percentile"`` the top
    ``100 - percentile`` % of each map is then one plateau at 1, so the map's maximum is a tie of about that many
    pixels (``numpy.argmax`` takes the first in raster order) and a percentile threshold at or above ``percentile``
    keeps only where the plateau is not flat (for one classifier's map: nothing). ``clip=False`` keeps the values above
    1 (negative values still become 0): every map's order is kept, for percentile thresholds and the pointing game."""
    flat = maps.flatten(1)
    if mode == "max":
        scale = flat.max(1).values
    elif mode == "percentile":
        scale = rowwise_quantile(flat.float(), percentile / 100.0).to(maps.dtype)
    else:
        raise ValueError(f"unknown normalisation {mode!r}: use 'max' or 'percentile'")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    out = maps / scale.view(-1, 1, 1)
    return out.clamp(0, 1) if clip else out.clamp_min(0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in ``[0, 1]`` (maximal between-class variance over a ``bins`` histogram)."""
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def threshold_maps(maps: torch.Tensor, method: str = "otsu", value: float | torch.Tensor = 0.5) -> torch.Tensor:
    """Binarise each ``[0, 1]`` map: ``"fixed"`` (``> value``), ``"percentile"`` (above the map's ``value``-th
    percentile, ``value`` in 0-100) or ``"otsu"`` (Otsu's threshold of the map, at least ``value`` when given as a
    floor; pass 0 for pure Otsu). ``value`` is one number or one per map (``(N,)``). All-zero maps give empty
    masks."""
    if method not in ("fixed", "percentile", "otsu"):
        raise ValueError(f"unknown threshold method {method!r}: use 'fixed', 'percentile' or 'otsu'")
    out = torch.zeros_like(maps, dtype=torch.bool)
    if maps.shape[0] == 0:
        return out
    values = torch.as_tensor(value, dtype=torch.float32).flatten().cpu()
    if values.numel() not in (1, maps.shape[0]):
        raise ValueError(f"threshold value: one number or one per map ({maps.shape[0]}), got {values.numel()}")
    values = values.expand(maps.shape[0])
    nonempty = (maps > 0).flatten(1).any(1)
    if method == "fixed":
        return (maps > values.to(maps.device, maps.dtype).view(-1, 1, 1)) & nonempty.view(-1, 1, 1)
    if method == "percentile":  # the maps of one percentile at once (one quantile per map, as map by map)
        t = torch.empty(maps.shape[0], dtype=maps.dtype, device=maps.device)
        for q in torch.unique(values).tolist():
            rows = torch.nonzero(values == q).view(-1).to(maps.device)
            t[rows] = rowwise_quantile(maps[rows].flatten(1).float(), q / 100.0).to(maps.dtype)
        return (maps > t.view(-1, 1, 1)) & nonempty.view(-1, 1, 1)
    for i in torch.nonzero(nonempty.cpu()).view(-1).tolist():
        m = maps[i]
        out[i] = m > max(otsu_threshold(m.detach().cpu().numpy().ravel()), float(values[i]))
    return out


def remove_small_components(masks: torch.Tensor, min_size: int) -> torch.Tensor:
    """Drop 8-connected components smaller than ``min_size`` pixels from each ``(N, H, W)`` boolean mask."""
    if min_size <= 1:
        return masks
    from scipy import ndimage

    out = masks.detach().cpu().numpy().copy()
    structure = np.ones((3, 3), dtype=bool)
    for i in range(out.shape[0]):
        if not out[i].any():
            continue
        labels, n = ndimage.label(out[i], structure=structure)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_size
        keep[0] = False
        out[i] = keep[labels]
    return torch.as_tensor(out, device=masks.device)

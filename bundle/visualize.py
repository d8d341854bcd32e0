"""Small, dependency-light figure helpers: mask overlays and titled image grids (PIL), heatmap colouring."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .data.io import save_png


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A ``[0, 1]`` (or any range) grey image to uint8 (min-max scaled when outside ``[0, 1]``)."""
    img = np.asarray(image, dtype=np.float32)
    if img.min() < 0 or img.max() > 1:
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def contour(mask: np.ndarray) -> np.ndarray:
    """The 1-pixel inner boundary of a boolean mask."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask)


def overlay_rgb(image: np.ndarray, mask: np.ndarray | None = None, color: Sequence[int] = (255, 0, 0),
                alpha: float = 0.4, outline: bool = True) -> np.ndarray:
    """``(H, W, 3)`` uint8: the grey image with ``mask`` blended in ``color`` (and its outline)."""
    grey = to_uint8(image)
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        col = np.asarray(color, dtype=np.float32)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * col
        if outline:
            rgb[contour(m)] = col
    return rgb.astype(np.uint8)


def colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """matplotlib's colour map ``name``: values in ``[0, 1]`` (clipped) -> RGB float ``(..., 3)`` in ``[0, 1]``."""
    import matplotlib

    return np.asarray(matplotlib.colormaps[name](np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)))[..., :3]


def heatmap_rgb(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8: the grey image with a ``[0, 1]`` heatmap blended in matplotlib's jet colour map, each pixel
    by ``alpha`` times its heat."""
    h = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
    colour = colormap(h) * 255
    grey = np.repeat(to_uint8(image)[..., None], 3, axis=-1).astype(np.float32)
    a = alpha * h[..., None]
    return ((1 - a) * grey + a * colour).astype(np.uint8)


def save_grid(tiles: Sequence[np.ndarray], titles: Sequence[str], ncol: int, path: str, tile_size: int = 160,
              title_height: int = 16) -> str:
    """Save ``tiles`` (``(H, W)`` or ``(H, W, 3)`` uint8) as a titled grid PNG (atomically); returns ``path``."""
    from PIL import Image, ImageDraw

    n = len(tiles)
    nrow = max(1, (n + ncol - 1) // ncol)
    canvas = Image.new("RGB", (ncol * tile_size, nrow * (tile_size + title_height)), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    for i, (tile, title) in enumerate(zip(tiles, titles)):
        arr = np.asarray(tile)
        im = Image.fromarray(arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, -1))
        im = im.resize((tile_size, tile_size), Image.NEAREST)
        x, y = (i % ncol) * tile_size, (i // ncol) * (tile_size + title_height)
        canvas.paste(im, (x, y + title_height))
        draw.text((x + 3, y + 2), str(title)[:28], fill=(235, 235, 235))
    save_png(path, np.asarray(canvas))
    return path

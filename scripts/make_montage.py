#!/usr/bin/env python
"""Write ``docs/images/phantom_montage.png``: one phantom per CheXpert observation, a lateral view and a QaTa case.

Each frontal tile shows the phantom with the SCR anatomy contours (lungs green, heart red, clavicles yellow) and
the true lesion mask of its observation in colour (translucent fill and contour). All frontal tiles share the same
patient and pose, so the tiles differ only by the drawn signature. Usage::

    .venv/bin/python scripts/make_montage.py [--out docs/images/phantom_montage.png] [--size 256] [--seed 0]
        [--raw]   # no overlays (to judge the pictures themselves)
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.constants import OBSERVATIONS  # noqa: E402
from bundle.data.io import save_png  # noqa: E402
from bundle.data.phantom import SIGNATURES, draw_frontal, draw_lateral, phantom_rng, sample_anatomy  # noqa: E402

ANATOMY_COLOURS = ((60, 220, 60), (60, 220, 60), (235, 60, 60), (240, 220, 40), (240, 220, 40))
LESION_COLOUR = (255, 80, 255)
INFECTION_COLOUR = (60, 200, 255)


def _edge(mask: np.ndarray) -> np.ndarray:
    """Inner boundary pixels of a binary mask."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _tile(image: np.ndarray, anatomy: np.ndarray | None, lesion: np.ndarray | None, colour: tuple[int, int, int],
          raw: bool) -> np.ndarray:
    rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.float32)[..., None], 3, axis=2)
    if not raw:
        if lesion is not None and lesion.any():
            fill = lesion.astype(bool)
            rgb[fill] = 0.8 * rgb[fill] + 0.2 * np.asarray(colour, np.float32)
        if anatomy is not None:
            for k in range(anatomy.shape[0]):
                rgb[_edge(anatomy[k])] = ANATOMY_COLOURS[k]
        if lesion is not None and lesion.any():
            rgb[_edge(lesion)] = colour
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def make_montage(out: str, size: int = 256, seed: int = 0, raw: bool = False, columns: int = 4) -> str:
    """Draw the tiles and write the montage PNG to ``out`` (atomically); returns ``out``."""
    anatomy = sample_anatomy(phantom_rng(seed, "demo", 0, purpose=1))
    tiles: list[tuple[str, str, np.ndarray]] = []
    normal = draw_frontal(phantom_rng(seed, "demo", 0), size, (), anatomy)
    tiles.append(("No Finding", SIGNATURES["No Finding"], _tile(normal.image, normal.anatomy, None, LESION_COLOUR,
                                                                raw)))
    for k, name in enumerate(OBSERVATIONS[1:], start=1):
        ph = draw_frontal(phantom_rng(seed, "demo", 0), size, [k], anatomy)
        tiles.append((name, SIGNATURES[name], _tile(ph.image, ph.anatomy, ph.lesions[k], LESION_COLOUR, raw)))
    lateral = draw_lateral(phantom_rng(seed, "demo", 0, 1), size, anatomy)
    tiles.append(("Lateral view", "no masks (filtered out)", _tile(lateral, None, None, LESION_COLOUR, raw)))
    qata = draw_frontal(phantom_rng(seed, "demo", 0, 2), size, (), anatomy, infection=True)
    tiles.append(("QaTa-COV19 infection", "peripheral ground-glass", _tile(qata.image, None, qata.infection,
                                                                             INFECTION_COLOUR, raw)))
    font = ImageFont.load_default(size=max(10, size // 18))
    small = ImageFont.load_default(size=max(9, size // 22))
    line = max(10, size // 18) + 3
    head = line * 3 + 2
    rows = (len(tiles) + columns - 1) // columns
    pad = 4
    canvas = Image.new("RGB", (columns * (size + pad) + pad, rows * (size + head + pad) + pad), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    for i, (title, caption, arr) in enumerate(tiles):
        r, c = divmod(i, columns)
        x0, y0 = pad + c * (size + pad), pad + r * (size + head + pad)
        draw.text((x0 + 3, y0 + 1), title, fill=(255, 255, 255), font=font)
        for j, text in enumerate(_wrap(caption, small, size - 6)[:2]):
            draw.text((x0 + 3, y0 + line * (j + 1) + 1), text, fill=(190, 190, 190), font=small)
        canvas.paste(Image.fromarray(arr), (x0, y0 + head))
    save_png(out, np.asarray(canvas))
    return out


def main(argv: list[str] | None = None) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(root, "docs", "images", "phantom_montage.png"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="no overlays")
    args = p.parse_args(argv)
    print(make_montage(args.out, args.size, args.seed, args.raw))


if __name__ == "__main__":
    main()

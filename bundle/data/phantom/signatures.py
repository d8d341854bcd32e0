"""How visible each finding's phantom signature is at a network's input size.

The phantom draws every purpose (anatomy, pose, texture, noise, each lesion) from its own child generator, so the
same generator state drawn with and without one finding differs by that finding's signature alone. Resized as the
network input is (area, as :class:`bundle.transforms.PrepareRadiographd`), the mean absolute difference inside the
finding's true mask, in units of the image's standard deviation, is the signature's contrast against the anatomy a
classifier sees: the upper bound of what an explanation of that finding can localise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from monai.transforms import Resize

from ...constants import NUM_OBSERVATIONS
from .drawing import draw_frontal

__all__ = ["signature_contrast"]


def signature_contrast(finding: int, n: int = 12, draw_size: int = 256, sizes: Sequence[int] = (128, 256),
                       seed: int = 0) -> dict[int, float]:
    """Median over ``n`` phantoms of the mean ``|with - without|`` inside the finding's mask over the image's SD.

    Args:
        finding: index of the observation in :data:`~bundle.constants.OBSERVATIONS` (1-13).
        n: number of phantoms (generator states ``[seed, i]``).
        draw_size: the size the phantom is drawn at (the data stage writes 256 px).
        sizes: network input sizes to resize to (area).
        seed: first entry of every phantom's generator seed.

    Returns:
        ``{size: median contrast}``; NaN for a size where no mask survived the resize.
    """
    if not 1 <= int(finding) < NUM_OBSERVATIONS:
        raise ValueError(f"finding must be an observation index 1-{NUM_OBSERVATIONS - 1} (0 is No Finding), "
                         f"got {finding}")
    resizers = {int(s): Resize((int(s), int(s)), mode="area") for s in sizes}
    per_size: dict[int, list[float]] = {s: [] for s in resizers}
    for i in range(int(n)):
        without = draw_frontal(np.random.default_rng([seed, i]), image_size=draw_size, findings=[])
        with_k = draw_frontal(np.random.default_rng([seed, i]), image_size=draw_size, findings=[finding])
        stack = np.stack([without.image, with_k.image, with_k.lesions[finding]]).astype(np.float32)
        for s, resize in resizers.items():
            a, b, m = np.asarray(resize(stack))
            inside = m >= 0.5
            if inside.any():
                per_size[s].append(float(np.abs(b - a)[inside].mean() / max(float(a.std()), 1e-8)))
    return {s: float(np.median(v)) if v else float("nan") for s, v in per_size.items()}

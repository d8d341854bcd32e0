"""Drawing of the phantom radiographs (see :mod:`bundle.data.phantom`): anatomy, pose, exposure, every
observation's lesion and its mask, frontal and lateral views."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from ...constants import NUM_OBSERVATIONS, OBSERVATIONS


logger = logging.getLogger(__name__)

#: What each observation looks like on the phantom (the montage and the docs use these captions).
SIGNATURES: dict[str, str] = {
    "No Finding": "normal anatomy",
    "Enlarged Cardiomediastinum": "widened upper mediastinum",
    "Cardiomegaly": "enlarged heart (cardiothoracic ratio > 0.5)",
    "Lung Opacity": "hazy irregular patch",
    "Lung Lesion": "small round nodule(s)",
    "Edema": "bilateral perihilar haze + interstitial (Kerley B) lines",
    "Consolidation": "dense homogeneous region with air bronchograms",
    "Pneumonia": "patchy textured density in a lower zone",
    "Atelectasis": "plate-like band or basal wedge",
    "Pneumothorax": "apical region without lung texture + visceral pleural line",
    "Pleural Effusion": "basal meniscus blunting the costophrenic angle",
    "Pleural Other": "pleural thickening along the lateral chest wall",
    "Fracture": "broken, offset posterior rib with a healing callus",
    "Support Devices": "tubes, lines, ECG leads, pacemaker",
}

#: Default probability of each true finding in a CheXpert phantom study (index 0, No Finding, is derived).
DEFAULT_PREVALENCE: dict[str, float] = {
    "Enlarged Cardiomediastinum": 0.12,
    "Cardiomegaly": 0.15,
    "Lung Opacity": 0.25,
    "Lung Lesion": 0.12,
    "Edema": 0.18,
    "Consolidation": 0.12,
    "Pneumonia": 0.12,
    "Atelectasis": 0.18,
    "Pneumothorax": 0.12,
    "Pleural Effusion": 0.22,
    "Pleural Other": 0.10,
    "Fracture": 0.10,
    "Support Devices": 0.30,
}

# dataset folder names (docs/DEVELOPMENT.md)

# seed keys: (seed, dataset, purpose, ...)
_DATASETS = {"chexpert_train": 1, "chexpert_valid": 2, "scr": 3, "qata_train": 4, "qata_test": 5, "demo": 6}
_PLAN, _ANATOMY, _IMAGE = 0, 1, 2
_OBS_INDEX = {name: k for k, name in enumerate(OBSERVATIONS)}


# ----------------------------------------------------------------------------------------------------------------
# small vectorised helpers
# ----------------------------------------------------------------------------------------------------------------


def phantom_rng(seed: int, dataset: str, *index: int, purpose: int = _IMAGE) -> np.random.Generator:
    """The generator of one phantom item, seeded from ``(seed, dataset, purpose, *index)`` (order-independent).

    Args:
        seed: the global seed (non-negative).
        dataset: one of ``chexpert_train``, ``chexpert_valid``, ``scr``, ``qata_train``, ``qata_test``, ``demo``.
        index: e.g. ``(patient, study, view)``.
        purpose: 0 = plan (labels), 1 = anatomy (per patient), 2 = image.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if dataset not in _DATASETS:
        raise ValueError(f"unknown phantom dataset {dataset!r}; expected one of {list(_DATASETS)}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), _DATASETS[dataset], purpose, *map(int, index)]))


def _pow(x: np.ndarray, p: float) -> np.ndarray:
    """``x ** p`` for ``x >= 0`` (faster than ``np.power`` with a non-integer exponent)."""
    return np.exp(p * np.log(np.maximum(x, 1e-12)))


def _aa(d: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage of a signed distance ``d`` (positive inside), one pixel wide edge."""
    return np.clip(d * (1.0 / px) + 0.5, 0.0, 1.0)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ellipse_sd(u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float,
                angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Approximate signed distance to a (rotated) ellipse, positive inside, and its normalised radius ``q``."""
    du, dv = u - cx, v - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    q = np.sqrt((du / rx) ** 2 + (dv / ry) ** 2) + 1e-6
    r = np.sqrt(du * du + dv * dv)
    return r / q - r, q  # distance along the ray from the centre


def _segment_sd(u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
                half_width: float) -> np.ndarray:
    """Signed distance to a capsule (segment ``p0``-``p1`` thickened by ``half_width``), positive inside."""
    ax, ay = p1[0] - p0[0], p1[1] - p0[1]
    length2 = ax * ax + ay * ay + 1e-12
    t = np.clip(((u - p0[0]) * ax + (v - p0[1]) * ay) / length2, 0.0, 1.0)
    return half_width - np.hypot(u - p0[0] - t * ax, v - p0[1] - t * ay)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field ``(size, size)`` of about unit variance with ``cells`` blobs across (bicubic)."""
    from PIL import Image

    low = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC, box=(1.0, 1.0, cells + 2.0, cells + 2.0))
    out = np.asarray(big, dtype=np.float32)
    return out / (float(out.std()) + 1e-6)


def _choose_pixel(rng: np.random.Generator, *candidates: np.ndarray) -> tuple[int, int]:
    """A random pixel of the first non-empty boolean mask in ``candidates`` (the last one must be non-empty)."""
    for cand in candidates:
        idx = np.flatnonzero(cand)
        if idx.size:
            flat = int(idx[rng.integers(idx.size)])
            return divmod(flat, cand.shape[1])
    raise ValueError("no candidate pixel")


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(X, Y)`` in ``[-1, 1]``, ``(size, size)`` float32 each (read-only)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
    x, y = np.meshgrid(c, c)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


# ----------------------------------------------------------------------------------------------------------------
# anatomy
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Patient-level geometry and densities, in the anatomy frame (``u`` to the image's right, ``v`` down).

    Lengths are in units of half the image width; ``a`` below is the distance from the midline towards one side.
    """

    scale: float = 1.0  #: thorax size
    shift_x: float = 0.0
    shift_y: float = 0.0
    lung_a0: float = 0.40  #: lung superellipse centre (a)
    lung_v0: float = 0.02  #: lung superellipse centre (v)
    lung_ra: float = 0.33
    lung_rv: float = 0.68
    lung_p: float = 2.4  #: superellipse exponent
    dome_right: float = 0.30  #: top of the right hemidiaphragm (image left), v
    dome_left: float = 0.36  #: top of the left hemidiaphragm (image right), v
    dome_a: float = 0.36  #: a of the dome tops
    dome_k: float = 1.7  #: dome curvature
    med_w: float = 0.095  #: half width of the upper mediastinum
    knob: float = 0.055  #: aortic knob bulge (image right)
    heart_cx: float = 0.11
    heart_cy: float = 0.28
    heart_rx: float = 0.31
    heart_ry: float = 0.24
    heart_angle: float = 0.4  #: radians, long axis tilted down to the image's right
    rib_first: float = -0.66  #: v of the first posterior rib at the spine
    rib_spacing: float = 0.105
    rib_growth: float = 0.0025  #: spacing grows downwards
    rib_width: float = 0.34  #: rib width as a fraction of the spacing
    clav_v: float = -0.54  #: clavicle medial end (v)
    clav_slope: float = -0.24
    clav_len: float = 0.55
    shoulder_w: float = 0.94  #: half width of the torso
    neck_w: float = 0.24
    soft: float = 0.50  #: soft-tissue attenuation
    air: float = 0.36  #: lung air (subtracted)
    bone: float = 0.16
    vessel: float = 0.16
    gastric_bubble: bool = True


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Random plausible anatomy (sizes, positions, densities) for one patient."""
    u = rng.uniform
    dome_right = u(0.24, 0.34)
    return Anatomy(
        scale=u(0.9, 1.04), shift_x=u(-0.04, 0.04), shift_y=u(-0.03, 0.05),
        lung_a0=u(0.38, 0.42), lung_v0=u(0.0, 0.05), lung_ra=u(0.31, 0.35), lung_rv=u(0.64, 0.71),
        lung_p=u(2.2, 2.7), dome_right=dome_right, dome_left=dome_right + u(0.03, 0.08), dome_a=u(0.32, 0.40),
        dome_k=u(1.4, 2.0), med_w=u(0.085, 0.105), knob=u(0.04, 0.07), heart_cx=u(0.09, 0.14),
        heart_cy=u(0.26, 0.31), heart_rx=u(0.29, 0.33), heart_ry=u(0.22, 0.26), heart_angle=u(0.3, 0.55),
        rib_first=u(-0.70, -0.63), rib_spacing=u(0.098, 0.112), rib_growth=u(0.0015, 0.0035),
        rib_width=u(0.30, 0.38), clav_v=u(-0.58, -0.5), clav_slope=u(-0.3, -0.18), clav_len=u(0.5, 0.6),
        shoulder_w=u(0.86, 1.0), neck_w=u(0.2, 0.27), soft=u(0.45, 0.55), air=u(0.32, 0.40), bone=u(0.13, 0.19),
        vessel=u(0.11, 0.16), gastric_bubble=bool(rng.random() < 0.7),
    )


@dataclass
class Phantom:
    """One frontal phantom radiograph and its ground truth.

    Attributes:
        image: float32 ``(H, W)`` in ``[0, 1]`` (bright = attenuating).
        anatomy: uint8 ``(5, H, W)`` in :data:`~bundle.constants.SCR_STRUCTURES` order (SCR convention).
        lesions: uint8 ``(14, H, W)`` in :data:`~bundle.constants.OBSERVATIONS` order (channel 0 always empty).
        body: uint8 ``(H, W)``, the patient's body (soft tissue) outline.
        findings: the observation indices drawn (sorted).
        infection: uint8 ``(H, W)`` COVID-19-like infection mask when drawn with ``infection=True``, else None.
    """

    image: np.ndarray
    anatomy: np.ndarray
    lesions: np.ndarray
    body: np.ndarray
    findings: tuple[int, ...]
    infection: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)


class _Scene:
    """The arrays of one frontal drawing: coordinates, anatomy signed distances and masks, attenuation layers."""

    def __init__(self, size: int, an: Anatomy, pose: Mapping[str, float], ecm_widen: float = 0.0,
                 heart_scale: float = 1.0):
        self.size = size
        self.an = an
        self.inspiration = pose["inspiration"]  # shifts both domes
        self.ecm_widen = ecm_widen  # Enlarged Cardiomediastinum: widening of the upper mediastinum
        self.heart_scale = heart_scale  # Cardiomegaly
        X, Y = _grid(size)
        self.scale = an.scale * pose["scale"]
        self.tx, self.ty = an.shift_x + pose["dx"], an.shift_y + pose["dy"]
        self.cos, self.sin = math.cos(pose["angle"]), math.sin(pose["angle"])
        xs, ys = X - self.tx, Y - self.ty
        inv = 1.0 / self.scale
        self.u = ((self.cos * xs + self.sin * ys) * inv).astype(np.float32)
        self.v = ((-self.sin * xs + self.cos * ys) * inv).astype(np.float32)
        self.px = 2.0 / size * inv  # one pixel in anatomy units
        self.abs_u = np.abs(self.u)

    # geometry -------------------------------------------------------------------------------------------------
    def to_pixel(self, u: np.ndarray | float, v: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy coordinates to (row, col) pixel coordinates (float)."""
        x = self.tx + self.scale * (self.cos * np.asarray(u) - self.sin * np.asarray(v))
        y = self.ty + self.scale * (self.sin * np.asarray(u) + self.cos * np.asarray(v))
        return (y + 1.0) * (self.size / 2.0) - 0.5, (x + 1.0) * (self.size / 2.0) - 0.5

    def box(self, u0: float, u1: float, v0: float, v1: float, pad: int = 2) -> tuple[slice, slice]:
        """Pixel (row, column) slices covering the anatomy rectangle ``[u0, u1] x [v0, v1]``."""
        rows, cols = self.to_pixel(np.array([u0, u1, u0, u1]), np.array([v0, v0, v1, v1]))
        r0 = min(max(int(np.floor(rows.min())) - pad, 0), self.size)
        c0 = min(max(int(np.floor(cols.min())) - pad, 0), self.size)
        r1 = max(min(int(np.ceil(rows.max())) + pad + 1, self.size), r0)
        c1 = max(min(int(np.ceil(cols.max())) + pad + 1, self.size), c0)
        return slice(r0, r1), slice(c0, c1)

    def local(self, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], box: tuple[float, float, float, float],
              fill: float) -> np.ndarray:
        """``fn(u, v)`` evaluated inside the anatomy rectangle ``box`` only, ``fill`` elsewhere (speed)."""
        rs, cs = self.box(*box)
        out = np.full(self.u.shape, fill, np.float32)
        out[rs, cs] = fn(self.u[rs, cs], self.v[rs, cs])
        return out

    def dome(self, a: np.ndarray, side: int, lift: float = 0.0) -> np.ndarray:
        """v of the hemidiaphragm at distance ``a`` from the midline; side -1 = image left, +1 = image right."""
        top = (self.an.dome_left if side > 0 else self.an.dome_right) + self.inspiration - lift
        return top + self.an.dome_k * (a - self.an.dome_a) ** 2

    def med_half(self, v: np.ndarray, side: int) -> np.ndarray:
        """Half width of the mediastinum (lung's medial border) at height ``v`` on one side."""
        w = self.an.med_w + 0.02 * _smoothstep(-0.2, 0.2, v)
        if side > 0:
            w = w + self.an.knob * np.exp(-(((v + 0.24) / 0.07) ** 2))
        if self.ecm_widen:
            w = w + self.ecm_widen * (_smoothstep(-0.72, -0.52, v) - _smoothstep(-0.12, 0.08, v))
        return w

    def lung_sd(self, a: np.ndarray, v: np.ndarray, side: int) -> np.ndarray:
        """Signed distance (approx., positive inside) to one hemithorax' lung field (heart not removed)."""
        an = self.an
        p = an.lung_p
        t = np.clip((v - an.lung_v0) * (1.0 / an.lung_rv), -1.0, 1.0)  # the lung widens towards its base
        ra = an.lung_ra * (1.0 + 0.16 * t)
        g = _pow(np.abs(a - an.lung_a0 - 0.05 * t) / ra, p) + _pow(np.abs(v - an.lung_v0) * (1.0 / an.lung_rv), p)
        d_outer = (1.0 - _pow(g, 1.0 / p)) * ra
        d_med = a - self.med_half(v, side)
        d_dome = self.dome(a, side) - v
        return np.minimum(np.minimum(d_outer, d_med), d_dome)

    def heart_ellipse(self) -> tuple[float, float, float, float, float]:
        """``(cx, cy, rx, ry, angle)`` of the heart (enlarged by ``heart_scale``)."""
        an, k = self.an, self.heart_scale
        return (an.heart_cx + (k - 1.0) * 0.12, an.heart_cy + (k - 1.0) * 0.05, an.heart_rx * k,
                an.heart_ry * (1 + (k - 1) * 0.6), an.heart_angle)

    def heart_top(self) -> float:
        """v of the top of the heart (its upper border is hidden in the mediastinum; the SCR mask is cut there)."""
        cx, cy, rx, ry, ang = self.heart_ellipse()
        return cy - 0.8 * math.hypot(rx * math.sin(ang), ry * math.cos(ang))

    def heart_sd(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d, _ = _ellipse_sd(u, v, *self.heart_ellipse())
        bottom = np.where(u > 0, self.dome(np.abs(u), +1), self.dome(np.abs(u), -1)) + 0.03
        return np.minimum(d, bottom - v)


def _rib_arc(a: np.ndarray | float) -> np.ndarray | float:
    """Vertical course of a posterior rib at distance ``a`` from the midline (relative to its medial end)."""
    return -0.55 * a + 0.1 * a * a + 1.1 * a ** 3


def _pose(rng: np.random.Generator) -> dict[str, float]:
    u = rng.uniform
    return {"angle": math.radians(u(-4.0, 4.0)), "scale": u(0.97, 1.03), "dx": u(-0.03, 0.03), "dy": u(-0.03, 0.03),
            "inspiration": u(-0.04, 0.04), "gamma": u(0.8, 1.25), "contrast": u(0.9, 1.15), "offset": u(0.0, 0.06),
            "noise": u(0.008, 0.025), "kappa": u(1.3, 1.7)}


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a smooth image with a large ``sigma`` (pixels), computed at a lower resolution."""
    from PIL import Image

    f = max(1, int(sigma // 1.5))
    if f == 1:
        return ndi.gaussian_filter(img, max(sigma, 0.5), mode="constant", truncate=3.0)
    size = img.shape[0]
    n = -(-size // f)
    pad = np.zeros((n * f, n * f), np.float32)
    pad[:size, :size] = img
    small = ndi.gaussian_filter(pad.reshape(n, f, n, f).mean(axis=(1, 3)), sigma / f, mode="constant", truncate=3.0)
    big = Image.fromarray(small.astype(np.float32)).resize((n * f, n * f), Image.Resampling.BILINEAR)
    return np.asarray(big, dtype=np.float32)[:size, :size]


def _smooth_union(d1: np.ndarray, d2: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two signed distances (positive inside) with blending radius ``k``."""
    h = np.clip(0.5 + 0.5 * (d1 - d2) / k, 0.0, 1.0)
    return d2 + (d1 - d2) * h + k * h * (1.0 - h)


def _blur_lines(canvas: np.ndarray, sigma: float) -> np.ndarray:
    """Blur a canvas of splatted curve points into lines of peak ~1 (Gaussian profile, ``sigma`` pixels)."""
    return np.clip(ndi.gaussian_filter(canvas, sigma, mode="constant", truncate=3.0)
                   * (math.sqrt(2 * math.pi) * sigma), 0.0, 1.0)


def _expose(A: np.ndarray, pose: Mapping[str, float], rng: np.random.Generator) -> np.ndarray:
    """Attenuation to image: film response ``(offset + contrast (1 - exp(-kappa A)))^gamma`` (a lookup table
    over ``A`` in steps of 1/1024) plus Gaussian noise; float32 in ``[0, 1]``."""
    steps = 1024
    grid = np.arange(4 * steps + 1, dtype=np.float64) / steps
    lut = np.clip(pose["offset"] + pose["contrast"] * (1.0 - np.exp(-pose["kappa"] * grid)), 0.0, 1.0)
    lut = (lut ** pose["gamma"]).astype(np.float32)
    idx = np.clip(A * float(steps) + 0.5, 0.0, 4.0 * steps).astype(np.int32)
    img = lut[idx] + pose["noise"] * rng.standard_normal(A.shape, dtype=np.float32)
    return np.clip(img, 0.0, 1.0)


def _vessel_tree(sc: _Scene, rng: np.random.Generator, hila: Sequence[tuple[float, float, int]],
                 keep: np.ndarray, trunks: tuple[int, int] = (5, 8), generations: int = 5,
                 trunk_length: float = 0.17) -> tuple[np.ndarray, np.ndarray]:
    """Branching vessel trees from the hila, rasterised: ``(thick, thin)`` canvases of splatted points.

    Each tree starts with a few trunks fanning out from a hilum ``(u, v, side)``; every branch is a random walk
    that splits in two at its end, each generation shorter and thinner (all generations at once, vectorised).
    Points outside ``keep`` (a boolean image) are dropped.
    """
    size = sc.size
    starts_a, starts_v, angs, lens, widths, sides = [], [], [], [], [], []
    for hu, hv, side in hila:
        n = int(rng.integers(trunks[0], trunks[1] + 1))
        ang = np.linspace(-1.95, 1.75, n) + rng.uniform(-0.2, 0.2, n)  # from up to down, pointing outwards
        starts_a.append(np.full(n, abs(hu)) + rng.uniform(-0.015, 0.015, n))
        starts_v.append(np.full(n, hv) + rng.uniform(-0.03, 0.03, n))
        angs.append(ang)
        lens.append(trunk_length * rng.uniform(0.7, 1.2, n))
        widths.append(np.ones(n))
        sides.append(np.full(n, side))
    a0, v0, ang, length, width, side = (np.concatenate(x) for x in (starts_a, starts_v, angs, lens, widths, sides))
    thick = np.zeros(size * size, np.float32)
    thin = np.zeros(size * size, np.float32)
    n_steps = 5
    keep_flat = keep.ravel()
    for _ in range(generations):
        m = a0.size
        turn = np.cumsum(rng.normal(0.0, 0.12, (m, n_steps)), axis=1) + ang[:, None]
        step = (length / n_steps)[:, None]
        pa = np.concatenate([a0[:, None], a0[:, None] + np.cumsum(step * np.cos(turn), axis=1)], axis=1)
        pv = np.concatenate([v0[:, None], v0[:, None] + np.cumsum(step * np.sin(turn), axis=1)], axis=1)
        # densify to half a pixel
        sub = max(2, int(math.ceil(float(step.max()) / (0.5 * sc.px))))
        t = np.linspace(0.0, 1.0, sub, endpoint=False)
        qa = (pa[:, :-1, None] * (1 - t) + pa[:, 1:, None] * t).reshape(m, -1)
        qv = (pv[:, :-1, None] * (1 - t) + pv[:, 1:, None] * t).reshape(m, -1)
        rows, cols = sc.to_pixel((np.repeat(side, qa.shape[1]) * qa.ravel()), qv.ravel())
        rows, cols = np.round(rows).astype(np.int64), np.round(cols).astype(np.int64)
        ok = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        flat = rows[ok] * size + cols[ok]
        flat = flat[keep_flat[flat]]
        wg = float(width[0])  # all branches of one generation have the same width
        canvas, value = (thick, wg) if wg > 0.55 else (thin, min(1.0, wg * 1.4))
        canvas[flat] = np.maximum(canvas[flat], value)
        # two children at the end of each branch
        end_ang = turn[:, -1]
        spread = rng.uniform(0.25, 0.6, (m, 2)) * np.array([1.0, -1.0])
        a0 = np.repeat(pa[:, -1], 2)
        v0 = np.repeat(pv[:, -1], 2)
        ang = np.repeat(end_ang, 2) + spread.ravel()
        length = np.repeat(length, 2) * rng.uniform(0.6, 0.85, 2 * m)
        width = np.repeat(width, 2) * 0.7
        side = np.repeat(side, 2)
    return thick.reshape(size, size), thin.reshape(size, size)


@dataclass
class _Chest:
    """The normal anatomy of one frontal drawing, which the lesions are drawn on (read-only).

    Dictionaries are keyed by side: -1 = image left (the patient's right), +1 = image right.
    """

    sc: _Scene
    body: np.ndarray  #: anti-aliased body coverage
    body_bin: np.ndarray  #: body mask (bool)
    sd: dict[int, np.ndarray]  #: signed distance to each lung field (heart not removed)
    field_soft: dict[int, np.ndarray]  #: anti-aliased lung fields
    field_bin: dict[int, np.ndarray]  #: lung field masks (bool)
    field_any_soft: np.ndarray  #: both lung fields, anti-aliased
    med_sd: np.ndarray  #: signed distance to the mediastinum
    sil_sd: np.ndarray  #: signed distance to the cardiomediastinal silhouette
    sil: np.ndarray  #: anti-aliased silhouette inside the body
    heart_top: float  #: v where the heart mask starts
    heart_bin: np.ndarray  #: heart mask (bool, SCR convention)
    lung_bin: dict[int, np.ndarray]  #: lung masks without the silhouette (bool, SCR convention)
    lung_any: np.ndarray  #: both lung masks
    visible: np.ndarray  #: lung not hidden by the heart or mediastinum


@dataclass
class _LesionLayers:
    """What the findings add to a frontal drawing, filled in place by the lesion steps."""

    dA: np.ndarray  #: added density (attenuation)
    tex_keep: np.ndarray  #: multiplies the lung texture (pneumothorax, effusion remove it)
    tex_extra: np.ndarray  #: extra interstitial texture (edema)
    masks: np.ndarray  #: uint8 ``(14, H, W)``, one mask per observation
    params: dict[str, Any]  #: the drawn parameters, in :attr:`Phantom.params`

    @classmethod
    def empty(cls, size: int, pose: Mapping[str, float]) -> _LesionLayers:
        """No lesion yet, on a ``(size, size)`` image; the parameters start with the ``pose``."""
        zeros = np.zeros((size, size), np.float32)
        return cls(dA=zeros, tex_keep=np.ones_like(zeros), tex_extra=zeros.copy(),
                   masks=np.zeros((NUM_OBSERVATIONS, size, size), np.uint8), params={"pose": pose})


def _frontal_body(sc: _Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body outline (neck widening into the shoulders) and soft tissue, thicker in the middle.

    Returns:
        ``(body, body_bin, soft)``: anti-aliased coverage, mask (bool) and soft-tissue attenuation.
    """
    an, u, v = sc.an, sc.u, sc.v
    half = an.neck_w + (an.shoulder_w - an.neck_w) * np.sqrt(_smoothstep(-1.02, -0.62, v))
    body_sd = np.minimum(half - sc.abs_u, 1.2 - v)
    body = _aa(body_sd, sc.px)
    thick = np.sqrt(np.clip(1.0 - (u / np.maximum(half, 1e-3)) ** 2, 0.0, 1.0))
    return body, body_sd > 0, body * (an.soft * (0.5 + 0.5 * thick))


def _frontal_chest(sc: _Scene, body: np.ndarray, body_bin: np.ndarray) -> _Chest:
    """Lung fields, heart and mediastinum (one smooth cardiomediastinal silhouette), their masks."""
    u, v, px = sc.u, sc.v, sc.px
    lung_box = {-1: (-0.95, 0.02, -0.82, 0.82), 1: (-0.02, 0.95, -0.82, 0.82)}
    sd = {s: sc.local(lambda uu, vv, s=s: sc.lung_sd(s * uu, vv, s), lung_box[s], -1.0)
          for s in (-1, 1)}
    field_soft = {s: _aa(sd[s], px) for s in (-1, 1)}
    field_bin = {s: sd[s] > 0 for s in (-1, 1)}
    field_any_soft = np.maximum(field_soft[-1], field_soft[1])
    # cardiomediastinal silhouette: the mediastinum blends smoothly into the heart
    med_half = np.where(u > 0, sc.med_half(v, +1), sc.med_half(v, -1))
    med_sd = np.minimum(med_half - sc.abs_u, 0.5 - v)
    sil_sd = _smooth_union(sc.heart_sd(u, v), med_sd, 0.09)
    sil = _aa(sil_sd, px) * body
    heart_top = sc.heart_top()
    sil_bin = sil_sd > 0
    lung_bin = {s: field_bin[s] & ~sil_bin for s in (-1, 1)}
    return _Chest(sc=sc, body=body, body_bin=body_bin, sd=sd, field_soft=field_soft,
                  field_bin=field_bin, field_any_soft=field_any_soft, med_sd=med_sd, sil_sd=sil_sd,
                  sil=sil, heart_top=heart_top, heart_bin=sil_bin & (v > heart_top) & body_bin,
                  lung_bin=lung_bin, lung_any=lung_bin[-1] | lung_bin[1],
                  visible=field_any_soft * (1.0 - sil))


def _lung_air(ch: _Chest) -> np.ndarray:
    """Air of the lung fields (subtracted), darker in their centre (less overlapping tissue)."""
    depth = _blur(ch.field_any_soft, 0.045 / ch.sc.px)
    return ch.sc.an.air * ch.field_any_soft * (0.55 + 0.45 * depth) * (1.0 - 0.85 * ch.sil)


def _trachea_and_spine(sc: _Scene, body: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Midline structures: ``(trachea, spine, pedicles)`` layers (spine with vertebral banding)."""
    an, u, v, px, a = sc.an, sc.u, sc.v, sc.px, sc.abs_u
    trachea = (_aa(np.minimum(0.032 - np.abs(u + 0.01 * (v + 0.6)), -0.12 - v), px)
               * _smoothstep(-1.1, -0.7, v))
    spine_sd = 0.062 - a
    vert = 0.8 + 0.2 * _smoothstep(-0.4, 0.4, np.cos((v - an.rib_first) * (2 * np.pi / 0.1)))
    spine = _aa(spine_sd, px) * vert * body
    pedicles = (np.exp(-(((a - 0.045) / 0.012) ** 2)) * _aa(spine_sd + 0.01, px)
                * (vert - 0.8) * 4.0)
    return trachea, spine, pedicles


def _hilar_blob(du: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """Dense hilar vessels: a Gaussian blob at offset ``(du, dv)`` from the hilum."""
    return np.exp(-((du / 0.06) ** 2 + (dv / 0.09) ** 2))


def _frontal_vessels(ch: _Chest, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pulmonary vessel trees from the hila (a little below the aortic knob) and the dense hilar
    vessels: ``(vessels, hilum)`` layers. Draws the trees from ``rng`` (the texture generator)."""
    sc = ch.sc
    hila = [(-0.15, 0.0, -1), (0.16, -0.03, 1)]
    thick_c, thin_c = _vessel_tree(sc, rng, hila, ch.field_bin[-1] | ch.field_bin[1], generations=6)
    scale = sc.size / 256.0
    vessels = np.maximum(_blur_lines(thick_c, max(0.6, 0.9 * scale)),
                         _blur_lines(thin_c, max(0.5, 0.55 * scale)))
    hilum = np.zeros_like(sc.u)
    for hu, hv, _ in hila:  # dense hilar vessels
        hilum += sc.local(lambda uu, vv, hu=hu, hv=hv: _hilar_blob(uu - hu, vv - hv),
                          (hu - 0.2, hu + 0.2, hv - 0.3, hv + 0.3), 0.0)
    return vessels, hilum


def _rib_index(sc: _Scene, vq: np.ndarray) -> np.ndarray:
    """Fractional posterior rib number at height ``vq`` along the rib course."""
    sp, g = sc.an.rib_spacing, sc.an.rib_growth
    return (-sp + np.sqrt(np.maximum(sp * sp + 4 * g * vq, 0.0))) / (2 * g)


def _rib_profile(edge: np.ndarray, lower: np.ndarray, px: float) -> np.ndarray:
    """Bone band of signed distance ``edge``: sharper, brighter inferior cortex where ``lower``."""
    return 0.8 * _aa(edge, px) + (0.25 + 0.5 * lower) * np.exp(-((edge / max(px, 0.006)) ** 2))


def _posterior_ribs(sc: _Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior rib arcs inside the rib cage.

    Returns:
        ``(ribs, k_idx, cage_soft)``: the rib layer, the fractional rib number of every pixel and
        the anti-aliased rib cage.
    """
    an, v, px, a = sc.an, sc.v, sc.px, sc.abs_u
    sp, g = an.rib_spacing, an.rib_growth
    # posterior arc: rises from the spine, falls along the lateral wall
    k_idx = _rib_index(sc, v - _rib_arc(a) - an.rib_first)
    cage = (_pow(np.abs(a - an.lung_a0) / (an.lung_ra + 0.08), an.lung_p)
            + _pow(np.abs(v - an.lung_v0 + 0.03) / (an.lung_rv + 0.05), an.lung_p))
    cage_soft = _aa((1.0 - cage) * 0.3, px) * _smoothstep(0.035, 0.12, a)
    frac = np.abs(k_idx - np.round(k_idx))
    spacing_here = sp + 2 * g * np.clip(k_idx, 0, 12)
    ribs = _rib_profile((an.rib_width / 2 - frac) * spacing_here, k_idx > np.round(k_idx), px)
    ribs = ribs * cage_soft
    ribs *= (k_idx > -0.5) & (k_idx < 10.5)
    ribs *= 0.6 + 0.4 * _smoothstep(0.08, 0.3, a)
    return ribs, k_idx, cage_soft


#: Peak density and Gaussian fall-off (in units of the callus ellipse's normalised radius) of the fracture's
#: callus. Until 2026-12-07 the callus was 0.14 with fall-off 2.5: a 2 x 1 px spot at the network's 128 px whose
#: signature (0.13 image SDs inside the mask) no classifier learnt, even alone with 800 positives (AUROC 0.51-0.55),
#: so no explanation could localise it. Now a fusiform healing callus (half maximum at the ellipse's 0.05 x 0.032
#: radii: about 1.5 rib widths across, 0.1 along the rib) at about half the rib's density: 0.69 SDs, still the
#: faintest focal finding (the others 1.0-1.5), learnt alone to AUROC 0.99 in 5 epochs (docs/doll_tuning.md,
#: "The fracture redrawn").
FRACTURE_CALLUS_DENSITY = 0.45
FRACTURE_CALLUS_FALLOFF = 0.7


def _fracture(ch: _Chest, r: np.random.Generator, ribs: np.ndarray, k_idx: np.ndarray,
              cage_soft: np.ndarray, out: _LesionLayers) -> np.ndarray:
    """Fracture: the lateral fragment of one posterior rib displaced and angulated, gap and callus.

    Adds the callus density, the mask and the parameters to ``out``; returns the broken rib layer.
    """
    sc = ch.sc
    an, u, v, px, a = sc.an, sc.u, sc.v, sc.px, sc.abs_u
    sp, g = an.rib_spacing, an.rib_growth
    f_side = 1 if r.random() < 0.5 else -1
    f_k = int(r.integers(2, 8))
    f_a = r.uniform(0.42, 0.62)
    f_gap = max(r.uniform(0.01, 0.016), 0.7 * px)
    width = an.rib_width * (sp + 2 * g * f_k)
    shift = r.uniform(0.6, 0.9) * width * (1 if r.random() < 0.5 else -1)
    tilt = r.uniform(0.12, 0.3) * (1 if r.random() < 0.5 else -1)
    on_side = (u > 0) == (f_side > 0)
    this_rib = on_side & (np.abs(k_idx - f_k) < 0.5)
    ribs = np.where(this_rib & (a > f_a - f_gap), 0.0, ribs)  # remove the original lateral part
    kq = _rib_index(sc, v - shift - tilt * (a - f_a) - _rib_arc(a) - an.rib_first)
    frag = _rib_profile((an.rib_width / 2 - np.abs(kq - f_k)) * (sp + 2 * g * f_k), kq > f_k, px)
    ribs = np.maximum(ribs, frag * on_side * _aa(a - f_a - f_gap, px) * cage_soft)
    f_v = an.rib_first + (f_k * sp + g * f_k * f_k) + _rib_arc(f_a)
    f_sd, _ = _ellipse_sd(u, v, f_side * f_a, f_v + shift / 2, 0.07, 0.06)
    # callus: a bright fusiform thickening around the break, crossed by the lucent fracture line
    _, cq = _ellipse_sd(u, v, f_side * f_a, f_v + shift / 2, max(0.05, 2 * px),
                        max(0.032, 1.5 * px))
    callus = (np.exp(-FRACTURE_CALLUS_FALLOFF * cq * cq)
              * (1.0 - 0.7 * np.exp(-(((a - f_a) / max(f_gap, px)) ** 2))))
    out.dA += FRACTURE_CALLUS_DENSITY * callus
    out.masks[12] = (f_sd > 0) & ch.body_bin
    out.params["fracture"] = {"side": f_side, "rib": f_k, "a": f_a, "shift": shift, "tilt": tilt}
    return ribs


def _anterior_ribs(sc: _Scene, cage_soft: np.ndarray) -> np.ndarray:
    """Faint anterior ribs, descending medially."""
    an, v, px, a = sc.an, sc.v, sc.px, sc.abs_u
    sp = an.rib_spacing
    ka = (v - an.rib_first + 0.25 - 0.45 * (0.75 - a)) / (sp * 1.15)
    fa = np.abs(ka - np.round(ka))
    return (_aa((0.18 - fa) * sp, px) * cage_soft * _smoothstep(0.15, 0.35, a) * (ka > 0.5)
            * (ka < 7.5) * 0.4)


def _clavicle_sd(uu: np.ndarray, vv: np.ndarray, an: Anatomy, s: int) -> np.ndarray:
    """Signed distance to the S-shaped clavicle on side ``s`` (thin in the middle, round ends)."""
    aa = s * uu
    a_m = 0.07
    t = (aa - a_m) / an.clav_len
    tc = np.clip(t, 0.0, 1.0)
    vc = an.clav_v + an.clav_slope * (aa - a_m) + 0.028 * np.sin(2 * np.pi * tc)
    ends = np.sqrt(np.clip(np.minimum(t, 1.0 - t) / 0.08, 0.0, 1.0))  # rounded ends
    half_w = (0.016 + 0.014 * (1.0 - tc) ** 2 + 0.012 * tc ** 4) * ends
    return np.where((t > 0) & (t < 1), half_w - np.abs(vv - vc), -np.abs(vv - vc) - 0.05)


def _clavicles(sc: _Scene) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Both clavicles: ``(layer with a bright cortex, {side: mask})``."""
    an, px = sc.an, sc.px
    clav = np.zeros_like(sc.u)
    clav_bin = {}
    a_end = 0.07 + an.clav_len
    v_lo = an.clav_v + an.clav_slope * an.clav_len - 0.08
    for s in (-1, 1):
        box = (-a_end - 0.02, -0.05) if s < 0 else (0.05, a_end + 0.02)
        csd = sc.local(lambda uu, vv, s=s: _clavicle_sd(uu, vv, an, s),
                       (*box, v_lo, an.clav_v + 0.08), -1.0)
        clav = np.maximum(clav, _aa(csd, px) * (1.0 + 0.5 * np.exp(-((csd / max(px, 0.006)) ** 2))))
        clav_bin[s] = csd > 0
    return clav, clav_bin


def _normal_attenuation(ch: _Chest, soft: np.ndarray, hilum: np.ndarray, ribs: np.ndarray,
                        ant: np.ndarray, clav: np.ndarray) -> np.ndarray:
    """Composite the normal anatomy into the attenuation image: soft tissue, silhouette, trachea,
    abdomen below the domes, hila, lung air, bones (spine, ribs, clavicles), gastric bubble."""
    sc = ch.sc
    an, u, v, px = sc.an, sc.u, sc.v, sc.px
    air = _lung_air(ch)
    trachea, spine, pedicles = _trachea_and_spine(sc, ch.body)
    dome_v = np.where(u > 0, sc.dome(u, +1), sc.dome(-u, -1))
    abdomen = _aa(v - dome_v, px) * ch.body * _smoothstep(0.85, 0.6, sc.abs_u)
    A = soft + 0.12 * ch.sil - 0.12 * trachea + 0.08 * abdomen + 0.05 * hilum * ch.field_any_soft
    A = A - air
    rib_vis = 0.6 * (0.5 + 0.5 * ch.field_any_soft)
    A = A + an.bone * (0.9 * spine + 0.25 * pedicles + rib_vis * (ribs + ant) * ch.body
                       + 1.2 * clav)
    if an.gastric_bubble:
        gb, _ = _ellipse_sd(u, v, 0.36, float(sc.dome(np.asarray(0.36), +1)) + 0.11, 0.10, 0.055)
        A = A - 0.22 * _aa(gb, px) * _aa(v - sc.dome(u, +1) - 0.02, px)
    return A


def _lung_point(ch: _Chest, r: np.random.Generator, side: int | None,
                cond: np.ndarray | None = None, margin: float = 0.0) -> tuple[int, float, float]:
    """A random point ``(side, u, v)`` inside the visible lung (optionally on ``side`` and where
    ``cond``), preferably ``margin`` inside its border; random side when ``side`` is None."""
    s = side if side is not None else (1 if r.random() < 0.5 else -1)
    base = ch.lung_bin[s]
    inner = base & (ch.sd[s] > margin) & (ch.sil_sd < -margin)
    cands = [inner & cond, base & cond, inner, base] if cond is not None else [inner, base]
    cands.append(ch.lung_bin[-s] | ch.lung_bin[s] | ch.body_bin)
    row, col = _choose_pixel(r, *cands)
    return s, float(ch.sc.u[row, col]), float(ch.sc.v[row, col])


def _enlarged_cardiomediastinum(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Enlarged Cardiomediastinum: the upper mediastinum (widened by the scene) and its mask."""
    v = ch.sc.v
    out.masks[1] = (ch.med_sd > 0) & (v > -0.62) & (v < ch.heart_top + 0.02) & ch.body_bin
    out.dA += 0.06 * (out.masks[1] * ch.body)
    out.params["ecm_widen"] = ch.sc.ecm_widen


def _cardiomegaly(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Cardiomegaly: the enlarged heart (drawn by the scene) is the mask."""
    out.masks[2] = ch.heart_bin
    out.params["heart_scale"] = ch.sc.heart_scale


def _pneumothorax(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Pneumothorax: collapsed lung, no texture peripheral to the visceral pleural line."""
    sc = ch.sc
    u, v, px = sc.u, sc.v, sc.px
    s = 1 if r.random() < 0.5 else -1
    f0 = r.uniform(0.62, 0.8)
    hc_a, hc_v = 0.16, -0.02
    f = f0 + (1.0 - f0) * _smoothstep(-0.05, 0.40, v)
    aa = s * u
    csd = sc.lung_sd(hc_a + (aa - hc_a) / f, hc_v + (v - hc_v) / f, s) * f
    ptx = ch.field_bin[s] & (csd <= 0)
    ptx_soft = ch.field_soft[s] * _aa(-csd, px)
    if not ptx.any():
        ptx = ch.field_bin[s] & (ch.sd[s] < 2 * px) & (v < -0.3)
    line = np.exp(-((csd / max(0.6 * px, 0.004)) ** 2)) * ch.field_soft[s] * (v < 0.3)
    out.tex_keep *= 1.0 - ptx_soft
    out.dA += 0.18 * line + 0.04 * ch.field_soft[s] * _aa(csd, px) - 0.07 * ptx_soft
    out.masks[9] = ptx
    out.params["pneumothorax"] = {"side": s, "collapse": f0}


def _pleural_effusion(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Pleural Effusion: basal meniscus blunting the costophrenic angle, no texture below it."""
    sc = ch.sc
    u, v, px = sc.u, sc.v, sc.px
    s = 1 if r.random() < 0.5 else -1
    hgt = r.uniform(0.10, 0.28)
    aa = s * u
    v_med = float(sc.dome(np.asarray(0.2), s)) - 0.35 * hgt
    v_m = v_med - 0.9 * hgt * np.clip((aa - 0.2) / 0.5, 0.0, 1.2) ** 2
    fl = ch.field_bin[s] & (v > v_m)
    if not fl.any():
        fl = ch.field_bin[s] & (v > np.max(np.where(ch.field_bin[s], v, -9.0)) - 2 * px)
    fl_soft = ch.field_soft[s] * _smoothstep(-0.01, 0.06, v - v_m)
    out.dA += 0.45 * fl_soft
    out.tex_keep *= 1.0 - fl_soft
    out.masks[10] = fl
    out.params["effusion"] = {"side": s, "height": hgt}


def _lung_opacity(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Lung Opacity: hazy irregular patch in the middle zones."""
    u, v, size = ch.sc.u, ch.sc.v, ch.sc.size
    s, cu, cv = _lung_point(ch, r, None, (v > -0.45) & (v < 0.3), 0.05)
    rx, ry = r.uniform(0.10, 0.17), r.uniform(0.10, 0.19)
    _, q = _ellipse_sd(u, v, cu, cv, rx, ry, r.uniform(0, np.pi))
    bound = 1.0 + 0.3 * _smooth_noise(r, size, 7)
    patch = _smoothstep(0.0, 0.55, bound - q) * (0.8 + 0.2 * _smooth_noise(r, size, 14))
    region = (bound - q > 0.1) & ch.lung_bin[s]
    if not region.any():
        region = (q < 1.0) & ch.lung_bin[s]
    out.dA += 0.26 * patch * ch.visible * ch.field_soft[s]
    out.masks[3] = region


def _lung_lesion(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Lung Lesion: one to three small round nodules."""
    u, v, px = ch.sc.u, ch.sc.v, ch.sc.px
    for _ in range(int(r.choice([1, 1, 1, 2, 2, 3]))):
        rad = max(r.uniform(0.035, 0.06), 1.2 * px)
        _, cu, cv = _lung_point(ch, r, None, None, rad + 0.02)
        nd, q = _ellipse_sd(u, v, cu, cv, rad, rad)
        out.dA += 0.40 * np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0)) + 0.08 * _aa(nd, px)
        out.masks[4] |= (nd > 0) | ((np.abs(u - cu) < 0.5 * px) & (np.abs(v - cv) < 0.5 * px))
    out.masks[4] &= ch.lung_any


def _edema(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Edema: bilateral perihilar haze (with extra interstitial texture) and Kerley B lines."""
    u, v, px = ch.sc.u, ch.sc.v, ch.sc.px
    m5 = np.zeros_like(ch.lung_any)
    for s in (-1, 1):
        rx, ry = r.uniform(0.20, 0.27), r.uniform(0.26, 0.34)
        _, q = _ellipse_sd(u, v, s * r.uniform(0.20, 0.26), r.uniform(-0.02, 0.06), rx, ry, s * 0.3)
        haze = np.exp(-1.6 * q * q) * ch.field_soft[s]
        out.dA += 0.24 * haze * ch.visible
        out.tex_extra += 0.9 * haze
        # Kerley B lines: short horizontal lines along the lateral lower lung border
        band = ch.field_bin[s] & (ch.sd[s] < 0.05) & (s * u > 0.42) & (v > 0.1) & (v < 0.5)
        period = max(r.uniform(0.045, 0.06), 3 * px)
        ph = r.uniform(0, 1)
        lines = np.abs(((v / period + ph) % 1.0) - 0.5) * period
        kerley = _aa(0.5 * max(0.006, 0.7 * px) - (0.5 * period - lines), px) * band
        out.dA += 0.22 * kerley
        m5 |= ((q < 1.0) | band) & ch.lung_bin[s]
    out.masks[5] = m5


def _consolidation(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Consolidation: dense homogeneous region (lobulated, or lobar with a straight fissure border)
    with air bronchograms."""
    sc = ch.sc
    u, v, px, size = sc.u, sc.v, sc.px, sc.size
    s, cu, cv = _lung_point(ch, r, None, (v > -0.45) & (v < 0.3), 0.1)
    rx, ry = r.uniform(0.17, 0.26), r.uniform(0.15, 0.24)
    cd, _ = _ellipse_sd(u, v, cu, cv, rx, ry, r.uniform(0, np.pi))
    cd = cd + 0.035 * _smooth_noise(r, size, 9)  # lobulated border
    if r.random() < 0.5:  # lobar: one straight, sharp (fissure) border
        th = r.uniform(-0.5, 0.5) + (np.pi / 2 if r.random() < 0.5 else 0.0)
        off = r.uniform(0.3, 0.8) * min(rx, ry)
        fissure = off - ((np.cos(th) * (u - cu) + np.sin(th) * (v - cv))
                         * (1 if r.random() < 0.5 else -1))
        csd = np.minimum(cd, fissure)
        edge = np.minimum(_smoothstep(-0.012, 0.02, cd), _aa(fissure, px))
    else:
        csd = cd
        edge = _smoothstep(-0.012, 0.02, cd)
    cons = edge * ch.visible * ch.field_soft[s] * (0.9 + 0.1 * _smooth_noise(r, size, 24))
    region = (csd > 0) & ch.lung_bin[s]
    if not region.any():
        region = (cd > -px) & ch.lung_bin[s]
    b_thick, b_thin = _vessel_tree(sc, r, [(s * 0.15, 0.0, s)], csd > 0.01, trunks=(7, 9),
                                   generations=4, trunk_length=0.2)
    scale = size / 256.0
    bronchi = np.maximum(_blur_lines(b_thick, max(0.6, 0.9 * scale)),
                         _blur_lines(b_thin, max(0.5, 0.6 * scale)))
    out.dA += 0.4 * cons - 0.25 * cons * bronchi
    out.tex_keep *= 1.0 - 0.8 * np.clip(cons, 0.0, 1.0)
    out.masks[6] = region


def _pneumonia(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Pneumonia: patchy textured density in a lower zone."""
    sc = ch.sc
    u, v, size = sc.u, sc.v, sc.size
    s = 1 if r.random() < 0.5 else -1
    low_zone = v > np.maximum(-0.02, sc.dome(s * u, s) - 0.38)
    s, cu, cv = _lung_point(ch, r, s, low_zone, 0.06)
    rx, ry = r.uniform(0.15, 0.21), r.uniform(0.12, 0.17)
    _, q = _ellipse_sd(u, v, cu, cv, rx, ry, r.uniform(0, np.pi))
    env = _smoothstep(1.0, 0.6, q)
    blots = (_smoothstep(-0.5, 0.5, _smooth_noise(r, size, 20))
             * (0.75 + 0.25 * _smooth_noise(r, size, 44)))
    out.dA += 0.42 * env * np.clip(blots, 0, 1) * ch.visible * ch.field_soft[s]
    out.masks[7] = (q < 1.0) & ch.lung_bin[s]


def _atelectasis(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Atelectasis: plate-like (discoid) band or basal wedge above the diaphragm."""
    sc = ch.sc
    u, v, px = sc.u, sc.v, sc.px
    s = 1 if r.random() < 0.5 else -1
    aa = s * u
    above = sc.dome(aa, s) - v
    base_zone = (above > 0.05) & (above < 0.22) & (aa > 0.22) & (aa < 0.6)
    s, cu, cv = _lung_point(ch, r, s, base_zone, 0.03)
    if r.random() < 0.55:  # plate (discoid) atelectasis
        ln = r.uniform(0.11, 0.17)
        th = r.uniform(-0.3, 0.3)
        hw = max(r.uniform(0.012, 0.02), 0.7 * px)
        dx, dy = ln * math.cos(th), ln * math.sin(th)
        asd = _segment_sd(u, v, (cu - dx, cv - dy), (cu + dx, cv + dy), hw)
    else:  # wedge: base on the diaphragm, apex towards the hilum
        b0, b1 = s * (abs(cu) - 0.1), s * (abs(cu) + 0.12)
        p0 = (b0, float(sc.dome(np.asarray(abs(b0)), s)) + 0.03)
        p1 = (b1, float(sc.dome(np.asarray(abs(b1)), s)) + 0.03)
        apex = (s * max(abs(cu) - 0.12, 0.2), cv - r.uniform(0.12, 0.2))
        asd = _triangle_sd(u, v, p0, p1, apex)
    ate = _aa(asd, px) * ch.field_soft[s]
    out.dA += 0.36 * ate * (1.0 - 0.6 * ch.sil)
    region = (asd > 0) & ch.lung_bin[s]
    if not region.any():
        region = (asd > -px) & ch.lung_bin[s]
    if not region.any():
        rr, cc = _choose_pixel(r, base_zone & ch.lung_bin[s], ch.lung_bin[s])
        region = np.zeros_like(ch.lung_any)
        region[rr, cc] = True
    out.masks[8] = region


def _pleural_other(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Pleural Other: wavy pleural thickening along the lateral chest wall."""
    u, v, px = ch.sc.u, ch.sc.v, ch.sc.px
    sd = ch.sd
    s = 1 if r.random() < 0.5 else -1
    v1 = r.uniform(-0.45, 0.0)
    v2 = v1 + r.uniform(0.35, 0.55)
    tk = (max(r.uniform(0.022, 0.038), 1.2 * px)
          * (1.0 + 0.35 * np.sin(v * r.uniform(25, 45) + r.uniform(0, 6))))
    span = _smoothstep(v1 - 0.03, v1 + 0.03, v) * _smoothstep(v2 + 0.03, v2 - 0.03, v)
    lateral = (s * u > 0.45)
    band_sd = np.minimum(tk - sd[s], sd[s] + 0.5 * px)
    band = _aa(band_sd, px) * span * lateral
    out.dA += 0.38 * band
    region = (band_sd > 0) & (span > 0.5) & lateral & ch.field_bin[s]
    if not region.any():
        region = (sd[s] > 0) & (sd[s] < 2 * px) & lateral & (span > 0)
    out.masks[11] = region


def _support_device_layer(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> None:
    """Support Devices: tubes, lines, ECG leads, pacemaker (see :func:`_support_devices`)."""
    dev, dev_bin, kinds = _support_devices(ch.sc, r, ch.body_bin)
    out.dA += 0.75 * dev
    out.masks[13] = dev_bin
    out.params["devices"] = kinds


_LesionStep = Callable[[_Chest, np.random.Generator, _LesionLayers], None]

#: The lesion steps after the anatomy (Fracture is drawn with the ribs), in the order their density
#: is summed: floating-point addition is not associative, so reordering them can change the image.
_LESION_STEPS: tuple[tuple[int, _LesionStep], ...] = (
    (1, _enlarged_cardiomediastinum), (2, _cardiomegaly), (9, _pneumothorax),
    (10, _pleural_effusion), (3, _lung_opacity), (4, _lung_lesion), (5, _edema),
    (6, _consolidation), (7, _pneumonia), (8, _atelectasis), (11, _pleural_other),
    (13, _support_device_layer),
)


def _infection(ch: _Chest, r: np.random.Generator, out: _LesionLayers) -> np.ndarray:
    """COVID-19-like peripheral ground-glass opacities (QaTa-COV19) on one or both sides: adds their
    density to ``out`` and returns their mask (bool, never empty)."""
    v, size = ch.sc.v, ch.sc.size
    sd, lung_bin = ch.sd, ch.lung_bin
    sides = [-1, 1] if r.random() < 0.75 else [1 if r.random() < 0.5 else -1]
    inf_mask = np.zeros_like(ch.lung_any)
    for s in sides:
        width = r.uniform(0.14, 0.24)
        v_lo = r.uniform(-0.4, -0.05)
        noise = _smooth_noise(r, size, 9)
        zone = _smoothstep(width, width * 0.4, sd[s]) * _smoothstep(v_lo - 0.05, v_lo + 0.1, v)
        gg = zone * _smoothstep(-0.9, 0.3, noise) * ch.field_soft[s] * ch.visible
        out.dA += 0.2 * gg * (0.8 + 0.2 * _smooth_noise(r, size, 30))
        inf_mask |= (gg > 0.2) & lung_bin[s]
    if not inf_mask.any():
        s = sides[0]
        inf_mask = lung_bin[s] & (sd[s] < 0.12) & (v > -0.2)
        if not inf_mask.any():
            inf_mask = lung_bin[s].copy()
        out.dA += 0.14 * inf_mask
    return inf_mask


def _lung_texture_and_lesions(ch: _Chest, A: np.ndarray, vessels: np.ndarray,
                              rng: np.random.Generator, out: _LesionLayers) -> np.ndarray:
    """Add the lung texture (vessels and fine noise from ``rng``, modulated by the lesions) and the
    lesions' density to the attenuation ``A``."""
    an = ch.sc.an
    tex_weight = ch.visible + ch.field_any_soft * ch.sil * 0.3
    fine = _smooth_noise(rng, ch.sc.size, 48)
    keep, extra = out.tex_keep, out.tex_extra
    A = A + (an.vessel * vessels * (keep + extra) + 0.02 * fine * (keep + 3.0 * extra)) * tex_weight
    return A + out.dA * ch.body


def draw_frontal(
    rng: np.random.Generator,
    image_size: int = 256,
    findings: Iterable[int | str] = (),
    anatomy: Anatomy | None = None,
    infection: bool = False,
) -> Phantom:
    """Draw one frontal radiograph with the visual signatures of ``findings`` and the true masks.

    The steps (functions above) run in a fixed order, each purpose with its own child generator:
    body, lungs and silhouette, vessels, ribs (and Fracture), clavicles, normal attenuation, the
    other findings (:data:`_LESION_STEPS`), infection, lung texture, exposure.

    Args:
        rng: the image's generator (see :func:`phantom_rng`); the result depends only on its state
            and the other arguments.
        image_size: output height = width in pixels (at least 32).
        findings: observations to draw (names or indices of :data:`~bundle.constants.OBSERVATIONS`;
            "No Finding" is ignored).
        anatomy: the patient's anatomy (default: sampled from ``rng``).
        infection: also draw COVID-19-like peripheral ground-glass opacities (QaTa-COV19), mask in
            :attr:`Phantom.infection`.

    Returns:
        a :class:`Phantom`.
    """
    size = int(image_size)
    if size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    wanted = sorted({_obs_index(f) for f in findings} - {0})
    seeds = rng.integers(0, 2**63 - 1, size=NUM_OBSERVATIONS + 4)
    # one child generator per purpose: anatomy, pose, texture, noise, each lesion, infection
    sub = [np.random.default_rng(int(s)) for s in seeds]
    an = anatomy if anatomy is not None else sample_anatomy(sub[0])
    pose = _pose(sub[1])
    has = set(wanted)
    lesion_rngs = {k: sub[4 + k - 1] for k in range(1, NUM_OBSERVATIONS)}
    # two observations change the anatomy itself
    sc = _Scene(size, an, pose, ecm_widen=lesion_rngs[1].uniform(0.07, 0.11) if 1 in has else 0.0,
                heart_scale=lesion_rngs[2].uniform(1.28, 1.42) if 2 in has else 1.0)
    out = _LesionLayers.empty(size, pose)
    body, body_bin, soft = _frontal_body(sc)
    ch = _frontal_chest(sc, body, body_bin)
    vessels, hilum = _frontal_vessels(ch, sub[2])
    ribs, k_idx, cage_soft = _posterior_ribs(sc)
    if 12 in has:
        ribs = _fracture(ch, lesion_rngs[12], ribs, k_idx, cage_soft, out)
    clav, clav_bin = _clavicles(sc)
    A = _normal_attenuation(ch, soft, hilum, ribs, _anterior_ribs(sc, cage_soft), clav)
    for k, step in _LESION_STEPS:
        if k in has:
            step(ch, lesion_rngs[k], out)
    # the infection has its own generator: the rest of the picture is unchanged
    inf_mask = _infection(ch, sub[4 + NUM_OBSERVATIONS - 1], out) if infection else None
    A = _lung_texture_and_lesions(ch, A, vessels, sub[2], out)
    img = _expose(A, pose, sub[3])  # exposure, film response, noise
    anat = np.stack([ch.lung_bin[1], ch.lung_bin[-1], ch.heart_bin, clav_bin[1], clav_bin[-1]])
    out.masks[0] = 0
    # the masks only where the signature is: inside the body
    out.masks &= body_bin[None].astype(np.uint8)
    return Phantom(image=img, anatomy=anat.astype(np.uint8), lesions=out.masks,
                   body=body_bin.astype(np.uint8), findings=tuple(wanted),
                   infection=None if inf_mask is None else inf_mask.astype(np.uint8),
                   params=out.params)


def _triangle_sd(u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
                 p2: tuple[float, float]) -> np.ndarray:
    """Signed distance (positive inside, exact inside) to a triangle, approximated outside by the edge lines."""
    pts = (p0, p1, p2)
    # orientation
    area = (p1[0] - p0[0]) * (p2[1] - p0[1]) - (p1[1] - p0[1]) * (p2[0] - p0[0])
    sgn = 1.0 if area > 0 else -1.0
    out = None
    for i in range(3):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % 3]
        ex, ey = x1 - x0, y1 - y0
        n = math.hypot(ex, ey) + 1e-12
        d = sgn * (ex * (v - y0) - ey * (u - x0)) / n
        out = d if out is None else np.minimum(out, d)
    return out


def _bezier(points: Sequence[tuple[float, float]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of the Bezier curve with control ``points`` (De Casteljau, vectorised over ``t``)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = [np.asarray(p, dtype=np.float64)[None] for p in points]
    while len(pts) > 1:
        pts = [(1 - t) * a + t * b for a, b in zip(pts[:-1], pts[1:])]
    return pts[0][:, 0], pts[0][:, 1]


def _support_devices(sc: _Scene, r: np.random.Generator,
                     body_bin: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Tubes, lines, ECG leads and a pacemaker: returns (density in [0, 1], mask, kinds drawn)."""
    size = sc.size
    kinds_all = ["endotracheal tube", "nasogastric tube", "central line", "ECG leads", "pacemaker"]
    n = int(r.choice([1, 1, 2, 2, 3]))
    kinds = sorted(r.choice(len(kinds_all), size=n, replace=False).tolist())
    thin = np.zeros((size, size), np.float32)
    thick = np.zeros((size, size), np.float32)
    solid = np.zeros((size, size), np.float32)
    u, v, px = sc.u, sc.v, sc.px

    def splat(canvas: np.ndarray, cu: np.ndarray, cv: np.ndarray) -> None:
        rows, cols = sc.to_pixel(cu, cv)
        rows, cols = np.round(rows).astype(np.int64), np.round(cols).astype(np.int64)
        ok = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        canvas[rows[ok], cols[ok]] = 1.0

    npts = 4 * size
    for k in kinds:
        name = kinds_all[k]
        if name == "endotracheal tube":
            tip = r.uniform(-0.42, -0.25)
            cu, cv = _bezier([(0.0, -1.3), (r.uniform(-0.03, 0.03), -0.8), (0.0, tip)], npts)
            splat(thick, cu, cv)
        elif name == "nasogastric tube":
            end = (0.38 + r.uniform(-0.05, 0.05), float(sc.dome(np.asarray(0.38), +1)) + r.uniform(0.1, 0.2))
            cu, cv = _bezier([(-0.02, -1.3), (0.04, -0.2), (0.02, 0.45), end], npts)
            splat(thin, cu, cv)
        elif name == "central line":
            s = 1 if r.random() < 0.5 else -1
            cu, cv = _bezier([(s * 0.75, -0.78), (s * 0.35, r.uniform(-0.62, -0.52)), (-0.03, -0.45),
                              (-0.05, r.uniform(-0.2, -0.05))], npts)
            splat(thin, cu, cv)
        elif name == "ECG leads":
            for _ in range(int(r.integers(2, 5))):
                cu0, cv0 = r.uniform(-0.75, 0.75), r.uniform(-0.6, 0.5)
                ring, _ = _ellipse_sd(u, v, cu0, cv0, 0.035, 0.035)
                solid = np.maximum(solid, _aa(np.minimum(ring, 0.012 - ring), px)
                                   + 0.6 * _aa(ring - 0.022, px))
                end = (np.clip(cu0 + r.uniform(-0.4, 0.4), -0.85, 0.85), -1.2 if cv0 < 0 else 1.2)
                cu, cv = _bezier([(cu0, cv0), (cu0 + r.uniform(-0.3, 0.3), (cv0 + end[1]) / 2), end], npts)
                splat(thin, cu, cv)
        elif name == "pacemaker":
            gu, gv = r.uniform(0.4, 0.55), r.uniform(-0.55, -0.42)
            gsd = _segment_sd(u, v, (gu - 0.04, gv), (gu + 0.04, gv), 0.045)
            solid = np.maximum(solid, _aa(gsd, px) * (1.0 + 0.3 * _aa(gsd - 0.015, px)))
            tip = (r.uniform(0.12, 0.25), r.uniform(0.3, 0.38))
            cu, cv = _bezier([(gu, gv), (0.05, -0.6), (-0.1, -0.1), tip], npts)
            splat(thin, cu, cv)
    scale = size / 256.0
    dens = np.zeros((size, size), np.float32)
    mask = solid > 0.3
    for canvas, sigma, gain in ((thin, 0.7, 1.0), (thick, 2.0, 0.55)):
        if canvas.any():
            s_px = max(0.55, sigma * scale)
            blur = ndi.gaussian_filter(canvas, s_px, mode="constant") * (math.sqrt(2 * math.pi) * s_px)
            line = np.clip(blur, 0.0, 1.0)
            dens = np.maximum(dens, gain * line)
            mask |= line > 0.25
    if thick.any():  # the radiopaque stripe of the endotracheal tube
        s_px = max(0.5, 0.5 * scale)
        stripe = np.clip(ndi.gaussian_filter(thick, s_px, mode="constant") * (math.sqrt(2 * math.pi) * s_px), 0, 1)
        dens = np.maximum(dens, stripe)
    dens = np.maximum(dens, solid.clip(0, 1.3))
    mask &= body_bin
    if not mask.any():  # everything fell outside the body: keep the densest pixel inside it
        flat = int(np.argmax(np.where(body_bin, dens, -1.0)))
        mask.ravel()[flat] = True
    return dens, mask, [kinds_all[k] for k in kinds]


def draw_lateral(rng: np.random.Generator, image_size: int = 256, anatomy: Anatomy | None = None) -> np.ndarray:
    """Draw a lateral chest radiograph (patient facing the image's left; no masks): float32 ``(H, W)`` in [0, 1]."""
    size = int(image_size)
    if size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    seeds = rng.integers(0, 2**63 - 1, size=4)
    sub = [np.random.default_rng(int(s)) for s in seeds]
    an = anatomy if anatomy is not None else sample_anatomy(sub[0])
    pose = _pose(sub[1])
    sc = _Scene(size, an, pose)
    u, v, px = sc.u, sc.v, sc.px
    # body: chest wall in front (image left), back behind the spine, arms raised over the upper chest
    front = -0.84 + 0.1 * (v + 0.1) ** 2
    back = 0.86 + 0.04 * v
    body = _aa(np.minimum(u - front, back - u), px)
    arms = _smoothstep(-0.45, -0.75, v) * body
    A = body * an.soft * (0.85 + 0.15 * _smoothstep(0.0, 0.6, v)) + 0.12 * arms
    # lungs: one field in front of the spine, deeper behind (posterior costophrenic recess)
    diaphragm = 0.32 + sc.inspiration + 0.16 * (u + 0.6) - 0.22 * u * u
    t = np.clip((v + 0.02) / 0.7, -1.0, 1.0)
    d_outer, _ = _ellipse_sd(u - 0.1 * t, v, 0.06, -0.02, 0.52 + 0.1 * t, 0.7)
    lsd = np.minimum(d_outer, diaphragm - v)
    lung = _smoothstep(-0.03, 0.06, lsd)
    depth = _blur(lung, 0.06 / px)
    heart_sd, _ = _ellipse_sd(u, v, -0.32, 0.24, 0.34, 0.28, -0.5)
    heart = _smoothstep(-0.04, 0.06, np.minimum(heart_sd, diaphragm + 0.1 - v))
    A = A - an.air * 0.95 * lung * (0.5 + 0.5 * depth) * (1.0 - 0.75 * heart) + 0.06 * heart * body
    A = A + 0.08 * _aa(v - diaphragm, px) * body
    # spine: vertebral bodies along a gentle kyphosis at the back, posterior elements behind
    x_sp = 0.60 + 0.06 * (v + 0.2) ** 2
    vb = np.cos((v - an.rib_first) * (2 * np.pi / 0.11))
    spine = _aa(0.07 - np.abs(u - x_sp), px) * (0.7 + 0.3 * _smoothstep(-0.4, 0.4, vb))
    post = _aa(0.05 - np.abs(u - x_sp - 0.13), px) * 0.5 * (0.6 + 0.4 * _smoothstep(-0.2, 0.6, vb))
    sternum = _aa(0.02 - np.abs(u - front - 0.1), px) * _smoothstep(-0.7, -0.6, v) * _smoothstep(0.3, 0.2, v)
    trachea = _aa(np.minimum(0.03 - np.abs(u + 0.02 - 0.1 * (v + 0.9)), -0.18 - v), px)
    ka = (v - 0.55 * u) / 0.105
    ribs = _aa((0.2 - np.abs(ka - np.round(ka))) * 0.1, px) * lung * _smoothstep(-0.1, 0.5, u) * 0.5
    A = A + an.bone * (1.6 * spine + post + sternum + ribs) - 0.12 * trachea
    thick_c, thin_c = _vessel_tree(sc, sub[2], [(0.0, -0.04, -1), (0.0, -0.04, 1)], lsd > 0, trunks=(4, 6))
    scale = size / 256.0
    tex = np.maximum(_blur_lines(thick_c, max(0.6, 1.1 * scale)), _blur_lines(thin_c, max(0.5, 0.6 * scale)))
    A = A + 0.7 * an.vessel * tex * lung * (1.0 - 0.7 * heart)
    return _expose(A, pose, sub[3])


def _obs_index(f: int | str) -> int:
    if isinstance(f, (int, np.integer)):
        if not 0 <= int(f) < NUM_OBSERVATIONS:
            raise ValueError(f"observation index out of range: {f}")
        return int(f)
    if f not in _OBS_INDEX:
        raise ValueError(f"unknown observation {f!r}; expected one of {list(OBSERVATIONS)}")
    return _OBS_INDEX[f]


# ----------------------------------------------------------------------------------------------------------------
# dataset writers
# ----------------------------------------------------------------------------------------------------------------



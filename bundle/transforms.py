"""MONAI transforms that load radiographs and masks with the conventions of :mod:`bundle.data.io`.

Array transforms (:class:`LoadRadiograph`, :class:`LoadMask`) and their dictionary counterparts
(:class:`LoadRadiographd`, :class:`LoadMaskd`) mirror MONAI's ``LoadImage``/``LoadImaged``: the output is a
channel-first :class:`monai.data.MetaTensor` whose meta holds ``filename_or_obj`` and ``spatial_shape``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (InvertibleTransform, MapTransform, RandomizableTransform, Resized,
                              ScaleIntensityRangePercentilesd, Transform)

from .utils import BundleInputError
from .data.io import (encode_bitmask, load_bitmask, load_mask, load_radiograph, resample_image, resize_mask,
                      size_mismatch_problem)


def _meta_tensor(arr: np.ndarray, meta: Mapping[str, Any], dtype: torch.dtype) -> MetaTensor:
    out_meta = {
        "filename_or_obj": meta.get("filename_or_obj", ""),
        "spatial_shape": np.asarray(meta.get("spatial_shape", arr.shape[-2:])),
        "original_channel_dim": "no_channel",
    }
    if "affine" in meta:
        out_meta["original_affine"] = np.asarray(meta["affine"])
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(arr), dtype=dtype), meta=out_meta)


class LoadRadiograph(Transform):
    """Load one radiograph (PNG, JPEG, DICOM, NIfTI, ...) as a ``(1, H, W)`` float32 MetaTensor in ``[0, 1]``."""

    def __call__(self, path: str) -> MetaTensor:
        arr, meta = load_radiograph(path)
        return _meta_tensor(arr[None], meta, torch.float32)


class LoadMask(Transform):
    """Load a binary mask, a list of per-channel masks, or a bit-mask image into a ``(C, H, W)`` MetaTensor.

    Args:
        num_bitmask_channels: when set, a label given as a single file is decoded as a bit mask with this many
            channels (bit ``k`` -> channel ``k``: the bundle's inference output and MONAI Label's label files); a
            list of per-structure files is read as such (and ``union_groups`` applies to it only).
        union_groups: optional list of channel-index groups; each output channel of a list of per-structure masks is
            the union of its group (e.g. ``[[0, 1], [2], [3, 4]]`` turns SCR's five structures into lungs, heart,
            clavicles).
        required_nonempty: raise when a loaded mask (each file) is empty.
        dtype: output dtype (float32 by default, ready for losses).
    """

    def __init__(self, num_bitmask_channels: int | None = None, union_groups: Sequence[Sequence[int]] | None = None,
                 required_nonempty: bool = False, dtype: torch.dtype = torch.float32):
        self.num_bitmask_channels = num_bitmask_channels
        self.union_groups = union_groups
        self.required_nonempty = required_nonempty
        self.dtype = dtype

    def __call__(self, path: str | Sequence[str]) -> MetaTensor:
        single = isinstance(path, (str, os.PathLike))
        paths = [os.fspath(path)] if single else [os.fspath(p) for p in path]
        if single and self.num_bitmask_channels is not None:
            arr = load_bitmask(paths[0], self.num_bitmask_channels)
        else:
            masks = [load_mask(p, required_nonempty=self.required_nonempty) for p in paths]
            shapes = {m.shape for m in masks}
            if len(shapes) > 1:
                raise BundleInputError(paths[0], f"per-channel masks differ in size: {sorted(shapes)} ({paths})")
            arr = np.stack(masks)
            if self.union_groups is not None:
                arr = np.stack([arr[list(g)].max(axis=0) for g in self.union_groups])
        return _meta_tensor(arr, {"filename_or_obj": paths[0], "spatial_shape": arr.shape[-2:]}, self.dtype)


class LoadRadiographd(MapTransform):
    """Dictionary version of :class:`LoadRadiograph`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadRadiograph()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


class LoadMaskd(MapTransform):
    """Dictionary version of :class:`LoadMask`; with ``image_key`` it also matches the image to the mask's grid.

    An image of the mask's size is left as it is. An image of another size with the same aspect ratio (within
    :data:`~bundle.data.io.MAX_ASPECT_DIFFERENCE`; e.g. a JSRT ``.IMG`` at 2048 x 2048 with its SCR masks at
    1024 x 1024) is resampled to the **mask's grid** (area averaging when shrinking, bilinear when growing;
    :func:`~bundle.data.io.resample_image`), so labels are never interpolated and metrics are computed on the grid
    the reference was drawn on. Another aspect ratio is an error naming the mask.

    Args:
        match_image: resample the image as above (``False``: any size difference is an error).
    """

    def __init__(self, keys: KeysCollection, image_key: str | None = "image", num_bitmask_channels: int | None = None,
                 union_groups: Sequence[Sequence[int]] | None = None, required_nonempty: bool = False,
                 dtype: torch.dtype = torch.float32, allow_missing_keys: bool = False, match_image: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.match_image = match_image
        self.loader = LoadMask(num_bitmask_channels, union_groups, required_nonempty, dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            src = d[key]
            d[key] = self.loader(src)
            image = d.get(self.image_key) if self.image_key else None
            if not isinstance(image, torch.Tensor) or tuple(image.shape[-2:]) == tuple(d[key].shape[-2:]):
                continue
            name = src if isinstance(src, str) else src[0]
            image_name = image.meta.get("filename_or_obj", "") if hasattr(image, "meta") else ""
            size = tuple(int(s) for s in d[key].shape[-2:])
            problem = size_mismatch_problem(image.shape[-2:], size)
            if problem or not self.match_image:
                raise BundleInputError(name, (problem or f"mask size {size} differs from image size "
                                              f"{tuple(image.shape[-2:])}") + f" ({image_name})")
            arr = np.stack([resample_image(c, size) for c in image.detach().cpu().numpy()])
            meta = dict(image.meta) if hasattr(image, "meta") else {}
            d[self.image_key] = _meta_tensor(arr, {**meta, "spatial_shape": size}, image.dtype)
        return d


class BitmaskLabeld(MapTransform):
    """Binary multi-label masks ``(C, H, W)`` (``> 0.5`` is on) into one integer label map, the bundle's label
    format: channel ``k`` sets bit ``k`` (lungs = 1, heart = 2, clavicles = 4; overlapping structures add up, e.g.
    5 = lungs and clavicles), uint8 (uint16 above 8 channels).

    The map is 2-D in MONAI's spatial order ``(x, y)`` = ``(W, H)``, the transpose of the bundle's ``(row, column)``
    arrays, because that is what MONAI's writers expect of an image (MONAI Label's writer, like ``SaveImage``, turns
    ``(x, y)`` arrays back into rows and columns): the stock MONAI Label app then writes the mask in the input's
    geometry. The reference image ``ref_key`` gets the map's ``spatial_shape`` in the same order in its meta (a copy,
    sharing the pixels), so that MONAI Label's ``Restored`` sees nothing left to resize.
    :class:`~bundle.workflows.inference.SaveMasksd` writes the map in the input's rows and columns;
    :func:`~bundle.data.io.decode_bitmask` of its transpose gives the channels back."""

    def __init__(self, keys: KeysCollection = "pred", ref_key: str | None = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            masks = torch.as_tensor(d[key]).detach().cpu().numpy() > 0.5
            if masks.ndim != 3:
                raise ValueError(f"{key}: expected (C, H, W) masks, got shape {masks.shape}")
            label = encode_bitmask(masks)
            label = label.astype(np.uint8) if masks.shape[0] <= 8 else label
            d[key] = np.ascontiguousarray(label.T)
            ref = d.get(self.ref_key) if self.ref_key else None
            if isinstance(ref, MetaTensor):
                d[self.ref_key] = MetaTensor(ref.as_tensor(), meta={**ref.meta,
                                                                   "spatial_shape": np.asarray(d[key].shape)})
        return d


class PrepareRadiographd(MapTransform, InvertibleTransform):
    """The network input of every stage, defined once: the radiograph resized to ``spatial_size`` with area
    averaging, then scaled to ``[0, 1]`` between its 0.5th and 99.5th intensity percentiles (clipped). MONAI's
    ``Resized`` then ``ScaleIntensityRangePercentilesd``; invertible (the resize), so that ``Invertd`` over a
    pipeline that contains it restores the input's size (inference).

    A deterministic :class:`~monai.transforms.MapTransform`, not a ``Compose``: MONAI's ``Compose`` is
    ``Randomizable``, and ``CacheDataset`` caches only up to the first randomizable transform, so as a ``Compose`` it
    re-ran the resize and the percentiles (and every transform after them) for every item of every training step
    (measured: 4.3 ms of the 5.7 ms an item cost, about 7% of a fine-tuning step on 2 CPU cores).
    """

    #: intensity percentiles mapped to 0 and 1
    LOWER, UPPER = 0.5, 99.5

    def __init__(self, keys: KeysCollection = "image", spatial_size: Sequence[int] = (128, 128),
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.resize = Resized(keys=keys, spatial_size=tuple(int(s) for s in spatial_size), mode="area",
                              allow_missing_keys=allow_missing_keys)
        self.scale = ScaleIntensityRangePercentilesd(keys=keys, lower=self.LOWER, upper=self.UPPER, b_min=0.0,
                                                     b_max=1.0, clip=True, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.scale(self.resize(data))

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the resize (the intensity scaling is not inverted, as MONAI's ``Invertd`` skips it too)."""
        return self.resize.inverse(data)


class ResizeLiked(MapTransform):
    """Resize ``keys`` (channel-first ``(C, h, w)``) to the spatial size of ``ref_key`` (e.g. predictions back to the
    label's original size for evaluation). Use on logits or probabilities, before thresholding.

    Args:
        keys: what to resize (e.g. ``pred``).
        ref_key: the item whose last two dimensions give the size (e.g. ``label``).
        mode: ``bilinear`` (default) or ``nearest`` (``torch.nn.functional.interpolate`` modes).
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "label", mode: str = "bilinear",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        size = tuple(d[self.ref_key].shape[-2:])
        for key in self.key_iterator(d):
            x = d[key]
            if tuple(x.shape[-2:]) == size:
                continue
            t = torch.as_tensor(x).float()[None]
            kwargs = {"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
            out = torch.nn.functional.interpolate(t, size=size, mode=self.mode, **kwargs)[0]
            d[key] = out.as_tensor() if hasattr(out, "as_tensor") else out
        return d


class ResizeMaskd(MapTransform):
    """Resize channel-first masks ``(C, H, W)`` to ``spatial_size`` on the image's pixel grid
    (:func:`bundle.data.io.resize_mask`: coverage resampled like the image by :class:`PrepareRadiographd`, then
    ``>= threshold``), keeping each input's dtype. The label counterpart of the image's area resize: MONAI's
    ``Resized(mode="nearest")`` would shift a halved mask by half a source pixel against its image (see
    :func:`~bundle.data.io.resize_mask` for the measured cost on thin structures). Metadata is dropped.

    Args:
        keys: the masks.
        spatial_size: ``(H, W)`` of the output.
        threshold: coverage from which a pixel is foreground.
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], threshold: float = 0.5,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = (int(spatial_size[0]), int(spatial_size[1]))
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
            if tuple(t.shape[-2:]) == self.spatial_size:
                continue
            out = resize_mask(t.detach().cpu().numpy(), self.spatial_size, self.threshold)
            d[key] = torch.as_tensor(out).to(t.dtype)
        return d


class RandAffineJointd(RandomizableTransform, MapTransform):
    """Random 2-D rotation, scaling and translation of several keys with **one** sampling grid, in float32 with
    ``torch.nn.functional.grid_sample``: the augmentation of the segmentation stages (image and masks move together).

    The same family of transforms as :class:`monai.transforms.RandAffined` with ``rotate_range``, ``scale_range`` and
    ``translate_range`` (no shear), about 5-10x cheaper on the CPU for 2-D images (MONAI's resamples in float64 and
    rebuilds the grid per key): at 128 x 128 and batch 8 MONAI's version cost about a fifth of a SegResNet training
    step on 2 cores, which the training loop would wait for (``scripts/bench_train.py``).

    Args:
        keys: channel-first ``(C, H, W)`` tensors of the same spatial size.
        prob: probability of transforming an item.
        rotate_range: angle drawn from ``U(-rotate_range, rotate_range)`` radians.
        scale_range: per-axis scale ``1 + U(-s, s)``: a number or ``(s_rows, s_cols)``.
        translate_range: per-axis shift ``U(-t, t)`` pixels: a number or ``(t_rows, t_cols)``.
        mode: ``bilinear`` / ``nearest`` / ``bicubic``, one or one per key (``nearest`` for masks).
        padding_mode: ``zeros`` / ``border`` / ``reflection``, one or one per key.

    Outputs keep each input's dtype (integer masks sampled with ``nearest`` stay exact); metadata is dropped.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.1, rotate_range: float = 0.0,
                 scale_range: float | Sequence[float] = 0.0, translate_range: float | Sequence[float] = 0.0,
                 mode: str | Sequence[str] = "bilinear", padding_mode: str | Sequence[str] = "border",
                 allow_missing_keys: bool = False):
        from monai.utils import ensure_tuple_rep

        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.rotate_range = float(rotate_range)
        self.scale_range = tuple(float(v) for v in ensure_tuple_rep(scale_range, 2))
        self.translate_range = tuple(float(v) for v in ensure_tuple_rep(translate_range, 2))
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        self._params = (0.0, 1.0, 1.0, 0.0, 0.0)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        angle = self.R.uniform(-self.rotate_range, self.rotate_range)
        s_rows, s_cols = (1.0 + self.R.uniform(-s, s) for s in self.scale_range)
        t_rows, t_cols = (self.R.uniform(-t, t) for t in self.translate_range)
        self._params = (float(angle), float(s_rows), float(s_cols), float(t_rows), float(t_cols))

    def theta(self, height: int, width: int) -> torch.Tensor:
        """The ``(1, 2, 3)`` matrix of ``affine_grid`` (normalised coordinates) for the drawn pixel-space affine."""
        angle, s_rows, s_cols, t_rows, t_cols = self._params
        c, s = math.cos(angle), math.sin(angle)
        lin = np.array([[c * s_cols, -s * s_rows], [s * s_cols, c * s_rows]])  # (x, y) pixel axes
        d = np.diag([2.0 / width, 2.0 / height])
        theta = np.zeros((2, 3))
        theta[:, :2] = d @ lin @ np.linalg.inv(d)
        theta[:, 2] = d @ np.array([t_cols, t_rows])
        return torch.as_tensor(theta, dtype=torch.float32)[None]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        grid = None
        for key, mode, padding in self.key_iterator(d, self.mode, self.padding_mode):
            x = d[key]
            x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
            if grid is None:
                grid = torch.nn.functional.affine_grid(self.theta(*x.shape[-2:]), [1, 1, *x.shape[-2:]],
                                                       align_corners=False)
            out = torch.nn.functional.grid_sample(x[None].float(), grid, mode=mode, padding_mode=padding,
                                                  align_corners=False)[0]
            if not x.is_floating_point():
                out = out.round().to(x.dtype)
            elif out.dtype != x.dtype:
                out = out.to(x.dtype)
            d[key] = out
        return d


class MaskLabelsd(MapTransform):
    """Turn list labels into float tensors and set ``NaN`` where ``mask_key`` is 0 (the entries to ignore)."""

    def __init__(self, keys: KeysCollection = "label", mask_key: str = "label_mask", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(np.asarray(d[key], dtype=np.float32))
            if self.mask_key in d:
                mask = torch.as_tensor(np.asarray(d[self.mask_key], dtype=np.float32))
                label = torch.where(mask > 0, label, torch.full_like(label, float("nan")))
            d[key] = label
        d.pop(self.mask_key, None)
        return d

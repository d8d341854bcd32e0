"""Inference outputs: one mask file per input radiograph, in the input's geometry, plus optional overlays.

Multi-label masks (structures may overlap, e.g. clavicles over lungs) are written as

- ``.png``: a bit-mask image (uint8; bit ``k`` set where structure ``k`` is: lungs = 1, heart = 2, clavicles = 4),
  decoded by :func:`bundle.data.io.load_bitmask`;
- ``.nii.gz``: a ``(X, Y, C)`` uint8 NIfTI with one binary channel per structure (the input's affine for NIfTI
  inputs, identity otherwise).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..data.io import decode_bitmask, encode_bitmask, save_nifti, save_png
from ..visualize import overlay_rgb

logger = logging.getLogger(__name__)

_COLOURS = [(255, 64, 64), (64, 160, 255), (255, 220, 0), (0, 220, 120), (220, 0, 220)]


def output_stem(path: str) -> str:
    """File name of ``path`` without folder and extension (``.nii.gz`` counted as one)."""
    name = os.path.basename(str(path))
    for ext in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".gif", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def list_inputs(dataset_dir: str | Sequence[str]) -> list[dict[str, str]]:
    """Inference items ``{"image": path}`` from a folder (PNG, JPEG, DICOM with or without suffix, NIfTI) or a list."""
    from ..data.segsets import image_list_items

    items, _ = image_list_items(dataset_dir)
    if not items:
        raise FileNotFoundError(f"{dataset_dir}: no radiograph found (PNG, JPEG, DICOM or NIfTI)")
    return items


def finish_inference(datalist: Sequence[Mapping[str, Any]], failure_log: Any, writer: "SaveMasksd",
                     output_dir: str) -> dict[str, Any]:
    """End of a batch inference: write ``<output_dir>/failures.csv`` (the inputs skipped, with their reasons; only
    a header when none failed), print ``inference: N written / M failed``, and exit with status 1 when any input
    failed (so that a script or scheduler notices). Returns the summary when all succeeded."""
    import shutil

    rows = failure_log.rows()
    csv_path = os.path.join(output_dir, "failures.csv")
    failure_log.write_csv(csv_path, rows)
    shutil.rmtree(failure_log.folder, ignore_errors=True)  # the records now live in failures.csv
    summary = {"inputs": len(datalist), "written": int(writer.saved), "failed": len(rows), "failures_csv": csv_path}
    message = (f"inference: {summary['written']} written / {summary['failed']} failed of {summary['inputs']} inputs "
               f"-> {output_dir}")
    if rows:
        message += f"; failures with their reasons: {csv_path}"
    logger.info(message)
    print(message, flush=True)
    if rows:
        raise SystemExit(message)
    return summary


class SaveMasksd(MapTransform):
    """Write each item's prediction as one file, named after its input, in the input's rows and columns: a bit-mask
    label map in MONAI's ``(x, y)`` order (:class:`~bundle.transforms.BitmaskLabeld`) or binary multi-label
    masks ``(C, H, W)``.

    Args:
        keys: the prediction key (already inverted to the input's geometry and thresholded).
        num_channels: the structures of a bit-mask label map (for the NIfTI channels and the overlay; default: as
            many as its highest set bit).
        output_dir: output folder.
        output_ext: ``".png"`` (bit mask) or ``".nii.gz"`` (multi-channel NIfTI).
        image_key: key of the input image (its meta gives the file name, the size and a NIfTI affine).
        overlay: also write ``<stem>_overlay.png`` (structures coloured over the radiograph).
        postfix: appended to the input's stem.
    """

    def __init__(self, keys: KeysCollection = "pred", output_dir: str = "./eval/inference", output_ext: str = ".png",
                 image_key: str = "image", overlay: bool = False, postfix: str = "_seg",
                 num_channels: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if output_ext not in (".png", ".nii.gz", ".nii"):
            raise ValueError(f"output_ext must be '.png', '.nii.gz' or '.nii', got {output_ext!r}")
        self.output_dir = output_dir
        self.output_ext = output_ext
        self.image_key = image_key
        self.overlay = overlay
        self.postfix = postfix
        self.num_channels = num_channels
        self.saved = 0  # inputs whose mask this writer has saved (the summary's "N written")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get(self.image_key)
        meta = getattr(image, "meta", {}) if image is not None else {}
        src = str(meta.get("filename_or_obj", "image"))
        stem = output_stem(src)
        for key in self.key_iterator(d):
            pred = torch.as_tensor(d[key]).detach().cpu().numpy()
            if pred.ndim == 2:  # a bit-mask label map in MONAI's (x, y) order (bundle.transforms.BitmaskLabeld)
                label = np.ascontiguousarray(pred.T).astype(np.uint16)
                masks = decode_bitmask(label, self.num_channels or max(1, int(label.max()).bit_length()))
            else:
                masks = (pred > 0.5).astype(np.uint8)
                label = encode_bitmask(masks)
            path = os.path.join(self.output_dir, f"{stem}{self.postfix}{self.output_ext}")
            if self.output_ext == ".png":
                save_png(path, label.astype(np.uint8) if masks.shape[0] <= 8 else label)
            else:
                affine = meta.get("original_affine")
                save_nifti(path, masks, None if affine is None else np.asarray(affine))
            if self.overlay and image is not None:
                self._save_overlay(src, masks, os.path.join(self.output_dir, f"{stem}_overlay.png"))
            d[f"{key}_path"] = path
            logger.info(f"saved {path}")
        self.saved += 1
        return d

    @staticmethod
    def _save_overlay(src: str, masks: np.ndarray, path: str) -> None:
        from ..data.io import load_radiograph

        img, _ = load_radiograph(src)
        rgb = overlay_rgb(img)
        for k in range(masks.shape[0]):
            if masks[k].shape == img.shape:
                colour = np.asarray(_COLOURS[k % len(_COLOURS)], dtype=np.float32)
                m = masks[k] > 0
                rgb = rgb.astype(np.float32)
                rgb[m] = 0.6 * rgb[m] + 0.4 * colour
                rgb = rgb.astype(np.uint8)
        save_png(path, rgb)

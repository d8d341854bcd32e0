"""Helpers shared by the tests (not part of the bundle)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from bundle.constants import OBSERVATIONS
from bundle.utils import PathLike, atomic_write_json, load_json


def write_oracle_doll(chexpert_datalist: PathLike, doll_dir: PathLike, doll_datalist: PathLike,
                      image_size: Sequence[int] = (128, 128), sections: Sequence[str] = ("training", "validation"),
                      max_items: int | None = None) -> dict[str, int]:
    """Write a DoLL datalist from the phantom's **true** lesion masks (an oracle DoLL: the upper bound of what the
    IG-to-DoLL stage can give), so pre-training can run without the classifier and DoLL stages.

    Each item of ``sections`` of the CheXpert datalist that has a ``lesion`` bit mask gets a DoLL bit-mask PNG at
    ``image_size`` (nearest-neighbour resize of the 256 px lesion mask, same bits) under ``doll_dir``, and an item
    ``{"image", "label", "targets", "patient", "lesion"}`` in ``doll_datalist`` (DoLL stage format). Files are
    written atomically; existing masks are kept.

    Returns:
        the number of items per section.
    """
    from PIL import Image

    from bundle.data.io import encode_bitmask, load_bitmask, save_png
    from bundle.data.phantom import LESIONS_DIR

    datalist = load_json(chexpert_datalist)
    out: dict[str, list[dict[str, Any]]] = {}
    h, w = (int(image_size[0]), int(image_size[1]))
    for section in sections:
        items = [it for it in datalist.get(section, []) if it.get("lesion")]
        if max_items is not None:
            items = items[: int(max_items)]
        out[section] = []
        for it in items:
            parts = os.path.normpath(it["lesion"]).split(os.sep)
            rel = parts[parts.index(LESIONS_DIR) + 1:] if LESIONS_DIR in parts else parts[-4:]
            path = os.path.join(os.fspath(doll_dir), *rel)
            masks = load_bitmask(it["lesion"], len(OBSERVATIONS))
            if not os.path.exists(path):
                small = np.stack([np.asarray(Image.fromarray(m * 255).resize((w, h), Image.NEAREST)) > 0
                                  for m in masks])
                save_png(path, encode_bitmask(small))
            targets = [k for k in range(1, len(OBSERVATIONS)) if masks[k].any()]  # indices, as the DoLL stage
            out[section].append({"image": it["image"], "label": os.path.abspath(path), "targets": targets,
                                 "patient": it.get("patient", ""), "lesion": it["lesion"]})
    atomic_write_json(doll_datalist, {"name": "oracle DoLL (true lesion masks)", "image_size": [h, w],
                                      "observations": list(OBSERVATIONS), **out})
    return {k: len(v) for k, v in out.items()}


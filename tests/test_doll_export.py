"""The DoLL data set export (bundle/doll/export.py): relative paths, identical masks, a card with the counts."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from bundle.constants import OBSERVATIONS
from bundle.data.io import encode_bitmask, save_png
from bundle.doll.export import export_doll_dataset
from bundle.utils import BundleInputError


def make_doll(tmp_path):
    root = tmp_path / "src"
    items = {"training": [], "validation": []}
    targets = {"a": [2, 5], "b": [5], "c": [9, 13]}
    for k, (name, t) in enumerate(targets.items()):
        image = root / "CheXpert-v1.0-small" / "train" / f"{name}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"jpeg")
        masks = np.zeros((14, 8, 8), np.uint8)
        for obs in t:
            masks[obs, k:k + 3, 2:5] = 1
        label = tmp_path / "doll" / f"{name}.png"
        label.parent.mkdir(exist_ok=True)
        save_png(label, encode_bitmask(masks))
        items["validation" if name == "c" else "training"].append(
            {"image": str(image), "label": str(label), "targets": t})
    datalist = tmp_path / "doll.json"
    datalist.write_text(json.dumps(items))
    return root, datalist, items


def test_export_writes_relative_datalist_identical_masks_and_a_card(tmp_path):
    root, datalist, items = make_doll(tmp_path)
    quality = tmp_path / "summary.csv"
    quality.write_text("observation,method,n,iou,dice,hit,judge,split,scoring\n"
                       'all,doll,3,0.25,0.4,0.75,phantom,validation,"grid, tolerance 3 px"\n')
    out = tmp_path / "CheXpert-DoLL"
    res = export_doll_dataset(datalist, root, out, name="CheXpert-DoLL", recipe={"ig": {"n_steps": 8}},
                              classifiers={"c0": {"val_mean_auroc": 0.84}}, quality_summary=quality, archive=True)
    assert res["n_images"] == 3 and res["per_split"] == {"training": 2, "validation": 1}
    exported = json.loads((out / "datalist.json").read_text())
    for split, rows in exported.items():
        for row, src in zip(rows, items[split]):
            assert (root / row["image"]).is_file() and not row["image"].startswith("/")
            assert (out / row["label"]).read_bytes() == open(src["label"], "rb").read()
            assert row["targets"] == src["targets"]
    card = json.loads((out / "data_card.json").read_text())
    assert card["per_observation"][OBSERVATIONS[5]] == 2 and card["per_observation"][OBSERVATIONS[13]] == 1
    assert card["per_observation"][OBSERVATIONS[1]] == 0 and card["recipe"] == {"ig": {"n_steps": 8}}
    text = (out / "DATA_CARD.md").read_text()
    assert "CheXpert-DoLL" in text and "| doll | 3 | 0.250 | 0.400 | 0.750 |" in text and "0.84" in text
    assert "IoU with the true lesions of the phantom, validation split, scored on the network's input grid with a " \
           "3 px pointing-game tolerance." in text
    with tarfile.open(res["archive"]) as tar:
        names = tar.getnames()
    assert "CheXpert-DoLL/datalist.json" in names and "CheXpert-DoLL/masks/CheXpert-v1.0-small/train/a.png" in names
    with pytest.raises(BundleInputError, match="not empty"):   # nothing already written is overwritten
        export_doll_dataset(datalist, root, out)


def test_export_refuses_images_outside_the_root_and_missing_masks(tmp_path):
    root, datalist, items = make_doll(tmp_path)
    with pytest.raises(BundleInputError, match="outside the image root"):
        export_doll_dataset(datalist, root / "CheXpert-v1.0-small" / "valid", tmp_path / "x")
    items["training"][0]["label"] = str(tmp_path / "gone.png")
    datalist.write_text(json.dumps(items))
    with pytest.raises(BundleInputError, match="gone.png"):
        export_doll_dataset(datalist, root, tmp_path / "y")

"""Pre-training label controls (bundle.doll.controls): known answers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bundle.doll.controls import (control_items, derangement, doll_datalist_name, doll_folder_name, explainer_of,
                                   gradcam_layer_for, init_pretrain_labels)
from bundle.utils import BundleInputError


def items(n: int) -> list[dict]:
    return [{"image": f"img{i}.png", "label": f"doll{i}.png", "targets": [i % 3, 5], "lesion": f"lesion{i}.png",
             "patient": f"p{i}"} for i in range(n)]


def test_each_init_names_the_labels_it_was_pre_trained_on():
    assert init_pretrain_labels("doll") == "doll"
    assert [init_pretrain_labels(f"doll_{c}") for c in ("shuffled", "oracle", "ig_single", "gradcam")] == [
        "shuffled", "oracle", "ig_single", "gradcam"]
    # no DoLL pre-training behind these (nor behind an unknown control)
    assert [init_pretrain_labels(i) for i in ("scratch", "classifier_encoder", "external", "doll_x")] == [None] * 4


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_derangement_moves_every_item(n):
    for seed in range(5):
        perm = derangement(n, seed)
        assert sorted(perm.tolist()) == list(range(n)) and not np.any(perm == np.arange(n))
    assert derangement(n, 1).tolist() == derangement(n, 1).tolist()  # seeded


def test_shuffled_control_keeps_the_label_statistics_and_moves_every_mask():
    src = items(12)
    out = control_items(src, "shuffled", seed=3)
    assert [o["image"] for o in out] == [s["image"] for s in src]           # same images, same order
    assert Counter(o["label"] for o in out) == Counter(s["label"] for s in src)  # every mask used once
    targets = lambda xs: Counter(t for x in xs for t in x["targets"])  # noqa: E731
    assert targets(out) == targets(src)                                      # each observation's label count kept
    assert all(o["label"] != s["label"] for o, s in zip(out, src))           # no image keeps its own DoLL
    for o in out:                                                            # the targets travel with their mask
        donor = next(s for s in src if s["image"] == o["label_from"])
        assert o["label"] == donor["label"] and o["targets"] == donor["targets"]
    assert src[0]["label"] == "doll0.png"                                    # the input is not modified


def test_oracle_control_reproduces_the_true_masks_and_doll_is_unchanged():
    src = items(4)
    assert [o["label"] for o in control_items(src, "oracle")] == [s["lesion"] for s in src]
    assert control_items(src, "doll") == src
    with pytest.raises(BundleInputError, match="img1.png"):
        control_items([src[0], {"image": "img1.png", "label": "x.png"}], "oracle")
    with pytest.raises(ValueError, match="unknown pretrain_labels"):
        control_items(src, "noise")


def test_generated_label_controls_have_their_own_data_sets(tmp_path):
    """ig_single and gradcam are DoLL data sets of their own (folder, datalist, explainer), taken as generated;
    shuffled and oracle rearrange the DoLL datalist; unknown names are refused."""
    import json

    assert [doll_datalist_name(x) for x in ("doll", "shuffled", "oracle", "ig_single", "gradcam")] == \
        ["doll.json", "doll.json", "doll.json", "doll_ig_single.json", "doll_gradcam.json"]
    assert [doll_folder_name(x) for x in ("doll", "ig_single", "gradcam")] == ["doll", "doll_ig_single", "doll_gradcam"]
    assert [explainer_of(x) for x in ("doll", "ig_single", "gradcam")] == ["ig", "ig", "gradcam"]
    with pytest.raises(ValueError, match="not generated"):
        doll_folder_name("shuffled")
    with pytest.raises(ValueError, match="unknown pretrain_labels"):
        doll_datalist_name("noise")
    items = [{"image": f"i{k}.png", "label": f"d{k}.png"} for k in range(3)]
    assert control_items(items, "gradcam") == items and control_items(items, "ig_single") == items
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "classifier.json").write_text(json.dumps({"arch": "densenet_small"}))
    assert gradcam_layer_for("ig", str(tmp_path), ["clf"]) is None
    assert gradcam_layer_for("gradcam", str(tmp_path), ["clf"]) == "class_layers.relu"
    assert gradcam_layer_for("ig_gradcam", str(tmp_path), ["clf"]) == "class_layers.relu"


def test_the_sweep_pretrains_the_missing_controls_first(tmp_path) -> None:
    """scripts/sweep.py: a grid with control inits lists one pre-training per missing (labels, arch) checkpoint,
    with the label generation first where a generated control's datalist is absent; made checkpoints are skipped."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.sweep import SweepGrid, pretrain_labels_of, pretrain_steps

    assert [pretrain_labels_of(i) for i in ("doll", "doll_shuffled", "doll_gradcam", "scratch", "external")] == [
        None, "shuffled", "gradcam", None, None]
    paths = {"data_root": str(tmp_path / "data"), "output_root": str(tmp_path / "eval"),
             "models_dir": str(tmp_path / "models")}
    made = tmp_path / "models" / "pretrain" / "segresnet_oracle" / "model.pt"
    made.parent.mkdir(parents=True)
    made.write_bytes(b"x")
    (tmp_path / "data" / "datalists").mkdir(parents=True)
    (tmp_path / "data" / "datalists" / "doll_ig_single.json").write_text("{}")
    grid = SweepGrid.from_mapping({"tasks": ["scr", "infection"], "sizes": [4], "seeds": [0, 1],
                                   "inits": ["doll", "doll_shuffled", "doll_gradcam", "doll_ig_single", "doll_oracle",
                                             "scratch"],
                                   "extra": [{"tasks": ["real_lungs"], "inits": ["doll_shuffled"], "sizes": [4],
                                              "seeds": [0], "overrides": {"init_checkpoints#doll_shuffled": "/w.pt"}}]})
    steps = pretrain_steps(grid.runs(), paths, {"device": "cpu"}, {"image_root": "/chexpert"}, {"max_epochs": 2})
    assert [s.name for s in steps] == ["pretrain_segresnet_shuffled", "pretrain_segresnet_gradcam",
                                       "pretrain_segresnet_ig_single"]
    by_name = {s.name: s for s in steps}
    assert [st["name"] for st in by_name["pretrain_segresnet_gradcam"].steps] == ["generate_doll_gradcam",
                                                                                   "pretrain_segresnet_gradcam"]
    gen, pre = by_name["pretrain_segresnet_gradcam"].steps
    assert gen["configs"] == ["generate_doll.yaml"] and gen["args"]["doll_labels"] == "gradcam"
    assert gen["args"]["image_root"] == "/chexpert" and "max_epochs" not in gen["args"]
    assert pre["args"]["pretrain_labels"] == "gradcam" and pre["args"]["max_epochs"] == 2
    assert pre["args"]["device"] == "cpu" and pre["args"]["models_dir"] == paths["models_dir"]
    assert [st["name"] for st in by_name["pretrain_segresnet_ig_single"].steps] == ["pretrain_segresnet_ig_single"]
    assert by_name["pretrain_segresnet_shuffled"].checkpoint == (
        tmp_path / "models" / "pretrain" / "segresnet_shuffled" / "model.pt")

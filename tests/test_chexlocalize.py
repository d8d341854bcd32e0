"""CheXlocalize adapter (bundle.data.chexlocalize): the COCO RLE decoder against pycocotools (the library the release
was encoded with) and a hand-computed case, the checks of a malformed file, the data stage giving CheXpert's
valid.csv images the radiologists' lesion masks that the DoLL quality stage scores against, and the release folder
with CheXpert's test set: CheXpert's own splits, tuned on the validation masks, judged on the test masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bundle.constants import OBSERVATIONS
from bundle.data.chexlocalize import decode_rle, parse_cxr_id, read_chexlocalize, rle_counts
from bundle.utils import BundleInputError
from data_formats import (CHEXLOCALIZE_TASKS, TEST_LABELS_COLUMNS, chexlocalize_mask, coco_rle, make_chexlocalize,
                          make_chexlocalize_release, make_chexpert_small)

#: The other phantoms the data stage draws (only CheXpert is given), as small as they come.
SMALL_PHANTOM = dict(image_size=48, scr_cases=3, qata_train=2, qata_test=1, num_workers=0, progress=False)
DATALISTS = dict(policy="ignore", check_files=True, on_error="raise")

coco_mask = pytest.importorskip("pycocotools.mask", reason="pycocotools (requirements-dev.txt) is the RLE reference")


def test_rle_decoder_matches_a_hand_computed_case():
    # 3 x 2 mask [[0, 1], [1, 1], [0, 0]]: column-major 0 1 0 | 1 1 0 -> runs 1 (bg), 1, 1 (bg), 2, 1 (bg)
    mask = np.array([[0, 1], [1, 1], [0, 0]], bool)
    assert rle_counts([1, 1, 1, 2, 1]).tolist() == [1, 1, 1, 2, 1]
    assert np.array_equal(decode_rle({"size": [3, 2], "counts": [1, 1, 1, 2, 1]}), mask)
    # the compressed string: '1' '1' '1' then the 4th count stored as 2 - 1 = 1 -> '1', the 5th as 1 - 1 = 0 -> '0'
    assert rle_counts("11110").tolist() == [1, 1, 1, 2, 1]
    assert np.array_equal(decode_rle({"size": [3, 2], "counts": "11110"}), mask)
    assert coco_rle(mask)["counts"] == "11110"                        # pycocotools writes the same string


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 48), (600, 731)])
def test_rle_decoder_matches_pycocotools(shape):
    rng = np.random.default_rng(sum(shape))
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    masks = [rng.random(shape) < 0.3, np.zeros(shape, bool), np.ones(shape, bool),
             (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 3) ** 2,  # long runs: counts of several 5-bit groups
             np.pad(np.ones((max(h - 2, 0), max(w - 2, 0)), bool), 1)[:h, :w]]
    for m in masks:
        enc = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
        ours = decode_rle({"size": list(enc["size"]), "counts": enc["counts"].decode()})
        ref = coco_mask.decode(enc).astype(bool)
        assert ours.shape == (h, w) and np.array_equal(ours, ref) and np.array_equal(ours, m)


def test_parse_ids():
    assert parse_cxr_id("patient64622_study1_view1_frontal") == ("patient64622", "study1", "view1_frontal")
    assert parse_cxr_id("patient64542_study1_view2_lateral") == ("patient64542", "study1", "view2_lateral")
    assert parse_cxr_id("64622_study1") is None


def _write(tmp_path, gt):
    path = tmp_path / "gt_segmentations_val.json"
    path.write_text(json.dumps(gt))
    return path


def test_read_maps_the_tasks_and_drops_empty_masks(tmp_path):
    disc = chexlocalize_mask("Edema", (40, 30), 0)
    other = chexlocalize_mask("Cardiomegaly", (40, 30), 0)
    gt = {"patient64541_study1_view1_frontal": {"Edema": coco_rle(disc), "Airspace Opacity": coco_rle(other),
                                                "Cardiomegaly": coco_rle(np.zeros((40, 30), bool))}}
    loc = read_chexlocalize(_write(tmp_path, gt).parent)             # the folder finds gt_segmentations_val.json
    key = ("patient64541", "study1", "view1_frontal")
    assert loc.radiographs == 1 and loc.sizes[key] == (40, 30)
    assert loc.counts() == {"Lung Opacity": 1, "Edema": 1}            # Airspace Opacity is Lung Opacity; empty dropped
    bits = loc.bitmask(key)
    assert bits.dtype == np.uint16 and bits.shape == (40, 30)
    assert np.array_equal((bits >> OBSERVATIONS.index("Edema")) & 1, disc)
    assert np.array_equal((bits >> OBSERVATIONS.index("Lung Opacity")) & 1, other)
    assert not ((bits >> OBSERVATIONS.index("Cardiomegaly")) & 1).any()


@pytest.mark.parametrize("entry, problem", [
    ({"patient1_view1": {}}, "is not of the form"),
    ({"patient1_study1_view1_frontal": {"Fracture": {"size": [2, 2], "counts": "4"}}}, "unknown task 'Fracture'"),
    ({"patient1_study1_view1_frontal": {"Edema": {"size": [2, 2], "counts": "3"}}}, "the runs cover 3 pixels"),
    ({"patient1_study1_view1_frontal": {"Edema": {"size": [2, 2], "counts": "1 "}}}, "not in the COCO RLE code"),
    ({"patient1_study1_view1_frontal": {"Edema": {"size": [2], "counts": "4"}}}, "size must be [height, width]"),
    ({"patient1_study1_view1_frontal": {"Edema": {"size": [2, 2], "counts": "4"},
                                        "Cardiomegaly": {"size": [3, 2], "counts": "6"}}}, "differs from"),
    ([1, 2], "expected a mapping of radiograph ids"),
])
def test_read_names_the_file_and_the_problem(tmp_path, entry, problem):
    path = _write(tmp_path, entry)
    with pytest.raises(BundleInputError) as err:
        read_chexlocalize(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_read_rejects_bad_json_and_missing_files(tmp_path):
    bad = tmp_path / "gt_segmentations_val.json"
    bad.write_text('{"patient1_study1_view1_frontal": ')
    with pytest.raises(BundleInputError, match="not valid JSON"):
        read_chexlocalize(bad)
    with pytest.raises(BundleInputError, match="no CheXlocalize ground truth in the folder"):
        read_chexlocalize(tmp_path / "..")
    with pytest.raises(BundleInputError, match="not found"):
        read_chexlocalize(tmp_path / "absent.json")


def test_data_stage_gives_valid_images_the_radiologists_masks(tmp_path):
    """With chexpert.localize in the data file, the test split (CheXpert's valid.csv) items of the matched radiographs
    point at lesion bit masks whose channels are the CheXlocalize masks at full size; the lateral view is counted as
    unmatched; the quality stage's split is the test split; nothing is written into the user's dataset folder."""
    from bundle.data.datalists import CHEXLOCALIZE_DIR
    from bundle.data.io import load_bitmask
    from bundle.data.userdata import prepare_data
    from bundle.doll.quality import lesion_items, lesion_judge

    top = make_chexpert_small(tmp_path / "user" / "chexpert", n_train=12, n_valid=4, side=32)
    gt_path = make_chexlocalize(top, tmp_path / "user" / "chexlocalize", scale=3)
    data_file = tmp_path / "user" / "data.yaml"
    data_file.write_text("chexpert: {root: chexpert, localize: chexlocalize}\n")    # relative to the data file
    before = sorted(p.relative_to(tmp_path / "user") for p in (tmp_path / "user").rglob("*"))
    out = tmp_path / "data"
    res = prepare_data(out / "phantom", out / "datalists", SMALL_PHANTOM, DATALISTS, data_spec=str(data_file))
    info = res["datalists"]["chexpert"]
    assert info["source"] == "real" and info["with_lesion"] == {"test": 4} and info["lesion_source"] == "CheXlocalize"
    datalist = json.loads((out / "datalists" / "chexpert.json").read_text())
    summary = datalist["summary"]["chexlocalize"]
    assert summary["radiographs"] == 5 and summary["unmatched"] == 1 and summary["matched"] == {"test": 4}
    assert summary["unmatched_examples"] == ["patient64541_study1_view2_lateral"]
    assert not any(it.get("lesion") for s in ("training", "validation") for it in datalist[s])
    gt = json.loads(gt_path.read_text())
    for k, item in enumerate(datalist["test"]):
        assert item["lesion"].startswith(str(out / "datalists" / CHEXLOCALIZE_DIR))
        bits = load_bitmask(item["lesion"], len(OBSERVATIONS))
        assert bits.shape == (len(OBSERVATIONS), 96, 96)                   # the full-size masks (3 x 32 px)
        cxr_id = "_".join(item["image"].rsplit(".", 1)[0].split("/")[-3:])
        for task in CHEXLOCALIZE_TASKS:
            assert np.array_equal(bits[OBSERVATIONS.index(task)].astype(bool), decode_rle(gt[cxr_id][task]))
        for other in ("No Finding", "Pneumonia", "Pleural Other", "Fracture"):
            assert not bits[OBSERVATIONS.index(other)].any()
    written = sorted((out / "datalists" / CHEXLOCALIZE_DIR).rglob("*.png"))
    assert len(written) == 4 and not any("lateral" in p.name for p in written)  # the matched radiographs only
    items = lesion_items(str(out / "datalists" / "chexpert.json"))
    assert [it["split"] for it in items] == ["test"] * 4 and lesion_judge(items) == "CheXlocalize"
    with pytest.raises(BundleInputError, match="no item with a lesion mask in validation"):
        lesion_items(str(out / "datalists" / "chexpert.json"), "validation")
    after = sorted(p.relative_to(tmp_path / "user") for p in (tmp_path / "user").rglob("*"))
    assert after == before


def test_a_bad_chexlocalize_file_stops_the_data_stage_before_any_datalist(tmp_path):
    from bundle.data.userdata import prepare_data

    top = make_chexpert_small(tmp_path / "user" / "chexpert", n_train=12, n_valid=4, side=32)
    gt_path = make_chexlocalize(top, tmp_path / "user" / "chexlocalize")
    gt = json.loads(gt_path.read_text())
    first = next(iter(gt))
    gt[first]["Edema"] = {"size": [64, 64], "counts": "5"}                 # covers 5 of 4,096 pixels
    gt_path.write_text(json.dumps(gt))
    data_file = tmp_path / "user" / "data.yaml"
    data_file.write_text(f"chexpert: {{root: chexpert, localize: {gt_path}}}\n")
    with pytest.raises(BundleInputError) as err:
        prepare_data(tmp_path / "data" / "phantom", tmp_path / "data" / "datalists", SMALL_PHANTOM, DATALISTS,
                     data_spec=str(data_file))
    assert str(gt_path) in str(err.value) and f"{first} / Edema" in str(err.value)
    assert not (tmp_path / "data" / "datalists" / "chexpert.json").exists()
    assert not (tmp_path / "data" / "datalists" / "chexlocalize").exists()


def test_masks_are_written_once_and_rewritten_when_the_file_changes(tmp_path):
    import os

    top = make_chexpert_small(tmp_path / "chexpert", n_train=2, n_valid=2, side=16)
    loc = read_chexlocalize(make_chexlocalize(top, tmp_path / "loc", lateral=False))
    from bundle.data.chexlocalize import write_chexlocalize_masks

    assert write_chexlocalize_masks(loc, tmp_path / "masks") == len(loc.masks) > 0
    assert write_chexlocalize_masks(loc, tmp_path / "masks") == 0           # a re-run resumes: nothing to redo
    later = os.path.getmtime(loc.path) + 10
    os.utime(loc.path, (later, later))                                     # a newer ground-truth file
    assert write_chexlocalize_masks(loc, tmp_path / "masks") == len(loc.masks)


@pytest.mark.parametrize("judge, scoring, words", [
    (None, None, "true lesions of the phantom"),
    ("phantom", "grid, tolerance 3 px", "true lesions of the phantom, scored on the network's input grid with a "
                                        "3 px pointing-game tolerance"),
    ("CheXlocalize", "label, tolerance 0 px", "CheXlocalize radiologists' segmentations of real CheXpert radiographs, "
                                              "scored at each mask's own size with no pointing-game tolerance")])
def test_the_report_names_what_the_doll_was_scored_against(tmp_path, judge, scoring, words):
    import pandas as pd

    from bundle.reporting.report import Table, Text, _doll_section

    rows = [{"observation": o, "method": m, "n": 3, "iou": iou, "dice": iou, "hit": 0.5}
            for o in ("Cardiomegaly", "Edema", "all") for m, iou in (("doll", 0.3), ("gradcam", 0.2))]
    frame = pd.DataFrame(rows)
    if judge:
        frame["judge"] = judge
    if scoring:
        frame["scoring"] = scoring
    frame.to_csv(tmp_path / "summary.csv", index=False)
    sec = _doll_section(tmp_path)
    conclusion = [b.text for b in sec.blocks if isinstance(b, Text) and b.conclusion]
    caption = [b.caption for b in sec.blocks if isinstance(b, Table)]
    assert len(conclusion) == 1 and f"Mean IoU over observations ({words}" in conclusion[0]
    assert words in caption[0]


def test_the_data_file_names_a_missing_chexlocalize_file(tmp_path):
    from bundle.data.userdata import load_data_spec

    make_chexpert_small(tmp_path / "chexpert", n_train=2, n_valid=1, side=16)
    data_file = tmp_path / "data.yaml"
    data_file.write_text("chexpert: {root: chexpert, localize: gt_segmentations_val.json}\n")
    with pytest.raises(BundleInputError) as err:
        load_data_spec(data_file)
    assert str(tmp_path / "gt_segmentations_val.json") in str(err.value)
    assert "file or folder not found (given as chexpert.localize in" in str(err.value)
    (tmp_path / "gt_segmentations_val.json").write_text("{}")
    assert load_data_spec(data_file)["chexpert"]["localize"] == str((tmp_path / "gt_segmentations_val.json").resolve())


def _prepare(tmp_path, spec: str):
    from bundle.data.userdata import prepare_data

    data_file = tmp_path / "user" / "data.yaml"
    data_file.write_text(spec)
    out = tmp_path / "data"
    res = prepare_data(out / "phantom", out / "datalists", SMALL_PHANTOM, DATALISTS, data_spec=str(data_file))
    return res["datalists"]["chexpert"], out / "datalists" / "chexpert.json"


def test_the_release_folder_gives_chexperts_own_splits_tuned_on_validation_judged_on_test(tmp_path):
    """The CheXlocalize release folder as chexpert.localize: both ground-truth files are read, CheXpert's test set is
    found in it, and the datalist takes CheXpert's splits (train.csv, valid.csv as validation, the test set's frontal
    views as test, labels read by column name); the recipe is tuned on the validation masks and judged on the test
    masks, each equal to its RLE."""
    from bundle.data.io import load_bitmask
    from bundle.doll.quality import lesion_items, tuning_items

    top = make_chexpert_small(tmp_path / "user" / "chexpert", n_train=12, n_valid=4, side=32)
    make_chexlocalize_release(top, tmp_path / "user" / "chexlocalize", n_test=5, side=40)
    info, path = _prepare(tmp_path, "chexpert: {root: chexpert, localize: chexlocalize}\n")
    assert info["splits"] == "CheXpert" and (info["training"], info["validation"], info["test"]) == (12, 4, 5)
    assert info["with_lesion"] == {"validation": 4, "test": 5} and info["lesion_source"] == "CheXlocalize"
    datalist = json.loads(path.read_text())
    assert all("/CheXpert-v1.0-small/valid/" in it["image"] for it in datalist["validation"])
    assert all("/chexlocalize/CheXpert/test/" in it["image"] and "frontal" in it["image"] for it in datalist["test"])
    loc = datalist["summary"]["chexlocalize"]
    assert len(loc["files"]) == 2 and loc["matched"] == {"validation": 4, "test": 5} and loc["unmatched"] == 1
    gt = json.loads((tmp_path / "user" / "chexlocalize" / "CheXlocalize" / "gt_segmentations_test.json").read_text())
    for item in datalist["test"]:
        i = int(item["patient"][len("patient"):]) - 64741
        assert item["label"] == [float((i + j) % 2) for j in range(len(OBSERVATIONS))]   # the CSV, by column name
        bits = load_bitmask(item["lesion"], len(OBSERVATIONS))
        cxr_id = "_".join(item["image"].rsplit(".", 1)[0].split("/")[-3:])
        for task in CHEXLOCALIZE_TASKS:
            assert np.array_equal(bits[OBSERVATIONS.index(task)].astype(bool), decode_rle(gt[cxr_id][task]))
    split, tune = tuning_items(str(path))
    assert split == "validation" and len(tune) == 4
    assert {it["split"] for it in lesion_items(str(path))} == {"test"}


def test_without_the_test_set_tuning_names_the_fix(tmp_path):
    """Only the validation masks: they sit on the judged split (test = valid.csv), so tuning by default refuses and
    says how to get a held-apart split; the phantom's tuning split stays training."""
    from bundle.doll.quality import tuning_items

    top = make_chexpert_small(tmp_path / "user" / "chexpert", n_train=12, n_valid=4, side=32)
    make_chexlocalize(top, tmp_path / "user" / "chexlocalize")
    info, path = _prepare(tmp_path, "chexpert: {root: chexpert, localize: chexlocalize}\n")
    assert info["splits"] == "train.csv split" and info["with_lesion"] == {"test": 4}
    with pytest.raises(BundleInputError, match="give CheXpert's test set"):
        tuning_items(str(path))
    assert tuning_items(str(path), "test")[0] == "test"                      # asked for explicitly
    phantom = tmp_path / "phantom.json"
    phantom.write_text(json.dumps({"training": [{"image": "a.png", "lesion": "a_l.png"}], "validation": []}))
    assert tuning_items(str(phantom))[0] == "training"


def test_test_labels_are_read_by_name_with_the_view_from_the_file_name(tmp_path):
    import csv

    from bundle.data.chexpert import TEST_LABEL_COLUMNS, chexpert_items

    columns = [TEST_LABELS_COLUMNS[0], *reversed(TEST_LABELS_COLUMNS[1:])]  # any column order
    rows = [["test/patient64741/study1/view1_frontal.jpg", *(["1.0"] + ["0.0"] * 13)],   # Support Devices only
            ["test/patient64741/study1/view2_lateral.jpg", *(["0.0"] * 14)],
            ["test/patient64742/study1/view1_frontal.jpg", *(["0.0"] * 12 + ["1.0", "0.0"])]]  # Enlarged Cardiom.
    with open(tmp_path / "test_labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    items, summary = chexpert_items(tmp_path / "test_labels.csv", data_root=tmp_path, required=TEST_LABEL_COLUMNS)
    assert summary["lateral_dropped"] == 1 and [it["patient"] for it in items] == ["patient64741", "patient64742"]
    assert items[0]["label"] == [float(o == "Support Devices") for o in OBSERVATIONS]
    assert items[1]["label"] == [float(o == "Enlarged Cardiomediastinum") for o in OBSERVATIONS]
    assert items[0]["image"] == str(tmp_path / "test/patient64741/study1/view1_frontal.jpg")
    with pytest.raises(BundleInputError, match=r"missing column\(s\) \['Path'\]"):
        (tmp_path / "bad.csv").write_text(",".join(OBSERVATIONS) + "\n" + ",".join(["0"] * 14) + "\n")
        chexpert_items(tmp_path / "bad.csv", required=TEST_LABEL_COLUMNS)


def test_a_patient_in_two_splits_or_a_radiograph_in_two_files_is_named(tmp_path):
    from bundle.data.chexpert import chexpert_datalist

    top = make_chexpert_small(tmp_path / "chexpert", n_train=4, n_valid=2, side=16)
    release = make_chexlocalize_release(top, tmp_path / "release", n_test=2, side=16)
    labels = release / "CheXpert" / "test_labels.csv"
    labels.write_text(labels.read_text().replace("patient64742", "patient64541"))  # a valid.csv patient
    with pytest.raises(BundleInputError) as err:
        chexpert_datalist(tmp_path / "chexpert", test=release)
    assert str(labels) in str(err.value)
    assert "patient64541 is in both the validation and the test split" in str(err.value)
    with pytest.raises(BundleInputError, match="CheXpert test set not found"):
        chexpert_datalist(tmp_path / "chexpert", test=tmp_path / "chexpert")
    gt = release / "CheXlocalize"
    (gt / "gt_segmentations_test.json").write_text((gt / "gt_segmentations_val.json").read_text())
    with pytest.raises(BundleInputError) as err:
        read_chexlocalize(release)
    assert str(gt / "gt_segmentations_test.json") in str(err.value) and "is also in" in str(err.value)


def test_one_file_named_in_the_release_is_taken_as_chosen_and_scoring_the_tuning_split_warns(tmp_path, caplog):
    """chexpert.localize naming the validation file inside a release folder: only that ground truth, no test set (the
    user picked one file); with the test set named but only the validation masks, the quality stage falls back to
    the validation split and warns that it is the tuning split."""
    import logging

    from bundle.doll.quality import lesion_items

    user = tmp_path / "user"
    top = make_chexpert_small(user / "chexpert", n_train=12, n_valid=4, side=32)
    release = make_chexlocalize_release(top, user / "chexlocalize", n_test=3, side=32)
    val = release / "CheXlocalize" / "gt_segmentations_val.json"
    (tmp_path / "a" / "user").mkdir(parents=True)
    info, _ = _prepare(tmp_path / "a", f"chexpert: {{root: {user / 'chexpert'}, localize: {val}}}\n")
    assert info["splits"] == "train.csv split" and info["with_lesion"] == {"test": 4}
    (tmp_path / "b" / "user").mkdir(parents=True)
    info, path = _prepare(tmp_path / "b", f"chexpert: {{root: {user / 'chexpert'}, localize: {val}, "
                                          f"test: {release / 'CheXpert'}}}\n")
    assert info["splits"] == "CheXpert" and info["with_lesion"] == {"validation": 4}
    with caplog.at_level(logging.WARNING, logger="bundle.doll.quality"):
        items = lesion_items(str(path))
    assert {it["split"] for it in items} == {"validation"} and "not held apart" in caplog.text

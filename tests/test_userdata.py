"""The datasets as users download them: JSRT ``.IMG`` + SCR GIF masks at half size (archive and copies' folder
names), QaTa-COV19-v2, COVID-QU-Ex, CheXpert small and full-size; the ``--data`` file (checked up front, phantoms
drawn only where not replaced, nothing written half) and a short fine-tune on the real-format trees. The trees are
written by ``tests/data_formats.py`` in the exact on-disk formats."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from bundle.constants import SCR_STRUCTURES
from bundle.data.chexpert import chexpert_datalist
from bundle.data.datalists import build_all_datalists
from bundle.data.io import JSRT_SIDE, load_mask, load_radiograph, write_jsrt_img
from bundle.data.segsets import (covid_qu_ex_datalist, covid_qu_ex_items, qata_datalist, read_image_size,
                                 reconcile_splits, scr_items)
from bundle.transforms import LoadMaskd, LoadRadiographd
from bundle.data.userdata import load_data_spec, phantom_params, prepare_data
from bundle.utils import BundleInputError
from data_formats import (make_chexpert_small, make_covid_qu_ex, make_jsrt_scr, make_qata_v2,
                          qata_names)

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------- JSRT .IMG
def test_jsrt_img_byte_layout_and_inversion(tmp_path):
    side = 16
    density = (np.arange(side * side).reshape(side, side) * 13) % 4096
    path = tmp_path / "JPCLN001.IMG"
    write_jsrt_img(path, density)
    raw = path.read_bytes()
    assert len(raw) == 2 * side * side  # headerless
    assert raw[:2] == bytes([0, 0]) and raw[2:4] == (13).to_bytes(2, "big")  # 16-bit big-endian words
    img, meta = load_radiograph(path)
    assert img.shape == (side, side) and meta["format"] == "jsrt"
    np.testing.assert_allclose(img, (4095 - density) / 4095, atol=1e-6)  # values grow toward black: inverted
    assert read_image_size(path) == (side, side)


def test_jsrt_img_full_size_and_malformed(tmp_path):
    path = tmp_path / "JPCNN001.IMG"
    density = np.full((JSRT_SIDE, JSRT_SIDE), 4095, np.int64)
    density[:1024] = 0  # top half: no density (white after inversion)
    write_jsrt_img(path, density)
    assert path.stat().st_size == 2048 * 2048 * 2
    assert read_image_size(path) == (2048, 2048)
    img, _ = load_radiograph(path)
    assert img.shape == (2048, 2048) and img[0, 0] == 1.0 and img[-1, -1] == 0.0
    # the 2048 image with a 1024 SCR mask: matched on the mask's grid by area averaging (never rejected)
    mask = tmp_path / "mask.gif"
    from PIL import Image

    Image.fromarray(np.full((1024, 1024), 255, np.uint8)).convert("P").save(mask)
    d = LoadMaskd("label")(LoadRadiographd("image")({"image": str(path), "label": str(mask)}))
    assert tuple(d["image"].shape) == (1, 1024, 1024) and tuple(d["label"].shape) == (1, 1024, 1024)
    assert float(d["image"][0, 511, 0]) == 1.0 and float(d["image"][0, 512, 0]) == 0.0
    # truncated file and a file that is not 12-bit big-endian: the error names the file
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(BundleInputError, match=r"JPCNN001\.IMG: not a JSRT \.IMG file: 8388606 bytes"):
        load_radiograph(path)
    with pytest.raises(BundleInputError, match=r"JPCNN001\.IMG: not a JSRT"):
        read_image_size(path)
    path.write_bytes(np.full((8, 8), 4096 * 2, ">u2").tobytes())
    with pytest.raises(BundleInputError, match=r"JPCNN001\.IMG: value 8192 above 4095"):
        load_radiograph(path)


def test_mask_grid_area_downsampling_and_aspect_check(tmp_path, write_image):
    img = np.zeros((8, 8), np.uint8)
    img[:, 1::2] = 255  # columns alternate 0 / 255: area averaging to half size gives 0.5 everywhere
    a = write_image(tmp_path / "a.png", img)
    m = write_image(tmp_path / "m.gif", np.full((4, 4), 255, np.uint8))
    d = LoadMaskd("label")(LoadRadiographd("image")({"image": str(a), "label": str(m)}))
    np.testing.assert_allclose(d["image"][0].numpy(), 0.5, atol=1e-6)
    wide = write_image(tmp_path / "wide.gif", np.full((4, 6), 255, np.uint8))
    with pytest.raises(BundleInputError, match=r"wide\.gif: mask size \(4, 6\) differs .*another aspect ratio"):
        LoadMaskd("label")(LoadRadiographd("image")({"image": str(a), "label": str(wide)}))


# ------------------------------------------------------------------------------------------------------ SCR layouts
@pytest.mark.parametrize("names", [
    {},  # the archive's folder names: "left lung", ...
    {s: s.replace(" ", "_") for s in SCR_STRUCTURES},  # common copies: left_lung
    {s: s.title().replace(" ", "-") for s in SCR_STRUCTURES},  # Left-Lung
])
def test_scr_archive_and_copies(tmp_path, names):
    cases = ("JPCLN001", "JPCLN002", "JPCNN001", "JPCNN002")
    dirs = make_jsrt_scr(tmp_path, cases, side=32, folder_names=names, png_cases=("JPCLN002",))
    items, summary = scr_items(images_dir=dirs["images"], masks_dir=dirs["masks"], decode_images=True)
    assert [it["patient"] for it in items] == sorted(cases)
    assert all(it["image"].endswith(".IMG") for it in items)  # the original wins over the PNG conversion
    for it in items:  # both folds found; label order = SCR_STRUCTURES
        assert [load_mask(p).shape for p in it["label"]] == [(16, 16)] * 5
        parents = [Path(p).parent.name for p in it["label"]]
        assert [names.get(s, s) for s in SCR_STRUCTURES] == parents
    assert "no patient id" in summary["patient_grouping"] and summary["image_formats"] == [".img"]
    # one root above both archives works too (images found outside the structure folders)
    items2, _ = scr_items(tmp_path)
    assert [it["image"] for it in items2] == [it["image"] for it in items]
    # loaded: the 32 px image on the 16 px masks' grid, 3 task channels
    d = LoadMaskd("label", union_groups=[[0, 1], [2], [3, 4]])(LoadRadiographd("image")(dict(items[0])))
    assert tuple(d["image"].shape) == (1, 16, 16) and tuple(d["label"].shape) == (3, 16, 16)
    assert float(d["label"][0].sum()) > 0 and float(d["label"][2].sum()) > 0
    lungs = d["label"][0].bool()
    assert float(d["image"][0][lungs].mean()) < float(d["image"][0][~lungs].mean())  # lungs dark after inversion


def test_scr_missing_and_malformed_files_are_named(tmp_path):
    dirs = make_jsrt_scr(tmp_path, ("JPCLN001", "JPCLN002", "JPCNN001"), side=32)
    heart = dirs["masks"] / "fold2" / "masks" / "heart" / "JPCLN002.gif"
    heart.unlink()
    with pytest.raises(BundleInputError, match=r"JPCLN002\.gif: case JPCLN002: missing mask for structure 'heart'"):
        scr_items(images_dir=dirs["images"], masks_dir=dirs["masks"])
    shutil.copy(dirs["masks"] / "fold1" / "masks" / "heart" / "JPCLN001.gif", heart)
    (dirs["images"] / "JPCNN001.IMG").unlink()
    with pytest.raises(BundleInputError, match=r"JPCNN001\.gif: no JSRT image of case JPCNN001"):
        scr_items(images_dir=dirs["images"], masks_dir=dirs["masks"])
    write_jsrt_img(dirs["images"] / "JPCNN001.IMG", np.zeros((32, 32), np.int64))
    (dirs["images"] / "JPCNN001.IMG").write_bytes(b"\0" * 100)  # truncated
    with pytest.raises(BundleInputError, match=r"JPCNN001\.IMG: not a JSRT \.IMG file"):
        scr_items(images_dir=dirs["images"], masks_dir=dirs["masks"])
    shutil.rmtree(dirs["masks"] / "fold1" / "masks" / "right clavicle")
    shutil.rmtree(dirs["masks"] / "fold2" / "masks" / "right clavicle")
    with pytest.raises(BundleInputError, match=r"no SCR mask folder for structure \['right clavicle'\]"):
        scr_items(images_dir=dirs["images"], masks_dir=dirs["masks"])


# ------------------------------------------------------------------------------------------- QaTa-v2, COVID-QU-Ex
def test_qata_v2_tree_and_patients_across_its_sets(tmp_path):
    top = make_qata_v2(tmp_path, n_train=10, n_test=4)
    for root in (tmp_path, top):  # the parent or the QaTa-COV19-v2 folder itself
        datalist, summary = qata_datalist(root, val_fraction=0.2, decode_images=True)
        assert sum(len(v) for v in datalist.values()) == 14 and len(datalist["test"]) == 4
        assert summary["patients_moved"] == 0 and "carry none" in summary["patient_grouping"]
    # a BIMCV subject of the Train Set also in the Test Set is moved wholly into one section
    name = qata_names(10)[1]  # sub-S00000_...
    twin = name.replace("ses-E00001", "ses-E09999")
    for sub, fn in (("Images", f"{twin}.png"), ("Ground-truths", f"mask_{twin}.png")):
        shutil.copy(top / "Train Set" / sub / (fn.replace(twin, name)), top / "Test Set" / sub / fn)
    datalist, summary = qata_datalist(tmp_path, val_fraction=0.2)
    assert summary["patients_moved"] == 1
    where = {k for k, v in datalist.items() for it in v if it["patient"] == "sub-S00000"}
    assert len(where) == 1
    for a in datalist:
        for b in datalist:
            if a < b:
                assert not {it["patient"] for it in datalist[a]} & {it["patient"] for it in datalist[b]}


def test_patient_ids_from_names():
    from bundle.data.segsets import patient_from_name, patient_grouping_note

    assert patient_from_name("sub-S09345_ses-E16849_run-1_bp-chest_vp-ap_cr") == "sub-S09345"
    assert patient_from_name("person1493_virus_2593") == "person1493"
    assert patient_from_name("NORMAL2-IM-1427-0001") == patient_from_name("IM-1427-0002") == "IM-1427"
    assert patient_from_name("covid_12") is None and patient_from_name("Non_COVID (3)") is None
    assert patient_grouping_note(["covid_1", "covid_2"]).startswith("the 2 image names carry no patient id")
    assert patient_grouping_note(["person1_virus_1", "covid_2"]).startswith("1 of 2 image names carry a patient id")


def test_reconcile_splits_rule():
    secs = {"training": [{"patient": "p", "image": "1"}, {"patient": "q", "image": "2"}],
            "validation": [], "test": [{"patient": "p", "image": "3"}]}
    out, moved = reconcile_splits(secs)
    assert moved == {"patients_moved": 1, "images_moved": 1}
    assert [it["image"] for it in out["test"]] == ["1", "3"]  # a tie goes to the held-out side
    assert [it["image"] for it in out["training"]] == ["2"]


def test_covid_qu_ex_tree_with_its_own_split(tmp_path):
    make_covid_qu_ex(tmp_path, per_class=2)
    datalist, summary = covid_qu_ex_datalist(tmp_path, decode_images=True)
    assert {k: len(v) for k, v in datalist.items()} == {"training": 6, "validation": 6, "test": 6}
    assert {it["class"] for it in datalist["test"]} == {"COVID-19", "Non-COVID", "Normal"}
    assert all("/Val/" in it["image"] for it in datalist["validation"])
    for it in datalist["training"]:
        assert Path(it["label"]).name == Path(it["image"]).name and "infection masks" in it["label"]
        assert load_mask(it["label"]).any() == (it["class"] == "COVID-19")  # negatives have empty masks
    assert "carry no patient id" in summary["patient_grouping"]
    only, _ = covid_qu_ex_datalist(tmp_path / "Infection Segmentation Data", classes=["COVID-19"])
    assert sum(len(v) for v in only.values()) == 6
    bad = tmp_path / "Infection Segmentation Data" / "Val" / "Normal" / "infection masks" / "Normal (11).png"
    bad.unlink()
    with pytest.raises(BundleInputError, match=r"infection masks/Normal \(11\)\.png: infection mask not found"):
        covid_qu_ex_items(tmp_path, "Val")


# --------------------------------------------------------------------------------------------------------- CheXpert
@pytest.mark.parametrize("dirname", ["CheXpert-v1.0-small", "CheXpert-v1.0"])
def test_chexpert_small_and_full_size(tmp_path, dirname):
    make_chexpert_small(tmp_path, n_train=6, n_valid=2, side=32, dirname=dirname)
    for root in (tmp_path, tmp_path / dirname):
        datalist, summary = chexpert_datalist(root, check_files=True)
        assert len(datalist["training"]) + len(datalist["validation"]) == 6 and len(datalist["test"]) == 2
        assert all(f"/{dirname}/train/" in it["image"] for it in datalist["training"])
    # a copy whose folder name differs from the CSV's Path prefix: re-rooted on the folder
    renamed = tmp_path / "my-chexpert"
    (tmp_path / dirname).rename(renamed)
    datalist, summary = chexpert_datalist(renamed, check_files=True)
    assert all(os.path.isfile(it["image"]) and "/my-chexpert/" in it["image"] for it in datalist["training"])
    assert summary["train_csv"]["path_prefixes"] == [dirname]


# ------------------------------------------------------------------------------------------------------ data file
def test_data_file_checked_up_front(tmp_path):
    (tmp_path / "jsrt").mkdir()
    (tmp_path / "qata").mkdir()
    f = tmp_path / "data.yaml"

    def spec(obj):
        f.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
        return load_data_spec(f)

    assert spec({"jsrt_scr": "jsrt", "qata": {"root": str(tmp_path / "qata")}}) == {
        "jsrt_scr": {"root": str((tmp_path / "jsrt").resolve())}, "qata": {"root": str((tmp_path / "qata").resolve())}}
    assert spec("") == {} and load_data_spec(None) == {}
    with pytest.raises(BundleInputError, match=r"data\.yaml: unknown dataset key\(s\) \['jsrt'\]"):
        spec({"jsrt": "jsrt"})
    with pytest.raises(BundleInputError, match=r"data\.yaml: give one infection dataset"):
        spec({"qata": "qata", "covid_qu_ex": "qata"})
    with pytest.raises(BundleInputError, match=r"nowhere: folder not found \(given as qata\.root in .*data\.yaml\)"):
        spec({"qata": "nowhere"})
    with pytest.raises(BundleInputError, match=r"data\.yaml: not valid YAML"):
        spec("qata: [unclosed")
    with pytest.raises(BundleInputError, match=r"data\.yaml: jsrt_scr: give `root`, or both"):
        spec({"jsrt_scr": {"images": "jsrt"}})
    with pytest.raises(BundleInputError, match=r"data\.yaml: the data file must hold a mapping"):
        spec("- qata")
    with pytest.raises(BundleInputError, match=r"missing\.yaml: data file not found"):
        load_data_spec(tmp_path / "missing.yaml")
    params = phantom_params({"scr_cases": 60, "qata_train": 60, "qata_test": 30, "chexpert_train_patients": 600,
                             "chexpert_valid_patients": 100}, {"jsrt_scr": {}, "covid_qu_ex": {}})
    assert params == {"scr_cases": 0, "qata_train": 0, "qata_test": 0, "chexpert_train_patients": 600,
                      "chexpert_valid_patients": 100}
    assert phantom_params({}, {"jsrt_scr": {}, "qata": {}, "chexpert": {}}) is None


SMALL_PHANTOM = dict(image_size=48, chexpert_train_patients=3, chexpert_valid_patients=2, scr_cases=3, qata_train=2,
                     qata_test=1, num_workers=0, progress=False)
DATALISTS = dict(policy="ignore", check_files=True, on_error="raise")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_data_real_and_phantom_and_nothing_written_half(tmp_path):
    trees = tmp_path / "user"
    dirs = make_jsrt_scr(trees / "jsrt", ("JPCLN001", "JPCLN002", "JPCNN001", "JPCNN002", "JPCNN003"), side=32)
    make_qata_v2(trees / "qata", n_train=5, n_test=2, side=32)
    data_file = trees / "data.yaml"
    data_file.write_text(yaml.safe_dump({"jsrt_scr": {"images": "jsrt/All247images", "masks": "jsrt/scratch"},
                                         "qata": "qata"}))
    phantom_dir, datalist_dir = tmp_path / "phantom", tmp_path / "datalists"
    out = prepare_data(phantom_dir, datalist_dir, SMALL_PHANTOM, DATALISTS, data_spec=data_file)
    s = out["datalists"]
    assert {k: s[k]["source"] for k in ("chexpert", "scr", "qata")} == {"chexpert": "phantom", "scr": "real",
                                                                        "qata": "real"}
    assert s["real_lungs"]["status"] == "absent" and s["scr"]["given_as"] == "jsrt_scr"
    # only the CheXpert phantom was drawn
    assert (phantom_dir / "CheXpert-v1.0-small" / "train.csv").is_file()
    assert not (phantom_dir / "JSRT").exists() and not (phantom_dir / "QaTa-COV19").exists()
    scr = json.loads((datalist_dir / "scr.json").read_text())
    assert scr["source"] == "real" and scr["summary"]["image_formats"] == [".img"]
    assert sum(scr[f"num{k}"] for k in ("Training", "Validation", "Test")) == 5
    assert json.loads((datalist_dir / "summary.json").read_text())["qata"]["source"] == "real"
    before = _files(datalist_dir)
    # a malformed mask: the data stage stops naming it, and no datalist changes
    bad = dirs["masks"] / "fold2" / "masks" / "left lung" / "JPCLN002.gif"
    bad.write_bytes(b"GIF89a not really")
    with pytest.raises(BundleInputError, match=r"left lung/JPCLN002\.gif: (not a readable|unreadable)"):
        prepare_data(phantom_dir, datalist_dir, SMALL_PHANTOM, DATALISTS, data_spec=data_file)
    assert _files(datalist_dir) == before
    with pytest.raises(BundleInputError, match=r"left lung/JPCLN002\.gif"):  # checked before any phantom is drawn
        prepare_data(tmp_path / "phantom2", tmp_path / "datalists2", SMALL_PHANTOM, DATALISTS, data_spec=data_file)
    assert not (tmp_path / "phantom2").exists() and not (tmp_path / "datalists2").exists()
    # a missing QaTa mask (the last dataset built): same
    shutil.copy(dirs["masks"] / "fold1" / "masks" / "left lung" / "JPCLN001.gif", bad)
    gt = trees / "qata" / "QaTa-COV19-v2" / "Test Set" / "Ground-truths"
    victim = sorted(gt.iterdir())[0]
    victim.unlink()
    with pytest.raises(BundleInputError, match=rf"{victim.name}: mask not found for image"):
        prepare_data(phantom_dir, datalist_dir, SMALL_PHANTOM, DATALISTS, data_spec=data_file)
    assert _files(datalist_dir) == before
    # no data file: the old behaviour (every dataset phantom)
    s = build_all_datalists(phantom_dir, tmp_path / "d2", required=("chexpert",))
    assert s["chexpert"]["source"] == "phantom" and s["scr"]["status"] == "absent"


# ------------------------------------------------------------------------------------ fine-tune on the real formats
def test_finetune_on_jsrt_img_scr_gif(tmp_path):
    """A few optimizer steps of configs/train.yaml + evaluate.yaml on the scr datalist built from .IMG + GIF."""
    dirs = make_jsrt_scr(tmp_path / "user", side=64)
    datalists = tmp_path / "data" / "datalists"
    build_all_datalists(tmp_path / "phantom", datalists, required=(), real={
        "jsrt_scr": {"images": str(dirs["images"]), "masks": str(dirs["masks"])}})
    from monai.bundle import run

    configs = REPO / "configs"
    overrides = {"data_root": str(tmp_path / "data"), "output_root": str(tmp_path / "eval"),
                 "models_dir": str(tmp_path / "models"), "task": "scr", "init": "scratch", "image_size": [32, 32],
                 "num_iterations": 4, "epoch_length": 2, "batch_size": 2, "show_progress": False,
                 "device": "$torch.device('cpu')", "mlflow_experiment_prefix": "userdata_test"}
    for stage in (["train.yaml"], ["train.yaml", "evaluate.yaml"]):  # in this process: no second MONAI import
        run(config_file=[str(configs / c) for c in stage],
            meta_file=str(configs / "metadata.json"), **overrides)
    csvs = list((tmp_path / "eval" / "segmentation").glob("*/metrics_test.csv"))
    assert len(csvs) == 1, list((tmp_path / "eval").rglob("*"))
    import pandas as pd

    metrics = pd.read_csv(csvs[0])
    assert set(metrics["structure"]) == {"lungs", "heart", "clavicles"} and len(metrics) == 3 * 2  # 2 test cases
    assert metrics["dice"].notna().all() and (metrics["ref_area"] > 0).all()
    # Dice is measured on the SCR masks' grid (32 px here: the 64 px .IMG is brought to it)
    masks = list((csvs[0].parent / "masks_test").glob("*.png"))
    assert masks and all(load_mask(m).shape == (32, 32) for m in masks)


def test_runner_checks_the_data_file_before_any_stage(tmp_path):
    from scripts.run_pipeline import ROOT as RUNNER_ROOT
    from scripts.run_pipeline import Pipeline

    (tmp_path / "bad.yaml").write_text("jsrt_scr: {images: /nonexistent/All247images, masks: /nonexistent}\n")
    with pytest.raises(SystemExit, match=r"--data: /nonexistent/All247images: folder not found"):
        Pipeline(True, None, tmp_path / "run", data=tmp_path / "bad.yaml")
    assert not (tmp_path / "run").exists()
    make_qata_v2(tmp_path / "user", n_train=2, n_test=1)
    (tmp_path / "good.yaml").write_text("qata: user\n")
    p = Pipeline(True, None, None, data=tmp_path / "good.yaml")
    assert p.data_spec == {"qata": {"root": str((tmp_path / "user").resolve())}}
    assert p.paths["data_root"] == str(RUNNER_ROOT / "quick" / "real" / "data")  # never the phantom run's folders
    from scripts.sweep import SweepGrid

    assert SweepGrid.from_settings(p.settings["sweep"]).sizes == ["all"]  # quick_data's grid
    assert "infection" in p.settings["real_data_sweep"]
    assert Pipeline(False, None, None, data=tmp_path / "good.yaml").paths["data_root"] == str(RUNNER_ROOT / "real" /
                                                                                            "data")

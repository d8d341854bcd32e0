"""Dataset adapters: CheXpert CSV (policies, validation, scale), SCR, QaTa, plain folder, image lists, patient splits,
datalist files and the data stage entry point. Fixtures write tiny datasets in the documented layouts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pytest

from bundle.constants import CHEXPERT_COLUMNS, OBSERVATIONS, SCR_STRUCTURES
from bundle.data.chexpert import (apply_uncertainty_policy, chexpert_datalist, chexpert_items, read_chexpert_csv,
                                  resolve_policies)
from bundle.data.datalists import build_all_datalists, load_datalist_section, read_datalist, write_datalist
from bundle.data.segsets import (check_pair, folder_datalist, folder_items, image_list_items, qata_datalist,
                                 qata_items, read_image_size, scr_datalist, scr_items)
from bundle.data.splits import patient_split, split_datalist, subsample, subsample_order
from bundle.transforms import LoadMaskd, LoadRadiographd
from bundle.utils import BundleInputError

CXR = "CheXpert-v1.0-small"


# ------------------------------------------------------------------------------------------------ layout writers
def write_chexpert_csv(path: Path, rows: Sequence[tuple[str, str, Sequence[str]]]) -> Path:
    """``rows``: ``(relative path, "Frontal"|"Lateral", 14 label strings)``."""
    records = []
    for rel, view, labels in rows:
        assert len(labels) == 14
        records.append([rel, "Female", "50", view, "AP" if view == "Frontal" else "", *labels])
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records, columns=list(CHEXPERT_COLUMNS)).to_csv(path, index=False)
    return path


def make_chexpert(root: Path, write_image: Callable, n_patients: int = 6, lesions: bool = True) -> Path:
    """A small CheXpert layout: each patient has 2 studies, each a frontal view, plus a lateral view in study 1."""
    rng = np.random.default_rng(0)
    codes = ["1.0", "0.0", "-1.0", ""]
    train_rows = []
    for p in range(1, n_patients + 1):
        for s in (1, 2):
            rel = f"{CXR}/train/patient{p:05d}/study{s}/view1_frontal.jpg"
            train_rows.append((rel, "Frontal", [codes[(p + s + j) % 4] for j in range(14)]))
            write_image(root / rel, rng.integers(0, 256, (16, 16), dtype=np.uint8))
            if lesions:
                write_image(root / f"{CXR}-lesions/train/patient{p:05d}/study{s}/view1_frontal.png",
                            np.zeros((16, 16), np.uint16))
            if s == 1:
                rel = f"{CXR}/train/patient{p:05d}/study1/view2_lateral.jpg"
                train_rows.append((rel, "Lateral", [codes[(p + j) % 4] for j in range(14)]))
                write_image(root / rel, rng.integers(0, 256, (16, 16), dtype=np.uint8))
    write_chexpert_csv(root / CXR / "train.csv", train_rows)
    valid_rows = []
    for p in range(90001, 90004):
        rel = f"{CXR}/valid/patient{p:05d}/study1/view1_frontal.jpg"
        valid_rows.append((rel, "Frontal", ["1.0" if (p + j) % 3 == 0 else "0.0" for j in range(14)]))
        write_image(root / rel, rng.integers(0, 256, (16, 16), dtype=np.uint8))
    write_chexpert_csv(root / CXR / "valid.csv", valid_rows)
    return root


def _mask(shape=(16, 16), box=(2, 10, 3, 12)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[box[0]:box[1], box[2]:box[3]] = 255
    return m


def make_scr(root: Path, write_image: Callable, cases: Sequence[str] = ("JPCLN001", "JPCLN002", "JPCNN001",
                                                                       "JPCNN002", "JPCNN003")) -> Path:
    for k, case in enumerate(cases):
        write_image(root / "JSRT/images" / f"{case}.png", np.full((16, 16), 40 * k, np.uint8))
        for j, s in enumerate(SCR_STRUCTURES):
            write_image(root / "SCR/masks" / s / f"{case}.gif", _mask(box=(j, j + 3, 1, 15)))
    return root


def make_qata(root: Path, write_image: Callable, n_train: int = 8, n_test: int = 3) -> Path:
    for subset, n in (("Train Set", n_train), ("Test Set", n_test)):
        base = root / "QaTa-COV19" / subset
        for i in range(n):
            subject = i // 2 + (0 if subset == "Train Set" else 100)  # no subject in both sets (see the moving test)
            name = f"covid_{subset[:2].lower()}{i}" if i % 2 else f"sub-S{subject:04d}_ses-E{i}_run-1"
            write_image(base / "Images" / f"{name}.png", np.full((16, 16), 10 * i, np.uint8))
            write_image(base / "Ground-truths" / f"mask_{name}.png", _mask())
    return root


def make_folder(root: Path, write_image: Callable, n: int = 9) -> Path:
    ids = [f"c{i:02d}" for i in range(n)]
    for i, case in enumerate(ids):
        write_image(root / "images" / f"{case}.png", np.full((16, 16), 20 * i, np.uint8))
        write_image(root / "masks" / f"{case}.png", _mask())
    pd.DataFrame({"id": ids, "patientid": [str(i // 2) for i in range(n)], "view": "PA"}).to_csv(
        root / "cases.csv", index=False)
    return root


def _patients(items) -> set[str]:
    return {it["patient"] for it in items}


def _assert_disjoint(datalist: dict) -> None:
    sections = [_patients(v) for v in datalist.values()]
    for a in range(len(sections)):
        for b in range(a + 1, len(sections)):
            assert not sections[a] & sections[b], "a patient is on two sides of the split"


# ---------------------------------------------------------------------------------------------------- CheXpert
ROW_A = ["1.0", "-1.0", "", "0.0"] * 3 + ["-1.0", ""]
ROW_B = ["", "0.0", "-1.0", "1.0"] * 3 + ["1.0", "-1.0"]
EXPECTED = {  # (label, label_mask) of ROW_A, ROW_B under each policy, written out by hand
    "ones": ([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0], [1] * 14,
             [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 14),
    "zeros": ([1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0], [1] * 14,
              [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0], [1] * 14),
    "ignore": ([1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0], [1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0],
               [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0]),
}


@pytest.mark.parametrize("policy", ["ones", "zeros", "ignore"])
def test_uncertainty_policies_hand_made_csv(tmp_path, policy):
    csv = write_chexpert_csv(tmp_path / CXR / "train.csv", [
        (f"{CXR}/train/patient00001/study1/view1_frontal.jpg", "Frontal", ROW_A),
        (f"{CXR}/train/patient00001/study1/view2_lateral.jpg", "Lateral", ROW_A),
        (f"{CXR}/train/patient00002/study1/view1_frontal.jpg", "Frontal", ROW_B),
    ])
    items, summary = chexpert_items(csv, policy=policy)
    assert len(items) == 2 and summary["lateral_dropped"] == 1
    la, ma, lb, mb = EXPECTED[policy]
    assert items[0]["label"] == la and items[0]["label_mask"] == ma
    assert items[1]["label"] == lb and items[1]["label_mask"] == mb
    assert items[0]["patient"] == "patient00001" and items[1]["patient"] == "patient00002"
    assert items[0]["image"] == str(tmp_path / f"{CXR}/train/patient00001/study1/view1_frontal.jpg")
    assert all(isinstance(v, float) for v in items[0]["label"] + items[0]["label_mask"])
    assert summary["uncertain"] == ROW_A.count("-1.0") + ROW_B.count("-1.0")
    assert summary["blank"] == ROW_A.count("") + ROW_B.count("")


def test_policy_overrides_and_frontal_filter_off(tmp_path):
    csv = write_chexpert_csv(tmp_path / "x" / "train.csv", [
        (f"{CXR}/train/patient00001/study1/view1_frontal.jpg", "Frontal", ROW_A),
        (f"{CXR}/train/patient00001/study1/view2_lateral.jpg", "Lateral", ROW_A),
    ])
    overrides = {"Enlarged Cardiomediastinum": "ones", "Support Devices": "ignore"}
    items, summary = chexpert_items(csv, data_root=tmp_path, policy="zeros", policy_overrides=overrides,
                                    frontal_only=False)
    assert len(items) == 2 and summary["lateral_dropped"] == 0
    assert items[0]["label"][1] == 1.0  # -1 -> 1 (U-Ones override)
    assert items[0]["label"][9] == 0.0  # -1 -> 0 (U-Zeros default)
    assert items[0]["label_mask"][13] == 0.0 and items[0]["label_mask"][12] == 1.0
    assert items[0]["image"].startswith(str(tmp_path) + "/" + CXR)
    with pytest.raises(ValueError, match="unknown observation"):
        resolve_policies("ones", {"Cardiomegalyy": "zeros"})
    with pytest.raises(ValueError, match="unknown uncertainty policy"):
        resolve_policies("maybe")


def test_apply_policy_vectorised():
    values = np.array([[1.0, 0.0, -1.0, np.nan]])
    label, mask = apply_uncertainty_policy(values, ["ones", "zeros", "ignore", "ignore"])
    np.testing.assert_array_equal(label, [[1, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0]])
    assert label.dtype == np.float32


def test_chexpert_missing_column(tmp_path):
    df = pd.DataFrame([[f"{CXR}/train/patient00001/study1/view1_frontal.jpg", "F", 1, "Frontal", "AP"]
                       + ["1.0"] * 14], columns=list(CHEXPERT_COLUMNS))
    df.drop(columns=["Edema", "AP/PA"]).to_csv(tmp_path / "broken.csv", index=False)
    with pytest.raises(BundleInputError, match=r"broken\.csv: missing column\(s\) \['AP/PA', 'Edema'\]"):
        chexpert_items(tmp_path / "broken.csv")
    with pytest.raises(BundleInputError, match=r"missing column"):  # skip mode cannot skip a missing column
        chexpert_items(tmp_path / "broken.csv", on_error="skip")


@pytest.mark.parametrize("bad_value, shown", [("2.0", "'2.0'"), ("yes", "'yes'"), ("nan", "'nan'")])
def test_chexpert_unknown_label_value(tmp_path, caplog, bad_value, shown):
    bad = list(ROW_A)
    bad[OBSERVATIONS.index("Pneumonia")] = bad_value
    csv = write_chexpert_csv(tmp_path / CXR / "train.csv", [
        (f"{CXR}/train/patient00001/study1/view1_frontal.jpg", "Frontal", ROW_A),
        (f"{CXR}/train/patient00002/study1/view1_frontal.jpg", "Frontal", ROW_B),
        (f"{CXR}/train/patient00003/study1/view1_frontal.jpg", "Frontal", bad),
    ])
    with pytest.raises(BundleInputError) as e:
        chexpert_items(csv)
    msg = str(e.value)
    assert msg.startswith(str(csv)) and "row 3 (line 4)" in msg and "'Pneumonia'" in msg
    assert f"unknown label value {shown}" in msg
    with caplog.at_level(logging.WARNING):
        items, summary = chexpert_items(csv, on_error="skip")
    assert [it["patient"] for it in items] == ["patient00001", "patient00002"]
    assert summary["skipped"] == 1 and summary["skipped_invalid"] == 1 and "row 3" in summary["errors"][0]
    assert "unknown label value" in caplog.text


def test_chexpert_check_files_and_lesions(tmp_path, caplog, write_image):
    root = make_chexpert(tmp_path, write_image, n_patients=4)
    items, summary = chexpert_items(root / CXR / "train.csv", check_files=True)
    assert len(items) == 8 and summary["with_lesion"] == 8 and summary["patients"] == 4
    lesion = Path(items[0]["lesion"])
    assert lesion.is_file() and lesion.name == "view1_frontal.png" and f"{CXR}-lesions" in lesion.parts
    (root / f"{CXR}/train/patient00002/study2/view1_frontal.jpg").unlink()
    with pytest.raises(BundleInputError, match=r"train\.csv: row \d+ \(line \d+\): image file not found: .*"
                                               r"patient00002/study2/view1_frontal\.jpg"):
        chexpert_items(root / CXR / "train.csv", check_files=True)
    with caplog.at_level(logging.WARNING):
        items, summary = chexpert_items(root / CXR / "train.csv", check_files=True, on_error="skip")
    assert len(items) == 7 and summary["skipped"] == 1 and summary["skipped_files"] == 1
    assert "image file not found" in caplog.text
    # without the lesion folder there is no lesion key (real CheXpert)
    shutil.rmtree(root / f"{CXR}-lesions")
    items, summary = chexpert_items(root / CXR / "train.csv")
    assert summary["with_lesion"] == 0 and all("lesion" not in it for it in items)


def test_chexpert_bad_csv_files(tmp_path):
    with pytest.raises(BundleInputError, match=r"absent\.csv: CSV file not found"):
        chexpert_items(tmp_path / "absent.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(BundleInputError, match=r"empty\.csv: CSV file is empty"):
        read_chexpert_csv(tmp_path / "empty.csv")
    csv = write_chexpert_csv(tmp_path / "nopatient.csv", [("somewhere/img.jpg", "Frontal", ROW_A)])
    with pytest.raises(BundleInputError, match=r"nopatient\.csv: row 1 \(line 2\): no patient id"):
        chexpert_items(csv)


def test_chexpert_datalist_split_by_patient(tmp_path, write_image):
    root = make_chexpert(tmp_path, write_image, n_patients=10)
    datalist, summary = chexpert_datalist(root, val_fraction=0.3, seed=3, check_files=True)
    assert len(datalist["training"]) + len(datalist["validation"]) == 20
    assert 2 <= len(datalist["validation"]) <= 10
    assert len(datalist["test"]) == 3 and all("/valid/" in it["image"] for it in datalist["test"])
    _assert_disjoint({k: datalist[k] for k in ("training", "validation")})
    again, _ = chexpert_datalist(root / CXR, val_fraction=0.3, seed=3)  # the dataset folder itself works too
    assert again["validation"] == datalist["validation"]
    other, _ = chexpert_datalist(root, val_fraction=0.3, seed=4)
    assert _patients(other["validation"]) != _patients(datalist["validation"])
    assert summary["train_csv"]["lateral_dropped"] == 10


N_ROWS, N_LATERAL = 223_414, 32_387  # the real train.csv: 223,414 rows, 191,027 frontal


@pytest.fixture(scope="session")
def big_chexpert_csv(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A synthetic CSV of the real train.csv's size, built vectorised: returns (csv, lateral flags, label codes)."""
    rng = np.random.default_rng(7)
    n = N_ROWS
    lateral = np.zeros(n, bool)
    lateral[rng.choice(n, N_LATERAL, replace=False)] = True
    patient = np.arange(n) // 4 + 1
    study = np.arange(n) % 4 + 1
    codes = rng.integers(0, 4, size=(n, 14))  # 0: "", 1: "1.0", 2: "0.0", 3: "-1.0"
    text = np.array(["", "1.0", "0.0", "-1.0"], dtype=object)[codes]
    view = np.where(lateral, "view2_lateral.jpg", "view1_frontal.jpg")
    paths = (f"{CXR}/train/patient" + pd.Series(patient).astype(str).str.zfill(5) + "/study"
             + pd.Series(study).astype(str) + "/" + pd.Series(view))
    df = pd.DataFrame({"Path": paths, "Sex": "Male", "Age": 60, "Frontal/Lateral": np.where(lateral, "Lateral",
                                                                                              "Frontal"),
                       "AP/PA": np.where(lateral, "", "PA")})
    for j, name in enumerate(OBSERVATIONS):
        df[name] = text[:, j]
    csv = tmp_path_factory.mktemp("bigcsv") / CXR / "train.csv"
    csv.parent.mkdir(parents=True)
    df.to_csv(csv, index=False)
    return csv, lateral, codes


def test_chexpert_full_size_csv(big_chexpert_csv):
    csv, lateral, codes = big_chexpert_csv
    items, summary = chexpert_items(csv, policy="ignore")
    assert summary["rows"] == N_ROWS and summary["lateral_dropped"] == N_LATERAL
    assert len(items) == N_ROWS - N_LATERAL == 191_027
    frontal_rows = np.flatnonzero(~lateral)
    to_label = np.array([0.0, 1.0, 0.0, 0.0])  # U-Ignore: blank and uncertain -> 0 ...
    to_mask = np.array([0.0, 1.0, 1.0, 0.0])  # ... and masked out
    for k in (0, 1, 12345, 100_000, len(items) - 1):
        row = frontal_rows[k]
        item = items[k]
        assert item["image"].endswith(f"patient{row // 4 + 1:05d}/study{row % 4 + 1}/view1_frontal.jpg")
        assert item["patient"] == f"patient{row // 4 + 1:05d}"
        assert item["label"] == to_label[codes[row]].tolist()
        assert item["label_mask"] == to_mask[codes[row]].tolist()
    kept = codes[~lateral]
    assert summary["uncertain"] == int((kept == 3).sum()) and summary["blank"] == int((kept == 0).sum())
    assert summary["patients"] == len(np.unique(frontal_rows // 4))


# ------------------------------------------------------------------------------------------------------ splits
def _items(n_patients: int, per_patient: Sequence[int] | None = None) -> list[dict]:
    sizes = per_patient or [1 + (p % 3) for p in range(n_patients)]
    return [{"image": f"/x/p{p}_{k}.png", "patient": f"p{p:03d}"} for p in range(n_patients) for k in range(sizes[p])]


def test_patient_split_fractions_and_counts():
    items = _items(30)
    a = patient_split(items, fractions=[0.7, 0.15, 0.15], seed=1)
    assert sum(map(len, a)) == len(items)
    _assert_disjoint(dict(enumerate(a)))
    assert abs(len(a[0]) / len(items) - 0.7) < 0.1 and all(len(p) > 0 for p in a)
    assert patient_split(items, fractions=[0.7, 0.15, 0.15], seed=1) == a
    assert patient_split(items, fractions=[0.7, 0.15, 0.15], seed=2) != a
    b = patient_split(items, counts=[None, 5], seed=1)
    assert len(_patients(b[1])) == 5 and len(_patients(b[0])) == 25
    c = patient_split(items, counts=[3, 2], seed=1)
    assert len(_patients(c[0])) == 3 and len(_patients(c[1])) == 2
    with pytest.raises(ValueError, match="ask for 40 patients"):
        patient_split(items, counts=[20, 20])
    with pytest.raises(ValueError, match="exactly one"):
        patient_split(items)


def test_patient_split_tiny_and_order_independent():
    items = _items(3)
    parts = patient_split(items, fractions=[0.6, 0.2, 0.2], seed=0)
    assert all(len(_patients(p)) == 1 for p in parts)  # every part gets a patient when there are enough
    shuffled = list(reversed(items))
    again = patient_split(shuffled, fractions=[0.6, 0.2, 0.2], seed=0)
    assert [_patients(p) for p in again] == [_patients(p) for p in parts]
    d = split_datalist(items, {"training": 0.5, "validation": 0.5})
    assert set(d) == {"training", "validation"}


def test_subsample_nested_deterministic_and_spread():
    items = _items(12, [3] * 12)
    subsets = {n: subsample(items, n, seed=5) for n in (2, 4, 8, 16)}
    for small, big in ((2, 4), (4, 8), (8, 16)):
        assert all(it in subsets[big] for it in subsets[small])
    assert len(subsets[8]) == 8 and len(_patients(subsets[8])) == 8  # spread over patients first
    assert subsample(items, 4, seed=5) == subsets[4] and subsample(items, 4, seed=6) != subsets[4]
    assert subsample(items, None) == items and subsample(items, 10_000) == items
    assert sorted(subsample_order(items, 0)) == list(range(len(items)))
    assert subsample(list(range(10)), 3, seed=1) == sorted(subsample(list(range(10)), 3, seed=1))
    with pytest.raises(ValueError):
        subsample(items, -1)


# -------------------------------------------------------------------------------------------------------- SCR
def test_scr_items(tmp_path, write_image):
    root = make_scr(tmp_path, write_image)
    items, summary = scr_items(root)
    assert len(items) == 5 and summary["skipped"] == 0 and summary["patients"] == 5
    first = items[0]
    assert first["patient"] == "JPCLN001" and first["image"].endswith("JSRT/images/JPCLN001.png")
    assert [Path(p).parent.name for p in first["label"]] == list(SCR_STRUCTURES)
    d = LoadMaskd("label")(LoadRadiographd("image")(first))
    assert tuple(d["label"].shape) == (5, 16, 16)
    datalist, s = scr_datalist(root, seed=0)
    assert sum(len(v) for v in datalist.values()) == 5 and all(len(v) >= 1 for v in datalist.values())
    _assert_disjoint(datalist)


def test_scr_missing_structure(tmp_path, caplog, write_image):
    root = make_scr(tmp_path, write_image)
    (root / "SCR/masks/heart/JPCNN002.gif").unlink()
    with pytest.raises(BundleInputError, match=r"heart/JPCNN002\.gif: case JPCNN002: missing mask for structure "
                                               r"'heart'"):
        scr_items(root)
    with caplog.at_level(logging.WARNING):
        items, summary = scr_items(root, on_error="skip")
    assert len(items) == 4 and summary["skipped"] == 1 and "JPCNN002" not in {it["patient"] for it in items}
    assert "missing mask for structure 'heart'" in caplog.text


def test_scr_size_mismatch_and_empty_mask(tmp_path, write_image):
    root = make_scr(tmp_path, write_image)
    write_image(root / "SCR/masks/left clavicle/JPCLN002.gif", _mask(shape=(8, 16), box=(1, 4, 1, 4)))
    with pytest.raises(BundleInputError) as e:
        scr_items(root)
    msg = str(e.value)
    assert "left clavicle/JPCLN002.gif: mask size (8, 16)" in msg and "image size (16, 16)" in msg
    assert "JSRT/images/JPCLN002.png" in msg  # names both files
    items, summary = scr_items(root, on_error="skip")
    assert len(items) == 4 and summary["skipped"] == 1 and "differs from image size" in summary["errors"][0]
    write_image(root / "SCR/masks/left clavicle/JPCLN002.gif", np.zeros((16, 16), np.uint8))
    with pytest.raises(BundleInputError, match=r"left clavicle/JPCLN002\.gif: mask is empty"):
        scr_items(root)
    items, summary = scr_items(root, require_nonempty=False)
    assert len(items) == 5
    items, summary = scr_items(root, on_error="skip")
    assert len(items) == 4 and summary["skipped"] == 1 and "mask is empty" in summary["errors"][0]
    assert len(scr_items(root, check_files=False)[0]) == 5  # not validated: nothing read


def test_corrupt_and_missing_images_in_pairs(tmp_path, rng, write_image):
    root = make_scr(tmp_path, write_image)
    (root / "JSRT/images/JPCLN001.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(BundleInputError, match=r"JPCLN001\.png: not a readable image"):
        scr_items(root)
    good = write_image(root / "JSRT/images/JPCLN001.png", rng.integers(0, 256, (64, 64), dtype=np.uint8))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated: the header is intact, the pixels are not
    assert read_image_size(good) == (64, 64)
    with pytest.raises(BundleInputError, match=r"JPCLN001\.png: unreadable or truncated image"):
        scr_items(root, decode_images=True)
    with pytest.raises(BundleInputError, match=r"missing\.png: file not found"):
        check_pair(tmp_path / "missing.png", None)
    items, summary = scr_items(root, decode_images=True, on_error="skip")
    assert len(items) == 4 and summary["skipped"] == 1


# ------------------------------------------------------------------------------------------------------- QaTa
def test_qata_items_and_datalist(tmp_path, write_image):
    root = make_qata(tmp_path, write_image)
    items, summary = qata_items(root, "Train Set")
    assert len(items) == 8
    for it in items:
        assert Path(it["label"]).name == "mask_" + Path(it["image"]).name
    assert {it["patient"] for it in items if "sub-" in it["image"]} == {"sub-S0000", "sub-S0001", "sub-S0002",
                                                                         "sub-S0003"}
    datalist, s = qata_datalist(root / "QaTa-COV19", val_fraction=0.25, seed=0)
    assert len(datalist["training"]) + len(datalist["validation"]) == 8 and len(datalist["validation"]) >= 1
    assert len(datalist["test"]) == 3 and all("Test Set" in it["image"] for it in datalist["test"])
    _assert_disjoint({k: datalist[k] for k in ("training", "validation")})


def test_qata_missing_and_mismatched_masks(tmp_path, caplog, write_image):
    root = make_qata(tmp_path, write_image)
    gt = root / "QaTa-COV19/Train Set/Ground-truths"
    (gt / "mask_covid_tr1.png").unlink()
    with pytest.raises(BundleInputError, match=r"mask_covid_tr1\.png: mask not found for image .*covid_tr1\.png"):
        qata_items(root)
    write_image(gt / "mask_covid_tr1.png", _mask(shape=(20, 16)))
    with pytest.raises(BundleInputError,
                       match=r"mask_covid_tr1\.png: mask size \(20, 16\) differs .*Images/covid_tr1\.png"):
        qata_items(root)
    write_image(gt / "mask_covid_tr1.png", np.zeros((16, 16), np.uint8))
    assert len(qata_items(root)[0]) == 8  # an empty infection mask is allowed by default ...
    with caplog.at_level(logging.WARNING):
        items, summary = qata_items(root, require_nonempty=True, on_error="skip")  # ... unless required
    assert len(items) == 7 and summary["skipped"] == 1 and "mask is empty" in caplog.text


# ------------------------------------------------------------------------------------------------ plain folder
def test_folder_items_and_split(tmp_path, write_image):
    root = make_folder(tmp_path, write_image)
    datalist, summary = folder_datalist(root, seed=1, require_nonempty=True)
    assert summary["items"] == 9 and summary["patients"] == 5
    assert sum(len(v) for v in datalist.values()) == 9
    _assert_disjoint(datalist)
    assert datalist["training"][0]["label"].endswith(".png") and "/masks/" in datalist["training"][0]["label"]


def test_folder_bad_csv_and_missing_files(tmp_path, write_image):
    root = make_folder(tmp_path, write_image)
    pd.DataFrame({"id": ["c00"], "patient": ["1"]}).to_csv(root / "cases.csv", index=False)
    with pytest.raises(BundleInputError, match=r"cases\.csv: missing column\(s\) \['patientid'\]"):
        folder_items(root)
    pd.DataFrame({"id": ["c00", "c01", "c99"], "patientid": ["1", "1", "2"]}).to_csv(root / "cases.csv", index=False)
    with pytest.raises(BundleInputError, match=r"images/c99\.png: image of case 'c99' not found"):
        folder_items(root)
    items, summary = folder_items(root, on_error="skip")
    assert len(items) == 2 and summary["skipped"] == 1
    (root / "cases.csv").unlink()  # no CSV: pairs by file name, one patient per image
    items, summary = folder_items(root)
    assert len(items) == 9 and len(_patients(items)) == 9 and "split by image" in summary["patient_grouping"]


@pytest.mark.shared_data
def test_real_lungs_folder(real_lungs_dir):
    items, summary = folder_items(real_lungs_dir, require_nonempty=True, decode_images=True)
    assert summary["items"] == 34 and summary["patients"] == 21 and summary["skipped"] == 0
    for it in items:
        d = LoadMaskd("label", required_nonempty=True)(LoadRadiographd("image")(it))
        assert d["image"].shape == d["label"].shape and d["label"].sum() > 0
        assert 0.0 <= float(d["image"].min()) and float(d["image"].max()) <= 1.0
    for seed in (0, 1, 2):
        datalist, _ = folder_datalist(real_lungs_dir, fractions=(0.6, 0.2, 0.2), seed=seed)
        _assert_disjoint(datalist)
        assert sum(len(v) for v in datalist.values()) == 34 and all(len(v) > 0 for v in datalist.values())


# ----------------------------------------------------------------------------------------------- image lists
def test_image_list_items(tmp_path, rng, write_image, write_dicom):
    from bundle.data.io import save_nifti

    folder = tmp_path / "in"
    write_image(folder / "a.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    write_image(folder / "b.jpg", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    save_nifti(folder / "c.nii.gz", rng.random((8, 8)).astype(np.float32))
    write_dicom(folder / "d_no_suffix", rng.integers(0, 4096, (8, 8)).astype(np.uint16), 12)
    (folder / "notes.txt").write_text("x" * 200)
    write_image(folder / "sub" / "e.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    items, summary = image_list_items(folder, check_files=True)
    assert [Path(it["image"]).name for it in items] == ["a.png", "b.jpg", "c.nii.gz", "d_no_suffix"]
    assert len(image_list_items(folder, recursive=True)[0]) == 5
    assert read_image_size(folder / "d_no_suffix") == (8, 8) and read_image_size(folder / "c.nii.gz") == (8, 8)
    with pytest.raises(BundleInputError, match=r"gone\.png: file or folder not found"):
        image_list_items([folder / "a.png", tmp_path / "gone.png"])
    items, summary = image_list_items([folder / "a.png", tmp_path / "gone.png", folder / "notes.txt"],
                                      check_files=True, on_error="skip")
    assert [Path(it["image"]).name for it in items] == ["a.png"] and summary["skipped"] == 2
    jpg = write_image(tmp_path / "t" / "big.jpg", rng.integers(0, 256, (64, 64), dtype=np.uint8))
    jpg.write_bytes(jpg.read_bytes()[:2000])  # truncated JPEG: the header still reads, the pixels do not
    assert len(image_list_items(jpg.parent, check_files=True)[0]) == 1
    with pytest.raises(BundleInputError, match=r"big\.jpg: unreadable or truncated image"):
        image_list_items(jpg.parent, check_files=True, decode_images=True)
    items, summary = image_list_items(jpg.parent, check_files=True, decode_images=True, on_error="skip")
    assert items == [] and summary["skipped"] == 1 and "big.jpg" in summary["errors"][0]


# -------------------------------------------------------------------------------------------------- datalists
def test_write_read_datalist_and_monai_compat(tmp_path):
    from monai.data import load_decathlon_datalist

    items = _items(6)
    for it in items:
        it["label"] = [1.0, 0.0]
    path = write_datalist(tmp_path / "d" / "x.json", {"training": items[:5], "validation": items[5:]}, name="x")
    obj = read_datalist(path)
    assert obj["training"] == items[:5] and obj["test"] == [] and obj["numTraining"] == 5 and obj["name"] == "x"
    assert load_decathlon_datalist(path, is_segmentation=False, data_list_key="validation") == items[5:]
    assert not list((tmp_path / "d").glob(".*part*"))  # no temporary file left behind
    with pytest.raises(BundleInputError, match=r"x\.json: section 'training', item 0: image file not found"):
        read_datalist(path, check_files=True)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BundleInputError, match=r"bad\.json: not valid JSON"):
        read_datalist(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(BundleInputError, match=r"list\.json: not a datalist"):
        read_datalist(tmp_path / "list.json")
    with pytest.raises(ValueError, match="unknown datalist sections"):
        write_datalist(tmp_path / "y.json", {"train": []})
    two = load_datalist_section(path, "training", n=2, seed=0)
    assert len(two) == 2 and all(it in load_datalist_section(path, "training", n=4, seed=0) for it in two)


def test_build_all_datalists(tmp_path, write_image):
    root = tmp_path / "phantom"
    make_chexpert(root, write_image, n_patients=6)
    make_scr(root, write_image)
    make_qata(root, write_image)
    real = make_folder(tmp_path / "real", write_image)
    out = tmp_path / "datalists"
    summary = build_all_datalists(str(root), str(out), real_lungs_dir=str(real), seed=0)
    assert {p.name for p in out.glob("*.json")} == {"chexpert.json", "scr.json", "qata.json", "real_lungs.json",
                                                     "summary.json"}
    assert summary["chexpert"]["training"] + summary["chexpert"]["validation"] == 12
    assert summary["chexpert"]["test"] == 3 and summary["qata"]["test"] == 3 and summary["real_lungs"]["status"] == \
        "written"
    chexpert = read_datalist(out / "chexpert.json", check_files=True)
    assert all(len(it["label"]) == 14 and len(it["label_mask"]) == 14 for it in chexpert["training"])
    assert all("lesion" in it for it in chexpert["training"])
    scr = read_datalist(out / "scr.json", check_files=True)
    assert all(len(it["label"]) == 5 for it in scr["training"])
    assert json.loads((out / "summary.json").read_text())["scr"]["path"] == str(out / "scr.json")
    # deterministic under the seed
    again = build_all_datalists(root, tmp_path / "again", real_lungs_dir=real, seed=0)
    assert read_datalist(tmp_path / "again" / "qata.json")["validation"] == read_datalist(out / "qata.json")[
        "validation"]
    assert again["scr"]["training"] == summary["scr"]["training"]
    # absent real folder: skipped; absent required layout: an error naming it
    s = build_all_datalists(root, tmp_path / "noreal", real_lungs_dir=tmp_path / "nowhere")
    assert s["real_lungs"]["status"] == "absent" and not (tmp_path / "noreal" / "real_lungs.json").exists()
    shutil.rmtree(root / "QaTa-COV19")
    with pytest.raises(BundleInputError, match="qata dataset layout not found"):
        build_all_datalists(root, tmp_path / "noqata")
    s = build_all_datalists(root, tmp_path / "noqata", required=("chexpert", "scr"))
    assert s["qata"]["status"] == "absent" and s["scr"]["status"] == "written"

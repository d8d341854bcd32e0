"""Inference, export and metadata: the Model Zoo entry points on the shipped weights (models/model.pt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.data.io import load_bitmask, load_mask, load_radiograph

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
MODEL = ROOT / "models" / "model.pt"

needs_model = pytest.mark.skipif(not MODEL.exists(), reason="models/model.pt absent: run `bash scripts/main.sh` first")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def _infer(input_dir: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.yaml"),
           "--dataset_dir", str(input_dir), "--output_dir", str(out_dir), "--device", "$torch.device('cpu')", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def _write_dicom(path: Path, image01: np.ndarray, photometric: str = "MONOCHROME1") -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "phantom"
    ds.Rows, ds.Columns = image01.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    values = np.round(image01 * 4095).astype(np.uint16)
    ds.PixelData = (4095 - values if photometric == "MONOCHROME1" else values).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture(scope="module")
def scr_cases(tmp_path_factory) -> tuple[Path, Path]:
    """A few phantom SCR test cases (not among the shipped model's training phantoms: another seed)."""
    from bundle.data.phantom import generate_phantom_datasets

    root = tmp_path_factory.mktemp("scr")
    generate_phantom_datasets(root, seed=1234, image_size=256, chexpert_train_patients=1, chexpert_valid_patients=1,
                              scr_cases=6, qata_train=1, qata_test=1, progress=False, num_workers=1)
    return root / "JSRT" / "images", root / "SCR" / "masks"


@needs_model
def test_inference_on_phantoms_and_a_monochrome1_dicom(scr_cases, tmp_path):
    images, masks = scr_cases
    inputs = tmp_path / "in"
    inputs.mkdir()
    cases = sorted(p.stem for p in images.glob("*.png"))
    for case in cases:
        os.symlink(images / f"{case}.png", inputs / f"{case}.png")
    img, _ = load_radiograph(images / f"{cases[0]}.png")
    _write_dicom(inputs / "dicom_case", img)          # a DICOM without suffix, MONOCHROME1 (inverted storage)
    res = _infer(inputs, tmp_path / "out", "--save_overlay", "true")
    assert res.returncode == 0, res.stderr[-3000:]
    dices = {"lungs": [], "heart": [], "clavicles": []}
    for case in cases:
        pred = load_bitmask(tmp_path / "out" / f"{case}_seg.png", 3)
        ref = {s: load_mask(masks / s / f"{case}.gif") for s in
               ("left lung", "right lung", "heart", "left clavicle", "right clavicle")}
        assert pred.shape[1:] == ref["heart"].shape          # the input's geometry
        dices["lungs"].append(_dice(pred[0] > 0, (ref["left lung"] | ref["right lung"]) > 0))
        dices["heart"].append(_dice(pred[1] > 0, ref["heart"] > 0))
        dices["clavicles"].append(_dice(pred[2] > 0, (ref["left clavicle"] | ref["right clavicle"]) > 0))
        assert (tmp_path / "out" / f"{case}_overlay.png").exists()
    mean = {k: float(np.mean(v)) for k, v in dices.items()}
    print("phantom inference Dice:", mean)
    assert mean["lungs"] > 0.85 and mean["heart"] > 0.75, mean
    # the DICOM (MONOCHROME1) copy of the first case gives the same mask as its PNG
    dcm = load_bitmask(tmp_path / "out" / "dicom_case_seg.png", 3)
    png = load_bitmask(tmp_path / "out" / f"{cases[0]}_seg.png", 3)
    assert _dice(dcm > 0, png > 0) > 0.98


@needs_model
def test_inference_on_real_radiographs_reports_dice(real_lungs_dir, tmp_path):
    res = _infer(real_lungs_dir / "images", tmp_path / "out", "--output_ext", ".nii.gz")
    assert res.returncode == 0, res.stderr[-3000:]
    import nibabel as nib

    dices = []
    for mask_path in sorted((real_lungs_dir / "masks").glob("*.png")):
        out = tmp_path / "out" / f"{mask_path.stem}_seg.nii.gz"
        data = np.asarray(nib.load(str(out)).dataobj)       # (X, Y, C)
        pred = np.moveaxis(data, -1, 0).swapaxes(1, 2)      # (C, H, W)
        ref = load_mask(mask_path)
        assert pred.shape == (3, *ref.shape)
        dices.append(_dice(pred[0] > 0, ref > 0))
    print(f"real radiographs, phantom-trained model: lung Dice mean {np.mean(dices):.3f} (n={len(dices)})")
    assert len(dices) == 34 and np.isfinite(dices).all()


def test_inference_workflow_properties(tmp_path):
    from monai.bundle import create_workflow

    (tmp_path / "a.png").write_bytes((ROOT / "docs" / "images" / "phantom_montage.png").read_bytes())
    wf = create_workflow(config_file=str(CONFIGS / "inference.yaml"), workflow_type="inference",
                         dataset_dir=str(tmp_path))
    assert wf.check_properties() == []


def test_verify_metadata(shared_dir):
    schema = shared_dir / "schemas" / "meta_schema_20240725.json"
    if not schema.exists():
        pytest.skip(f"needs {schema} (absent)")
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"),
           "--filepath", str(schema)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "verified with no error" in res.stdout + res.stderr, res.stderr[-2000:]
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    # every package the configs import is declared
    for pkg in ("pytorch-ignite", "captum", "mlflow", "nibabel", "pydicom", "pillow", "scipy"):
        assert pkg in meta["required_packages_version"]


def test_verify_net_in_out_segmenter():
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
           "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.yaml"), "--n", "4"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "verified with no error" in res.stdout + res.stderr, res.stderr[-2000:]


@needs_model
def test_torchscript_export_matches_eager(tmp_path):
    ts = tmp_path / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
           "--ckpt_file", str(MODEL), "--meta_file", str(CONFIGS / "metadata.json"),
           "--config_file", str(CONFIGS / "inference.yaml")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    from bundle.networks.segmentation import build_segmenter

    eager = build_segmenter("segresnet", out_channels=3)
    eager.load_state_dict(torch.load(MODEL, map_location="cpu"))
    eager.eval()
    scripted = torch.jit.load(str(ts))
    x = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-5)


def test_large_files_record_matches_the_shipped_weights():
    """large_files.yml (the Model Zoo's record of hosted weights) names the shipped files with their hashes:
    MONAI's download_large_files verifies existing files against hash_val (it raises on a mismatch) and downloads
    nothing."""
    import yaml
    from monai.bundle import download_large_files

    record = yaml.safe_load((ROOT / "large_files.yml").read_text())["large_files"]
    assert {e["path"] for e in record} == {"models/model.pt", "models/model.ts"}
    assert all(e["hash_type"] == "md5" and len(e["hash_val"]) == 32 for e in record)
    download_large_files(bundle_path=str(ROOT))   # HashCheckError if a hash is stale


# ---- batch jobs skip and report bad inputs; DICOM archives' syntaxes run through inference.yaml ----------------
@needs_model
def test_batch_inference_skips_bad_inputs_and_reports_them(scr_cases, tmp_path):
    images, _ = scr_cases
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted(images.glob("*.png"))[:3]
    for p in good:
        os.symlink(p, inputs / p.name)
    data = good[0].read_bytes()
    (inputs / "0_truncated.png").write_bytes(data[: len(data) // 2])        # sorted first: the old code stopped here
    (inputs / "1_empty.dcm").write_bytes(b"")
    (inputs / "2_notes.png").write_text("this is a text file named .png\n")
    res = _infer(inputs, tmp_path / "out")
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-3000:]
    assert "inference: 3 written / 3 failed of 6 inputs" in log
    for p in good:
        assert load_bitmask(tmp_path / "out" / f"{p.stem}_seg.png", 3).shape[1:] == load_radiograph(p)[0].shape
    assert len(list((tmp_path / "out").glob("*_seg.png"))) == 3
    import csv

    with open(tmp_path / "out" / "failures.csv", newline="") as f:
        rows = {Path(r["input"]).name: r["reason"] for r in csv.DictReader(f)}
    assert set(rows) == {"0_truncated.png", "1_empty.dcm", "2_notes.png"}
    assert "truncated" in rows["0_truncated.png"] and "empty" in rows["1_empty.dcm"]
    assert "not a readable image" in rows["2_notes.png"]
    assert all(r.startswith("BundleInputError") for r in rows.values())
    assert not (tmp_path / "out" / ".failures").exists()
    # on_error raise (in this process, as `monai.bundle run` would): the first bad file (sorted first) ends the run
    from monai.bundle import run

    from bundle.utils import BundleInputError

    with pytest.raises(Exception) as err:
        run(config_file=str(CONFIGS / "inference.yaml"), dataset_dir=str(inputs), output_dir=str(tmp_path / "raise"),
            device="$torch.device('cpu')", on_error="raise")
    cause = err.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, BundleInputError) and cause.path == str(inputs / "0_truncated.png")
    assert not list((tmp_path / "raise").glob("*_seg.png"))


@needs_model
def test_inference_on_archive_dicom_syntaxes(tmp_path):
    """pydicom-data's radiographs and lossless files (JPEG Lossless SV1, JPEG-LS, JPEG 2000, RLE) through
    inference.yaml: every one gets a mask of its own size, none fails."""
    pytest.importorskip("data_store", reason="needs the pydicom-data package (requirements-dev.txt)")
    from data_store import DataStore

    names = ["RG1_J2KR.dcm", "RG3_J2KR.dcm", "JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
             "emri_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
             "emri_small_big_endian.dcm"]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in names:
        os.symlink(DataStore().get_path(n), inputs / n)
    res = _infer(inputs, tmp_path / "out")
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert f"inference: {len(names)} written / 0 failed of {len(names)} inputs" in log
    assert "only the first frame is used" in log                       # the multi-frame files are warned about
    import pydicom

    for n in names:
        ds = pydicom.dcmread(inputs / n, stop_before_pixels=True)
        assert load_bitmask(tmp_path / "out" / f"{Path(n).stem}_seg.png", 3).shape[1:] == (ds.Rows, ds.Columns)
    assert (tmp_path / "out" / "failures.csv").read_text() == "input,stage,reason\n"


def test_single_image_preprocessing_still_raises(tmp_path):
    """MONAI Label applies `preprocessing` to one image itself: a bad file raises, naming it."""
    from monai.bundle import ConfigParser

    from bundle.utils import BundleInputError

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    pre = parser.get_parsed_content("preprocessing")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(Exception) as err:
        pre({"image": str(bad)})
    cause = err.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, BundleInputError) and str(cause).startswith(str(bad))


def test_bitmask_label_map_round_trip(tmp_path):
    """postprocessing's last step: (C, H, W) masks -> one bit-mask map in MONAI's (x, y) order (what MONAI Label's
    writer takes); SaveMasksd writes it in the input's rows and columns; LoadMask reads it back as the channels."""
    from monai.data import MetaTensor

    from bundle.data.io import decode_bitmask, read_array
    from bundle.transforms import BitmaskLabeld, LoadMask
    from bundle.workflows.inference import SaveMasksd

    rng = np.random.default_rng(0)
    masks = (rng.random((3, 5, 7)) > 0.5).astype(np.float32)   # non-square: rows and columns cannot be confused
    image = MetaTensor(torch.zeros(1, 4, 4), meta={"filename_or_obj": str(tmp_path / "case.png"),
                                                  "spatial_shape": np.asarray([5, 7])})
    out = BitmaskLabeld(keys="pred")({"pred": torch.from_numpy(masks), "image": image})
    label = out["pred"]
    assert label.shape == (7, 5) and label.dtype == np.uint8
    expected = masks[0] + 2 * masks[1] + 4 * masks[2]           # lungs = 1, heart = 2, clavicles = 4
    np.testing.assert_array_equal(label.T, expected)
    assert tuple(out["image"].meta["spatial_shape"]) == (7, 5) and image.meta["spatial_shape"].tolist() == [5, 7]
    writer = SaveMasksd(keys="pred", output_dir=str(tmp_path / "out"), num_channels=3)
    written = writer(out)["pred_path"]
    arr, _ = read_array(written)
    np.testing.assert_array_equal(arr, expected)
    np.testing.assert_array_equal(decode_bitmask(arr, 3), masks.astype(np.uint8))
    # a single label file of a 3-structure task is a bit mask; a list of per-structure files is read as such
    loaded = LoadMask(num_bitmask_channels=3, union_groups=[[0, 1], [2], [3, 4]])(written)
    np.testing.assert_array_equal(loaded.numpy(), masks)


def test_export_writes_measured_eval_metrics(tmp_path):
    """metadata.json's eval_metrics come from the shipped model's evaluation file (bundle.metadata), the rest kept."""
    from bundle.metadata import eval_metrics_from, write_eval_metrics
    from bundle.utils import BundleInputError

    metrics = tmp_path / "metrics_test.json"
    metrics.write_text(json.dumps({"task": "scr", "init": "doll", "seed": 0, "metrics": {
        "test_mean_dice": 0.912345, "test_dice_lungs": 0.98, "test_hd95_heart": 2.5, "test_pred_area": 7.0}}))
    got = eval_metrics_from(metrics)
    assert got == {"mean_dice": 0.9123, "dice_lungs": 0.98, "hd95_heart": 2.5, "task": "scr", "init": "doll", "seed": 0}
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"version": "0.1.0", "eval_metrics": {"mean_dice": 0.0}}))
    write_eval_metrics(meta, got, data="phantom")
    written = json.loads(meta.read_text())
    assert written["version"] == "0.1.0" and written["eval_metrics"]["mean_dice"] == 0.9123
    assert written["eval_metrics"]["data"] == "phantom"
    metrics.write_text(json.dumps({"metrics": {"test_loss": 1.0}}))
    with pytest.raises(BundleInputError, match="metrics_test.json"):
        eval_metrics_from(metrics)


def test_model_zoo_verify_bundle_steps(tmp_path):
    """The Model Zoo CI's ci/verify_bundle.py steps that need no network: metadata.json with its version in the
    changelog, the large files listed with their hashes, the checkpoint exported to TorchScript through
    ``network_def`` of configs/inference.yaml, and the shipped models/model.ts loading and agreeing with it."""
    import hashlib

    import yaml
    from monai.bundle import ckpt_export

    root = CONFIGS.parent
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    for entry in yaml.safe_load((root / "large_files.yml").read_text())["large_files"]:
        digest = hashlib.new(entry["hash_type"], (root / entry["path"]).read_bytes()).hexdigest()
        assert digest == entry["hash_val"], entry["path"]
    exported = tmp_path / "verify_model.ts"
    ckpt_export(net_id="network_def", filepath=str(exported), ckpt_file=str(root / "models" / "model.pt"),
                meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.yaml"),
                bundle_root=str(root))
    x = torch.rand(1, 1, 64, 64)
    ours, shipped = torch.jit.load(str(exported)).eval(), torch.jit.load(str(root / "models" / "model.ts")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), shipped(x))

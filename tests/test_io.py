"""Image IO: DICOM handling (bit depth, rescale, MONOCHROME1), PNG/JPEG/GIF/NIfTI agreement, bad input, and the
loading transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.data.io import load_bitmask, load_mask, load_radiograph, read_array, save_nifti, save_png, encode_bitmask
from bundle.transforms import LoadMask, LoadMaskd, LoadRadiographd
from bundle.utils import BundleInputError

# ------------------------------------------------------------------------------------------------------ helpers
LEVELS = 15  # 16 grey levels k / 15: exact in 8 bits (k * 17) and in 12 bits (k * 273)


@pytest.fixture(scope="module")
def levels() -> np.ndarray:
    """Integer grey levels 0..15 of a 40 x 56 test picture (diagonal bands plus a bright block)."""
    r, c = np.mgrid[:40, :56]
    k = (r // 3 + c) % (LEVELS + 1)
    k[5:12, 30:44] = LEVELS
    return k.astype(np.int64)


# -------------------------------------------------------------------------------------------------------- DICOM
def test_dicom_variants_load_to_the_source_picture(tmp_path, levels, write_image, write_dicom):
    src = levels / LEVELS
    v12 = (levels * 273).astype(np.uint16)
    files = {
        "mono2_12bit": write_dicom(tmp_path / "mono2.dcm", v12, 12),
        "mono1_12bit": write_dicom(tmp_path / "mono1.dcm", (4095 - v12).astype(np.uint16), 12, "MONOCHROME1"),
        "rescaled": write_dicom(tmp_path / "rescaled.dcm", v12, 12, slope=2.0, intercept=-1024.0),
        "mono1_rescaled": write_dicom(tmp_path / "mono1r.dcm", (4095 - v12).astype(np.uint16), 12, "MONOCHROME1",
                                      slope=0.5, intercept=10.0),
        "8bit": write_dicom(tmp_path / "b8.dcm", (levels * 17).astype(np.uint8), 8),
        "signed_12bit": write_dicom(tmp_path / "signed.dcm", (levels * 273 - 2048).astype(np.int16), 12),
        "no_suffix": write_dicom(tmp_path / "IM000001", v12, 12),
    }
    png = write_image(tmp_path / "src.png", (levels * 17).astype(np.uint8))
    reference, _ = load_radiograph(png)
    np.testing.assert_allclose(reference, src, atol=1e-6)
    for name, path in files.items():
        arr, meta = load_radiograph(path)
        assert arr.dtype == np.float32 and arr.shape == levels.shape, name
        np.testing.assert_allclose(arr, reference, atol=1e-6, err_msg=name)
        assert meta["format"] == "dicom"
    # MONOCHROME1 really was stored inverted: the raw stored values differ, the loaded pictures do not
    import pydicom

    raw1 = pydicom.dcmread(files["mono1_12bit"]).pixel_array
    raw2 = pydicom.dcmread(files["mono2_12bit"]).pixel_array
    np.testing.assert_array_equal(raw1.astype(np.int64), 4095 - raw2.astype(np.int64))
    assert read_array(files["mono1_12bit"])[1]["photometric"] == "MONOCHROME1"
    # the bone-bright convention: the block set to the highest level is the brightest part of every variant
    for path in files.values():
        assert load_radiograph(path)[0][5:12, 30:44].min() == pytest.approx(1.0, abs=1e-6)


def test_dicom_rescale_range_in_meta(tmp_path, levels, write_dicom):
    path = write_dicom(tmp_path / "r.dcm", (levels * 273).astype(np.uint16), 12, slope=2.0, intercept=-1024.0)
    _, meta = read_array(path)
    assert meta["range"] == (-1024.0, 2 * 4095 - 1024.0)
    assert meta["bits_stored"] == 12


def test_png_jpeg_gif_nifti_agree(tmp_path, levels, write_image):
    pic = (levels * 17).astype(np.uint8)
    png, _ = load_radiograph(write_image(tmp_path / "a.png", pic))
    gif, _ = load_radiograph(write_image(tmp_path / "a.gif", pic))
    jpg, _ = load_radiograph(write_image(tmp_path / "a.jpg", pic))
    save_nifti(tmp_path / "a.nii.gz", pic.astype(np.float32))
    nii, _ = load_radiograph(tmp_path / "a.nii.gz")
    np.testing.assert_allclose(gif, png, atol=1e-6)
    np.testing.assert_allclose(nii, png, atol=1e-6)  # NIfTI is transposed on write and on read
    assert np.abs(jpg - png).mean() < 0.02  # lossy, but the same picture in the same orientation


def test_uint16_png_and_bitmask_roundtrip(tmp_path, rng):
    masks = (rng.random((14, 20, 24)) > 0.7).astype(np.uint8)
    masks[0] = 0
    save_png(tmp_path / "bits.png", encode_bitmask(masks))
    np.testing.assert_array_equal(load_bitmask(tmp_path / "bits.png", 14), masks)
    img16 = (rng.random((20, 24)) * 65535).astype(np.uint16)
    save_png(tmp_path / "img16.png", img16)
    np.testing.assert_allclose(load_radiograph(tmp_path / "img16.png")[0], img16 / 65535.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- bad input
def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    out = path.with_name("truncated_" + path.name)
    out.write_bytes(data[: len(data) // 2])
    return out


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(BundleInputError, match=r"nope\.png: file not found"):
        load_radiograph(tmp_path / "nope.png")
    with pytest.raises(BundleInputError, match=r"nope_mask\.png: file not found"):
        load_mask(tmp_path / "nope_mask.png")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".dcm"])
def test_random_bytes_are_unreadable(tmp_path, rng, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(BundleInputError, match=rf"garbage\{suffix}: .*(not a readable image|unreadable)") as e:
        load_radiograph(path)
    assert e.value.path == str(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_images_raise(tmp_path, rng, write_image, suffix):
    good = write_image(tmp_path / f"noise{suffix}", rng.integers(0, 256, (96, 96), dtype=np.uint8))
    load_radiograph(good)  # the intact file loads
    bad = _truncated(good)
    with pytest.raises(BundleInputError, match=rf"truncated_noise\{suffix}: .*truncated"):
        load_radiograph(bad)


def test_empty_and_unsupported_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BundleInputError, match=r"empty\.png: file is empty"):
        load_radiograph(tmp_path / "empty.png")
    (tmp_path / "notes.txt").write_text("not an image, long enough to have 132 bytes " * 5)
    with pytest.raises(BundleInputError, match=r"notes\.txt: unsupported image format"):
        load_radiograph(tmp_path / "notes.txt")
    with pytest.raises(BundleInputError, match="is a directory"):
        load_radiograph(tmp_path)


def test_empty_mask_when_required(tmp_path, write_image):
    path = write_image(tmp_path / "blank_mask.png", np.zeros((16, 16), np.uint8))
    assert load_mask(path).sum() == 0  # allowed by default
    with pytest.raises(BundleInputError, match=r"blank_mask\.png: mask is empty"):
        load_mask(path, required_nonempty=True)


def test_mask_binarisation_gif(tmp_path, rng, write_image):
    truth = rng.random((30, 20)) > 0.5
    path = write_image(tmp_path / "m.gif", truth.astype(np.uint8) * 255)
    mask = load_mask(path)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask, truth)


# --------------------------------------------------------------------------------------------------- transforms
def test_load_transforms_shapes_and_union(tmp_path, rng, write_image):
    image = write_image(tmp_path / "img.png", rng.integers(0, 256, (32, 24), dtype=np.uint8))
    masks = []
    for k in range(5):
        m = np.zeros((32, 24), np.uint8)
        m[k * 5:k * 5 + 4, 2:10] = 255
        masks.append(str(write_image(tmp_path / f"m{k}.gif", m)))
    d = LoadRadiographd("image")({"image": str(image)})
    d = LoadMaskd("label", union_groups=[[0, 1], [2], [3, 4]])({**d, "label": masks})
    assert tuple(d["image"].shape) == (1, 32, 24) and d["image"].dtype == torch.float32
    assert tuple(d["label"].shape) == (3, 32, 24)
    assert d["label"][0].sum() == 2 * 4 * 8 and d["label"][1].sum() == 4 * 8
    assert d["image"].meta["filename_or_obj"] == str(image)


def test_loadmaskd_size_mismatch_names_both_files(tmp_path, rng, write_image):
    image = write_image(tmp_path / "img.png", rng.integers(0, 256, (32, 24), dtype=np.uint8))
    mask = write_image(tmp_path / "small_mask.png", np.full((16, 24), 255, np.uint8))
    d = LoadRadiographd("image")({"image": str(image)})
    with pytest.raises(BundleInputError, match=r"small_mask\.png: mask size \(16, 24\) differs from image size "
                                               r"\(32, 24\).*img\.png"):
        LoadMaskd("label")({**d, "label": str(mask)})


def test_loadmask_channels_of_different_sizes(tmp_path, write_image):
    a = write_image(tmp_path / "a.png", np.full((8, 8), 255, np.uint8))
    b = write_image(tmp_path / "b.png", np.full((8, 9), 255, np.uint8))
    with pytest.raises(BundleInputError, match="per-channel masks differ in size"):
        LoadMask()([str(a), str(b)])
    with pytest.raises(BundleInputError, match="mask is empty"):
        LoadMask(required_nonempty=True)(str(write_image(tmp_path / "z.png", np.zeros((8, 8), np.uint8))))


def test_prepare_radiograph_is_monai_resize_and_percentiles_cached_and_inverted(tmp_path, rng, write_image):
    """PrepareRadiographd gives MONAI's Resized(area) + ScaleIntensityRangePercentilesd exactly, is cached by
    CacheDataset (it is not randomizable: as a Compose it was re-run for every item of every step), and Invertd
    restores the input's size through it."""
    from monai.data import CacheDataset
    from monai.transforms import (Compose, Invertd, RandGaussianNoised, Resized, ScaleIntensityRangePercentilesd)

    from bundle.transforms import PrepareRadiographd

    path = tmp_path / "r.png"
    write_image(path, rng.integers(0, 256, size=(96, 80)).astype(np.uint8))
    item = LoadRadiographd(keys="image")({"image": str(path)})
    ours = PrepareRadiographd(keys="image", spatial_size=(32, 40))(dict(item))["image"]
    ref = Compose([Resized(keys="image", spatial_size=(32, 40), mode="area"),
                   ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                                                   clip=True)])(dict(item))["image"]
    assert tuple(ours.shape) == (1, 32, 40)
    torch.testing.assert_close(torch.as_tensor(ours), torch.as_tensor(ref))

    pipeline = Compose([LoadRadiographd(keys="image"), PrepareRadiographd(keys="image", spatial_size=(32, 40)),
                        RandGaussianNoised(keys="image", prob=1.0, std=0.1)])
    ds = CacheDataset([{"image": str(path)}], transform=pipeline, progress=False)
    assert tuple(ds._cache[0]["image"].shape) == (1, 32, 40)   # cached at network size, before the random noise

    pre = Compose([LoadRadiographd(keys="image"), PrepareRadiographd(keys="image", spatial_size=(32, 40))])
    d = pre({"image": str(path)})
    d["pred"] = d["image"].clone().repeat(3, 1, 1)
    out = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)
    assert tuple(out["pred"].shape) == (3, 96, 80)

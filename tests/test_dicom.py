"""DICOM as radiography archives hold it: every transfer syntax, two independent decoders, VOI LUT / window,
MONOCHROME1, rescale, multi-frame, PixelSpacing ``0\\0``, files without pixel data.

The public test files come from the ``pydicom-data`` package (a test dependency, requirements-dev.txt): its wheel
holds the files and registers them through pydicom's ``pydicom.data.external_sources`` entry point, so
``pydicom.data.get_testdata_file`` finds them on disk; nothing is downloaded at test time (a missing file skips).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from bundle.data.io import load_radiograph, read_array
from bundle.utils import BundleInputError

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("data_store", reason="needs the pydicom-data package (requirements-dev.txt)")


def dicom_file(name: str) -> Path:
    """Path of a pydicom / pydicom-data test file, found locally only (no download)."""
    from data_store import DataStore

    try:
        return Path(DataStore().get_path(name))
    except ValueError:
        pass
    local = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not local.is_file():
        pytest.skip(f"{name}: not in pydicom-data nor pydicom's own test files")
    return local


def decode(path: Path, plugin: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    return pixel_array(str(path), decoding_plugin=plugin)


# file -> what it is (the radiographs RG1/RG3 are CR, MONOCHROME1, PixelSpacing 0\0 in RG1)
LOADABLE = {
    "RG1_UNCR.dcm": "CR, explicit little endian",
    "RG1_J2KR.dcm": "CR, JPEG 2000 lossless",
    "RG1_J2KI.dcm": "CR, JPEG 2000 lossy",
    "RG3_J2KR.dcm": "CR, JPEG 2000 lossless, 10 bit",
    "JPEG-LL.dcm": "JPEG Lossless SV1, signed 16 bit",
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "JPEG Lossless SV1, 8 bit",
    "emri_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless, multi-frame",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless, signed",
    "JPEGLSNearLossless_16.dcm": "JPEG-LS near-lossless",
    "emri_small_RLE.dcm": "RLE, multi-frame",
    "MR_small_RLE.dcm": "RLE",
    "emri_small_jpeg_2k_lossless.dcm": "JPEG 2000 lossless, multi-frame",
    "JPGExtended.dcm": "JPEG extended 12 bit",
    "image_dfl.dcm": "deflated explicit little endian",
    "MR_small_bigendian.dcm": "explicit big endian",
    "emri_small_big_endian.dcm": "explicit big endian, multi-frame",
    "MR_small_implicit.dcm": "implicit little endian",
    "US1_J2KR.dcm": "JPEG 2000 lossless colour (YBR_RCT)",
    "OBXXXX1A_rle.dcm": "RLE palette colour",
}

# lossless compressed file -> (two independent decoders, the uncompressed twin or None)
LOSSLESS = {
    "JPEG-LL.dcm": (("pylibjpeg", "gdcm"), None),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": (("pylibjpeg", "gdcm"), None),
    "emri_small_jpeg_ls_lossless.dcm": (("pylibjpeg", "gdcm"), "emri_small.dcm"),
    "MR_small_jpeg_ls_lossless.dcm": (("pylibjpeg", "gdcm"), "MR_small.dcm"),
    "RG1_J2KR.dcm": (("pylibjpeg", "gdcm"), "RG1_UNCR.dcm"),
    "RG3_J2KR.dcm": (("pylibjpeg", "gdcm"), "RG3_UNCR.dcm"),
    "MR2_J2KR.dcm": (("pylibjpeg", "gdcm"), "MR2_UNCR.dcm"),
    "emri_small_jpeg_2k_lossless.dcm": (("pylibjpeg", "gdcm"), "emri_small.dcm"),
    "emri_small_RLE.dcm": (("pylibjpeg", "pydicom"), "emri_small.dcm"),   # gdcm's RLE is not a pydicom plugin
    "MR_small_RLE.dcm": (("pylibjpeg", "pydicom"), "MR_small.dcm"),
    "OBXXXX1A_rle.dcm": (("pylibjpeg", "pydicom"), "OBXXXX1A.dcm"),
}


@pytest.mark.parametrize("name", sorted(LOADABLE))
def test_public_files_load(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # multi-frame warnings are checked below
        img, meta = load_radiograph(dicom_file(name))
    assert img.dtype == np.float32 and img.ndim == 2 and min(img.shape) >= 10
    assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert img.std() > 0, f"{name} ({LOADABLE[name]}) loads as a constant picture"
    assert meta["format"] == "dicom"


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_files_decode_identically_through_two_decoders(name):
    (first, second), twin = LOSSLESS[name]
    path = dicom_file(name)
    a, b = decode(path, first), decode(path, second)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a, b), f"{name}: {first} and {second} differ"
    if twin is not None:                          # and equal to the uncompressed copy of the same picture
        assert np.array_equal(a, decode(dicom_file(twin), "pydicom"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert np.array_equal(load_radiograph(path)[0], load_radiograph(dicom_file(twin))[0])


# ---- JPEG Lossless with every selection value: a minimal encoder written from ITU-T T.81 Annex H -----------------
def _predict(sv: int, ra: int, rb: int, rc: int) -> int:
    return {1: ra, 2: rb, 3: rc, 4: ra + rb - rc, 5: ra + ((rb - rc) >> 1), 6: rb + ((ra - rc) >> 1),
            7: (ra + rb) >> 1}[sv]


def encode_jpeg_lossless(img: np.ndarray, precision: int, sv: int) -> bytes:
    """Encode a greyscale ``(H, W)`` integer image as a lossless (process 14) JPEG with predictor ``sv``; one
    Huffman table whose 17 difference categories all have 5-bit codes (a valid, if not optimal, table)."""
    h, w = img.shape
    x = img.astype(np.int64)
    bits: list[int] = []

    def put(value: int, n: int) -> None:
        bits.extend((value >> (n - 1 - k)) & 1 for k in range(n))

    for r in range(h):
        for c in range(w):
            if r == 0 and c == 0:
                pred = 1 << (precision - 1)
            elif r == 0:
                pred = int(x[r, c - 1])
            elif c == 0:
                pred = int(x[r - 1, c])
            else:
                pred = _predict(sv, int(x[r, c - 1]), int(x[r - 1, c]), int(x[r - 1, c - 1]))
            diff = (int(x[r, c]) - pred) % 65536
            if diff >= 32768:
                diff -= 65536                       # -32768..32767; 32768 itself is category 16
            ssss = 16 if diff == -32768 else abs(diff).bit_length()
            put(ssss, 5)                            # the code of category k is k on 5 bits (canonical order)
            if 0 < ssss < 16:
                put(diff if diff > 0 else diff + (1 << ssss) - 1, ssss)
    bits.extend([1] * (-len(bits) % 8))
    data = bytearray()
    for i in range(0, len(bits), 8):
        byte = int("".join(map(str, bits[i:i + 8])), 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)                       # byte stuffing
    seg = lambda marker, body: bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body  # noqa: E731
    sof = bytes([precision]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([1, 1, 0x00, sv, 0, 0])
    return b"\xff\xd8" + seg(0xC3, sof) + seg(0xC4, dht) + seg(0xDA, sos) + bytes(data) + b"\xff\xd9"


def _encapsulated_dicom(path: Path, img: np.ndarray, bits: int, frame: bytes, syntax: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "TEST"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("sv", [1, 2, 3, 4, 5, 6, 7])
def test_jpeg_lossless_every_selection_value(tmp_path, rng, sv):
    yy, xx = np.mgrid[0:40, 0:56]
    img = (2000 + 900 * np.sin(yy / 6.0) * np.cos(xx / 9.0) + rng.integers(0, 64, (40, 56))).astype(np.uint16)
    img[5, 7], img[30, 50] = 0, 4095              # the extremes of 12 bits
    syntax = "1.2.840.10008.1.2.4.70" if sv == 1 else "1.2.840.10008.1.2.4.57"
    path = _encapsulated_dicom(tmp_path / f"sv{sv}.dcm", img, 12, encode_jpeg_lossless(img, 12, sv), syntax)
    for plugin in ("pylibjpeg", "gdcm"):
        assert np.array_equal(decode(path, plugin), img), f"selection value {sv}: {plugin} differs from the source"
    loaded, _ = load_radiograph(path)
    assert np.allclose(loaded, img / 4095.0, atol=1e-6)


# ---- VOI LUT / window, MONOCHROME1, rescale, multi-frame, pixel spacing, no pixel data --------------------------
def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 'LINEAR' to [0, 1]."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def test_window_applied_by_default_and_optional(tmp_path, write_dicom, rng):
    stored = rng.integers(0, 4096, (32, 48)).astype(np.uint16)
    path = write_dicom(tmp_path / "w.dcm", stored, 12)
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 1500, 1000
    ds.save_as(path)
    img, meta = load_radiograph(path)
    assert meta["voi"] == "window"
    assert np.allclose(img, _linear_window(stored.astype(float), 1500, 1000), atol=2e-3)
    raw, meta = load_radiograph(path, voi_lut=False)
    assert meta["voi"] is None and np.allclose(raw, stored / 4095.0, atol=1e-6)
    # MONOCHROME1 with the same window: the inverse picture of the same display
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "w1.dcm")
    inv, _ = load_radiograph(tmp_path / "w1.dcm")
    assert np.allclose(inv, 1.0 - img, atol=1e-6)


def test_rescale_then_window_in_output_units(tmp_path, write_dicom, rng):
    stored = rng.integers(0, 4096, (24, 24)).astype(np.uint16)
    path = write_dicom(tmp_path / "r.dcm", stored, 12, slope=2.0, intercept=-1024.0)
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 2000, 4000        # in rescaled units
    ds.save_as(path)
    img, _ = load_radiograph(path)
    assert np.allclose(img, _linear_window(stored * 2.0 - 1024.0, 2000, 4000), atol=2e-3)


def test_voi_lut_sequence_file():
    img, meta = load_radiograph(dicom_file("vlut_04.dcm"))
    assert meta["voi"] == "lut"
    ds = pydicom.dcmread(dicom_file("vlut_04.dcm"))
    from pydicom.pixels import apply_voi_lut

    ref = apply_voi_lut(ds.pixel_array, ds).astype(float) / 65535.0   # the file's LUT has 16-bit entries
    assert np.allclose(img, ref, atol=1e-6)


def test_monochrome1_radiograph_is_inverted():
    path = dicom_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    img, _ = load_radiograph(path, voi_lut=False)
    assert np.allclose(img, 1.0 - ds.pixel_array / (2.0**ds.BitsStored - 1), atol=1e-6)


def test_multi_frame_gives_the_first_frame_with_a_warning():
    path = dicom_file("emri_small.dcm")
    with pytest.warns(UserWarning, match="emri_small.dcm: multi-frame DICOM \\(10 frames\\)"):
        img, meta = load_radiograph(path, voi_lut=False)
    frame0 = pydicom.dcmread(path).pixel_array[0]
    assert meta["frames"] == 10
    assert np.allclose(img, frame0 / 4095.0, atol=1e-6)


def test_pixel_spacing_zero_is_unknown(tmp_path, write_dicom):
    assert pydicom.dcmread(dicom_file("RG1_UNCR.dcm"), stop_before_pixels=True).PixelSpacing == [0, 0]
    assert read_array(dicom_file("RG1_UNCR.dcm"))[1]["pixel_spacing"] is None
    assert read_array(dicom_file("JPEG-LL.dcm"))[1]["pixel_spacing"] == [2.26, 2.26]
    path = write_dicom(tmp_path / "s.dcm", np.zeros((8, 8), np.uint16) + np.arange(8, dtype=np.uint16), 12)
    ds = pydicom.dcmread(path)
    ds.ImagerPixelSpacing = [0.139, 0.139]
    ds.save_as(path)
    assert read_array(path)[1]["pixel_spacing"] == [0.139, 0.139]


@pytest.mark.parametrize("name,problem", [("rtplan.dcm", "no pixel data"), ("test-SR.dcm", "no pixel data"),
                                          ("MR_truncated.dcm", "unreadable DICOM pixel data")])
def test_unusable_files_are_refused_with_the_file_named(name, problem):
    path = dicom_file(name)
    with pytest.raises(BundleInputError, match=problem) as err:
        load_radiograph(path)
    assert str(err.value).startswith(str(path))

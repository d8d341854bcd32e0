"""The bad-input corpus: files a radiology folder or a CSV export really holds, made on the fly, each with the
behaviour the bundle must show, either *handled* (loads to the right picture / rows) or *refused* with a
:class:`~bundle.utils.BundleInputError` whose message starts with the file's path and states the problem.

Used by ``tests/test_bad_inputs.py`` (one test per case) and by ``scripts/fault_check.py``, which writes the table of
``docs/reliability.md`` from :func:`run_corpus`.
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bundle.utils import BundleInputError


@dataclass
class Case:
    name: str
    group: str        # "image", "mask", "csv"
    expect: str       # "handled" or "refused"
    run: Callable[[Path], str]   # builds its input under the folder, checks the behaviour, returns what it saw


def _picture(h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((np.sin(yy / 5.0) * np.cos(xx / 7.0) + 1) * 127.5).astype(np.uint8)


def _save(path: Path, arr: np.ndarray, **kwargs: Any) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(path, **kwargs)
    return path


def _dicom(path: Path, arr: np.ndarray | None = None, pixels: bool = True) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = _picture().astype(np.uint16) * 16 if arr is None else arr
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "TEST"
    if pixels:
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = arr.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _nifti(path: Path, arr: np.ndarray) -> Path:
    from bundle.data.io import save_nifti

    save_nifti(path, arr)
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def refused(path: Path, call: Callable[[], Any], problem: str) -> str:
    """``call()`` must raise a BundleInputError naming ``path`` whose message contains ``problem``."""
    try:
        call()
    except BundleInputError as e:
        msg = str(e)
        assert msg.startswith(str(path)), f"the error does not start with the file: {msg}"
        assert problem.lower() in msg.lower(), f"expected {problem!r} in: {msg}"
        return msg[len(str(path)) + 2:]
    raise AssertionError(f"{path}: accepted, expected a refusal ({problem})")


def _load(path: Path) -> np.ndarray:
    from bundle.data.io import load_radiograph

    return load_radiograph(path)[0]


# ---- images -------------------------------------------------------------------------------------------------------
def _image_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name: str, expect: str, group: str = "image") -> Callable:
        def deco(fn: Callable[[Path], str]) -> Callable[[Path], str]:
            cases.append(Case(name, group, expect, fn))
            return fn
        return deco

    for fmt, suffix, kwargs in (("PNG", ".png", {}), ("JPEG", ".jpg", {"quality": 95})):
        @add(f"truncated {fmt}", "refused")
        def _(d: Path, suffix=suffix, kwargs=kwargs) -> str:
            p = _truncate(_save(d / f"t{suffix}", _picture(256, 256), **kwargs))
            return refused(p, lambda: _load(p), "truncated")

        @add(f"zero-byte {fmt}", "refused")
        def _(d: Path, suffix=suffix) -> str:
            p = d / f"z{suffix}"
            p.write_bytes(b"")
            return refused(p, lambda: _load(p), "empty")

        @add(f"text file renamed {suffix}", "refused")
        def _(d: Path, suffix=suffix) -> str:
            p = d / f"notes{suffix}"
            p.write_text("patient list, not an image\n")
            return refused(p, lambda: _load(p), "not a readable image")

    @add("JPEG content named .png", "handled")
    def _(d: Path) -> str:
        jpg = _save(d / "a.jpg", _picture(), quality=95)
        png = d / "a.png"
        png.write_bytes(jpg.read_bytes())
        assert np.array_equal(_load(png), _load(jpg))
        return "decoded by content, same pixels as the .jpg"

    @add("truncated DICOM", "refused")
    def _(d: Path) -> str:
        p = _truncate(_dicom(d / "t.dcm"), 0.6)
        return refused(p, lambda: _load(p), "unreadable DICOM")

    @add("DICOM header cut at 100 bytes", "refused")
    def _(d: Path) -> str:
        p = d / "h.dcm"
        p.write_bytes(_dicom(d / "whole.dcm").read_bytes()[:100])
        return refused(p, lambda: _load(p), "unreadable")

    @add("zero-byte DICOM", "refused")
    def _(d: Path) -> str:
        p = d / "z.dcm"
        p.write_bytes(b"")
        return refused(p, lambda: _load(p), "empty")

    @add("PNG renamed .dcm", "refused")
    def _(d: Path) -> str:
        p = d / "r.dcm"
        p.write_bytes(_save(d / "r.png", _picture()).read_bytes())
        return refused(p, lambda: _load(p), "not a DICOM file")

    @add("DICOM without pixel data", "refused")
    def _(d: Path) -> str:
        p = _dicom(d / "nopix.dcm", pixels=False)
        return refused(p, lambda: _load(p), "no pixel data")

    @add("truncated NIfTI (.nii.gz)", "refused")
    def _(d: Path) -> str:
        p = _truncate(_nifti(d / "t.nii.gz", np.random.default_rng(0).random((64, 64)).astype(np.float32)))
        return refused(p, lambda: _load(p), "NIfTI")

    @add("zero-byte NIfTI", "refused")
    def _(d: Path) -> str:
        p = d / "z.nii.gz"
        p.write_bytes(b"")
        return refused(p, lambda: _load(p), "empty")

    @add("text renamed .nii.gz", "refused")
    def _(d: Path) -> str:
        p = d / "notes.nii.gz"
        p.write_bytes(gzip.compress(b"not a nifti header"))
        return refused(p, lambda: _load(p), "unreadable NIfTI")

    for bad in ("NaN", "inf"):
        @add(f"NIfTI with {bad}", "refused")
        def _(d: Path, bad=bad) -> str:
            arr = np.random.default_rng(0).random((32, 40)).astype(np.float32)
            arr[3, 4] = float(bad.lower())
            p = _nifti(d / f"{bad}.nii.gz", arr)
            return refused(p, lambda: _load(p), "NaN or infinite")

    @add("16-bit PNG", "handled")
    def _(d: Path) -> str:
        arr = (_picture().astype(np.uint16) * 257)
        p = _save(d / "b16.png", arr)
        assert np.allclose(_load(p), arr / 65535.0, atol=1e-6)
        return "scaled by 65535"

    @add("RGBA PNG", "handled")
    def _(d: Path) -> str:
        g = _picture()
        rgba = np.stack([g, g, g, np.full_like(g, 128)], -1)
        p = _save(d / "rgba.png", rgba)
        assert np.allclose(_load(p), g / 255.0, atol=1e-5)
        return "alpha dropped, grey kept"

    @add("palette PNG", "handled")
    def _(d: Path) -> str:
        from PIL import Image

        g = _picture()
        p = _save(d / "pal.png", Image.fromarray(g).convert("P"))
        assert np.allclose(_load(p), g / 255.0, atol=1e-5)
        return "palette applied"

    @add("grey+alpha PNG", "handled")
    def _(d: Path) -> str:
        from PIL import Image

        g = _picture()
        p = _save(d / "la.png", Image.fromarray(g).convert("LA"))
        assert np.allclose(_load(p), g / 255.0, atol=1e-5)
        return "alpha dropped"

    @add("non-square 48x200", "handled")
    def _(d: Path) -> str:
        p = _save(d / "wide.png", _picture(48, 200))
        assert _load(p).shape == (48, 200)
        return "shape kept (masks come back in it)"

    @add("tiny 8x8 px", "handled")
    def _(d: Path) -> str:
        p = _save(d / "tiny.png", _picture(8, 8))
        assert _load(p).shape == (8, 8)
        return "loads; resized by the pre-processing"

    @add("1-pixel-high image", "refused")
    def _(d: Path) -> str:
        p = _save(d / "line.png", _picture(1, 64))
        return refused(p, lambda: _load(p), "expected a 2-D image")

    @add("huge 8192x8192 px", "handled")
    def _(d: Path) -> str:
        p = _save(d / "huge.png", np.tile(_picture(64, 64), (128, 128)))
        t = time.perf_counter()
        img = _load(p)
        assert img.shape == (8192, 8192) and img.dtype == np.float32
        return f"loads in {time.perf_counter() - t:.1f} s"

    return cases


def _mask_cases() -> list[Case]:
    def size_mismatch(d: Path) -> str:
        import torch

        from bundle.transforms import LoadMaskd, LoadRadiographd

        img = _save(d / "img.png", _picture(64, 64))
        mask = _save(d / "mask.png", (_picture(32, 48) > 127).astype(np.uint8) * 255)
        data = LoadRadiographd("image")({"image": str(img), "label": str(mask)})
        msg = refused(mask, lambda: LoadMaskd("label")(data), "another aspect ratio")
        assert isinstance(data["image"], torch.Tensor) and str(img) in msg
        return msg

    def half_size(d: Path) -> str:
        from bundle.transforms import LoadMaskd, LoadRadiographd

        img = _save(d / "img.png", _picture(64, 64))
        mask = _save(d / "mask.png", (_picture(32, 32) > 127).astype(np.uint8) * 255)
        out = LoadMaskd("label")(LoadRadiographd("image")({"image": str(img), "label": str(mask)}))
        assert tuple(out["image"].shape[-2:]) == (32, 32) and tuple(out["label"].shape[-2:]) == (32, 32)
        return "image resampled to the mask's 32 x 32 grid (same aspect ratio, as JSRT 2048 with SCR 1024)"

    def gif_mask(d: Path) -> str:
        from bundle.data.io import load_mask

        m = (_picture() > 127).astype(np.uint8) * 255
        p = _save(d / "m.gif", m)
        assert np.array_equal(load_mask(p), (m > 0).astype(np.uint8))
        return "0/255 GIF binarised"

    def empty_required(d: Path) -> str:
        from bundle.data.io import load_mask

        p = _save(d / "empty.png", np.zeros((16, 16), np.uint8))
        return refused(p, lambda: load_mask(p, required_nonempty=True), "mask is empty")

    return [Case("mask of another aspect ratio than its image", "mask", "refused", size_mismatch),
            Case("mask at half its image's size (same aspect ratio)", "mask", "handled", half_size),
            Case("binary GIF mask (0/255)", "mask", "handled", gif_mask),
            Case("empty mask where one is required", "mask", "refused", empty_required)]


# ---- CSVs (the CheXpert reader; the plain-folder cases.csv) ---------------------------------------------------------
def _chexpert_csv(d: Path, name: str = "train.csv", rows: int = 4, encoding: str = "utf-8", newline: str = "\n",
                  drop: str | None = None, extra: bool = False, bad_label: str | None = None) -> Path:
    from bundle.constants import OBSERVATIONS

    cols = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
    lines = [cols + (["Comment"] if extra else [])]
    for i in range(rows):
        labels = ["1.0" if k == i % 14 else ("" if k % 3 else "0.0") for k in range(14)]
        if bad_label is not None and i == 1:
            labels[3] = bad_label
        lines.append([f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_frontal.jpg", "Female", "60",
                      "Frontal", "PA", *labels] + (["note, quoted"] if extra else []))
    if drop:
        k = cols.index(drop)
        lines = [ln[:k] + ln[k + 1:] for ln in lines]
    text = newline.join(",".join(f'"{c}"' if "," in c else c for c in ln) for ln in lines) + newline
    p = d / name
    p.write_bytes(text.encode(encoding))
    return p


def _csv_cases() -> list[Case]:
    from bundle.data.chexpert import read_chexpert_csv

    def plain(d: Path) -> Any:
        (d / "ref").mkdir(exist_ok=True)
        return read_chexpert_csv(_chexpert_csv(d / "ref"))[0]

    def same_as_plain(p: Path, d: Path) -> str:
        df = read_chexpert_csv(p)[0]
        ref = plain(d)
        assert list(df.columns) == list(ref.columns) and df.equals(ref)
        return f"{len(df)} rows, identical to the plain file"

    def bom(d: Path) -> str:
        return same_as_plain(_chexpert_csv(d, encoding="utf-8-sig"), d)

    def crlf(d: Path) -> str:
        return same_as_plain(_chexpert_csv(d, newline="\r\n"), d)

    def bom_crlf(d: Path) -> str:
        return same_as_plain(_chexpert_csv(d, encoding="utf-8-sig", newline="\r\n"), d)

    def extra(d: Path) -> str:
        return same_as_plain(_chexpert_csv(d, extra=True), d)

    def missing(d: Path) -> str:
        p = _chexpert_csv(d, drop="Edema")
        return refused(p, lambda: read_chexpert_csv(p), "missing column")

    def bad_label_raise(d: Path) -> str:
        p = _chexpert_csv(d, bad_label="yes")
        return refused(p, lambda: read_chexpert_csv(p), "row 2")

    def bad_label_skip(d: Path) -> str:
        p = _chexpert_csv(d, bad_label="2.0")
        df, summary = read_chexpert_csv(p, on_error="skip")
        assert len(df) == 3 and summary["skipped_invalid"] == 1
        return "on_error=skip: the row dropped and counted"

    def empty_csv(d: Path) -> str:
        p = d / "train.csv"
        p.write_bytes(b"")
        return refused(p, lambda: read_chexpert_csv(p), "empty")

    def latin1(d: Path) -> str:
        p = _chexpert_csv(d)
        p.write_bytes(p.read_bytes().replace(b"Female", "Fémale".encode("latin-1")))
        df = None
        try:
            df = read_chexpert_csv(p)[0]
        except BundleInputError as e:
            assert str(e).startswith(str(p))
            return "refused: " + str(e)[len(str(p)) + 2:][:70]
        return f"{len(df)} rows"

    def cases_csv_bom_crlf(d: Path) -> str:
        from bundle.data.segsets import read_cases_csv

        p = d / "cases.csv"
        p.write_bytes("id,patientid,view\r\nc1,p1,PA\r\nc2,p2,AP\r\n".encode("utf-8-sig"))
        df = read_cases_csv(p)
        assert list(df["id"]) == ["c1", "c2"] and list(df["patientid"]) == ["p1", "p2"]
        return "BOM and CRLF read"

    def cases_csv_missing(d: Path) -> str:
        from bundle.data.segsets import read_cases_csv

        p = d / "cases.csv"
        p.write_text("name,patient\nc1,p1\n")
        return refused(p, lambda: read_cases_csv(p), "id")

    return [Case("CheXpert CSV with a UTF-8 BOM", "csv", "handled", bom),
            Case("CheXpert CSV with CRLF line ends", "csv", "handled", crlf),
            Case("CheXpert CSV with BOM and CRLF", "csv", "handled", bom_crlf),
            Case("CheXpert CSV with an extra column", "csv", "handled", extra),
            Case("CheXpert CSV missing a column", "csv", "refused", missing),
            Case("CheXpert CSV with a bad label value (raise)", "csv", "refused", bad_label_raise),
            Case("CheXpert CSV with a bad label value (skip)", "csv", "handled", bad_label_skip),
            Case("zero-byte CheXpert CSV", "csv", "refused", empty_csv),
            Case("CheXpert CSV in Latin-1", "csv", "handled or refused", latin1),
            Case("cases.csv with BOM and CRLF", "csv", "handled", cases_csv_bom_crlf),
            Case("cases.csv missing the id column", "csv", "refused", cases_csv_missing)]


def all_cases() -> list[Case]:
    return _image_cases() + _mask_cases() + _csv_cases()


def run_corpus(folder: Path) -> list[dict[str, str]]:
    """Run every case in its own sub-folder of ``folder``; one row per case: name, group, expected, result
    (``handled`` / ``refused (file named)`` / ``FAILED: ...``), detail."""
    rows = []
    for i, case in enumerate(all_cases()):
        d = folder / f"case{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        try:
            detail = case.run(d)
            ok = True
        except Exception as e:  # noqa: BLE001 - a wrong behaviour is reported in the table, not hidden
            detail, ok = f"{type(e).__name__}: {e}"[:120], False
        result = ("refused (file named)" if detail.startswith("refused") or case.expect == "refused" else "handled") \
            if ok else "FAILED"
        rows.append({"case": case.name, "group": case.group, "expected": case.expect, "result": result,
                     "detail": detail.replace("|", "/").replace("\n", " ")})
    return rows

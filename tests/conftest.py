"""Shared pytest fixtures: the shared data folder, the real lungs folder, and small image writers.

Keep this file generic: fixtures that build one dataset layout belong to the test module that uses them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist (`-n auto`, pyproject.toml) the cores are shared out between the workers, as the pipeline runner
# does between concurrent runs: each worker and the bundle commands it starts get cores // workers threads (set
# before torch is imported, so that OpenMP never starts more threads than there are cores).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    from scripts.processes import env_with_threads, threads_for

    os.environ.update(env_with_threads(threads_for(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def _find_shared_dir() -> Path | None:
    """``$CXR_DOLL_SHARED``, ``<repo>/../shared`` or ``/work/shared``, whichever exists first."""
    candidates = [os.environ.get("CXR_DOLL_SHARED"), REPO_ROOT.parent / "shared", "/work/shared"]
    for cand in candidates:
        if cand and Path(cand).is_dir():
            return Path(cand).resolve()
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder (``../shared`` beside the repository); skips the test when absent."""
    found = _find_shared_dir()
    if found is None:
        pytest.skip("needs ../shared (absent)")
    return found


@pytest.fixture(scope="session")
def real_lungs_dir() -> Path:
    """``../shared/data/real-cxr-lungs`` (34 real radiographs with lung masks); skips the test when absent."""
    found = _find_shared_dir()
    path = None if found is None else found / "data" / "real-cxr-lungs"
    if path is None or not (path / "cases.csv").is_file():
        pytest.skip("needs ../shared/data/real-cxr-lungs (absent)")
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for the test, restored after: tiny networks run much faster without thread
    contention on a shared 2-core machine (``pytestmark = pytest.mark.usefixtures("one_thread")`` for a module)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator (same numbers in every test)."""
    return np.random.default_rng(1234)


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """``write_image(path, array, format=None)``: write a uint8/uint16 ``(H, W)`` (or RGB) array with PIL
    (format from the suffix: PNG, JPEG, GIF, ...), creating folders; returns the path."""
    from PIL import Image

    def _write(path: str | os.PathLike, array: np.ndarray, format: str | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(np.asarray(array))
        if path.suffix.lower() == ".gif" and im.mode != "P":
            im = im.convert("L").convert("P")
        kwargs = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
        im.save(path, format=format, **kwargs)
        return path

    return _write


def _write_dicom(path: Path, stored: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2",
                 slope: float | None = None, intercept: float | None = None) -> Path:
    """A minimal DX DICOM file (pydicom 3 API); ``stored`` (uint8/uint16/int16) is written as the pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(stored.dtype, np.signedinteger) else 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def write_dicom() -> Callable[..., Path]:
    """``write_dicom(path, stored, bits_stored, photometric="MONOCHROME2", slope=None, intercept=None)``: a minimal
    uncompressed DX DICOM file (explicit VR little endian); returns the path."""
    return _write_dicom

"""The phantom generator's writer (see :mod:`bundle.data.phantom`): draws the planned images in worker processes
and writes every file atomically, resumable, byte-identical for any number of workers."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ...utils import (BundleInputError, PathLike, as_bool, atomic_write_bytes, atomic_write_json, atomic_write_text,
                       load_json)
from ..io import encode_bitmask
from .drawing import _ANATOMY, draw_frontal, draw_lateral, phantom_rng, sample_anatomy
from .layouts import (_FORMAT_VERSION, _OWNED_DIRS, CHEXPERT_DIR, MANIFEST, _check_rate, _csv_text, _plan_chexpert,
                      _plan_qata, _plan_scr, _resolve_prevalence, _Task)

logger = logging.getLogger(__name__)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    """Encode a 2-D array as JPEG (quality 95, 8-bit grayscale), PNG (uint8 or uint16) or GIF (binary 0/255)."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    elif fmt == "png":
        Image.fromarray(arr).save(buf, format="PNG")
    elif fmt == "gif":
        Image.fromarray((arr > 0).astype(np.uint8) * 255).save(buf, format="GIF")
    else:
        raise ValueError(fmt)
    return buf.getvalue()


def _is_valid_image(path: Path, size: int) -> bool:
    """Whether ``path`` exists and decodes completely to a ``size`` x ``size`` single-channel image."""
    from PIL import Image

    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path) as im:
            if im.size != (size, size):
                return False
            im.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _draw_task(task: _Task, seed: int, size: int) -> dict[str, bytes]:
    """Draw one task's image and masks and encode them: ``{relative path: file bytes}``."""
    anatomy = sample_anatomy(phantom_rng(seed, task.dataset, task.patient, purpose=_ANATOMY))
    rng = phantom_rng(seed, task.dataset, *task.index)
    if task.kind == "lateral":
        return {task.outputs[0]: _encode(_to_uint8(draw_lateral(rng, size, anatomy)), "jpeg")}
    ph = draw_frontal(rng, size, task.findings, anatomy, infection=task.kind == "qata")
    image = _to_uint8(ph.image)
    if task.kind == "frontal":
        return {task.outputs[0]: _encode(image, "jpeg"), task.outputs[1]: _encode(encode_bitmask(ph.lesions), "png")}
    if task.kind == "scr":
        files = {task.outputs[0]: _encode(image, "png")}
        for k, rel in enumerate(task.outputs[1:]):
            files[rel] = _encode(ph.anatomy[k], "gif")
        return files
    if task.kind == "qata":
        return {task.outputs[0]: _encode(image, "png"),
                task.outputs[1]: _encode(ph.infection.astype(np.uint8) * 255, "png")}
    raise ValueError(f"unknown task kind {task.kind!r}")


def _run_task(args: tuple[str, int, int, bool, _Task]) -> tuple[str, bool]:
    """Worker: skip the task when all its files are valid (unless ``force``), else draw and write them atomically.

    Returns ``(kind, written)``.
    """
    root, seed, size, force, task = args
    base = Path(root)
    if not force and all(_is_valid_image(base / rel, size) for rel in task.outputs):
        return task.kind, False
    for rel, data in _draw_task(task, seed, size).items():
        atomic_write_bytes(base / rel, data)
    return task.kind, True


def _tune_malloc() -> None:
    """Keep freed image-sized buffers in the heap (glibc ``mallopt``): the drawing allocates many 256 KB
    temporaries, and with the defaults each one is a fresh ``mmap`` whose page faults cost ~25% extra CPU time."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024 * 1024)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 16 * 1024 * 1024)  # M_TOP_PAD
    except (OSError, AttributeError):  # not glibc
        pass


def _init_worker() -> None:
    """Pool initializer: one thread per worker process (the pool provides the parallelism), malloc tuning."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    _tune_malloc()


def _remove_stray_temporaries(root: Path) -> int:
    """Delete the temporary files an interrupted atomic write may leave (``.<name>.<random>.part<suffix>``)."""
    removed = 0
    for name in _OWNED_DIRS:
        top = root / name
        if not top.is_dir():
            continue
        for dirpath, _, filenames in os.walk(top):
            for fn in filenames:
                if fn.startswith(".") and ".part" in fn:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(dirpath, fn))
                        removed += 1
    return removed


def _prepare_output(root: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Check (and with ``overwrite`` clear) the output folder against ``manifest``; then write the manifest."""
    path = root / MANIFEST
    owned = [root / name for name in _OWNED_DIRS]
    if path.exists():
        previous = load_json(path)
        if previous != manifest and not overwrite:
            changed = sorted(k for k in set(previous.get("params", {})) | set(manifest["params"])
                             if previous.get("params", {}).get(k) != manifest["params"].get(k))
            raise BundleInputError(path, f"the phantom datasets here were generated with other parameters "
                                         f"({', '.join(changed) or 'format'}); pass overwrite=True to regenerate "
                                         f"them or choose another output folder")
        if overwrite:
            for d in owned:
                if d.exists():
                    shutil.rmtree(d)
    else:
        foreign = [d for d in owned if d.is_dir() and any(d.iterdir())]
        if foreign:
            raise BundleInputError(foreign[0], f"exists but was not written by the phantom generator (no {MANIFEST} "
                                               f"in {root}); refusing to write phantoms into it")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)


def generate_phantom_datasets(
    output_dir: PathLike,
    seed: int = 0,
    image_size: int = 256,
    chexpert_train_patients: int = 600,
    chexpert_valid_patients: int = 100,
    max_studies_per_patient: int = 3,
    lateral_rate: float = 0.3,
    prevalence: Mapping[str, float] | None = None,
    uncertain_rate: float = 0.1,
    blank_rate: float = 0.5,
    false_uncertain_rate: float = 0.02,
    scr_cases: int = 60,
    qata_train: int = 60,
    qata_test: int = 30,
    num_workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    start_method: str | None = None,
) -> dict[str, Any]:
    """Write the phantom CheXpert, JSRT/SCR and QaTa-COV19 datasets under ``output_dir`` (resumable, seeded).

    Args:
        output_dir: root folder of the three layouts (see the module docstring and ``docs/DEVELOPMENT.md``).
        seed: global seed; the same seed and parameters give byte-identical files, whatever ``num_workers``.
        image_size: height = width of every image (pixels).
        chexpert_train_patients: CheXpert training patients (1 to ``max_studies_per_patient`` studies each,
            about 1.5 on average: the defaults give ~900 frontal training images).
        chexpert_valid_patients: CheXpert validation patients (one study each, numbered after the training ones).
        max_studies_per_patient: most studies of one training patient.
        lateral_rate: probability that a study also has a lateral view.
        prevalence: probability of each true finding (observation name -> rate); missing names take
            :data:`DEFAULT_PREVALENCE`.
        uncertain_rate: fraction of true findings labelled ``-1.0`` (uncertain) in ``train.csv``.
        blank_rate: fraction of absent findings left empty (not mentioned) in ``train.csv``.
        false_uncertain_rate: fraction of absent findings labelled ``-1.0`` in ``train.csv``.
        scr_cases: JSRT/SCR cases (~62% ``JPCLN*`` with a nodule, the rest ``JPCNN*``).
        qata_train: QaTa-COV19 ``Train Set`` images.
        qata_test: QaTa-COV19 ``Test Set`` images.
        num_workers: worker processes (0 or 1: in this process).
        overwrite: delete the generator's folders and regenerate everything (otherwise a re-run skips the images
            already written and finishes the job).
        progress: show a progress bar.
        start_method: multiprocessing start method (default ``fork`` where available, else ``spawn``). The
            workers run one thread each and tune glibc's ``malloc`` (as does this process when
            ``num_workers <= 1``): the drawing allocates many image-sized temporaries.

    Returns:
        a summary: counts per dataset, images written and skipped, seconds and images per second.

    Raises:
        BundleInputError: ``output_dir`` holds phantoms generated with other parameters (without ``overwrite``),
            or dataset folders not written by the generator.
    """
    t0 = time.perf_counter()
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    size = int(image_size)
    if size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    for name, value in (("chexpert_train_patients", chexpert_train_patients),
                        ("chexpert_valid_patients", chexpert_valid_patients), ("scr_cases", scr_cases),
                        ("qata_train", qata_train), ("qata_test", qata_test)):
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if int(max_studies_per_patient) < 1:
        raise ValueError(f"max_studies_per_patient must be >= 1, got {max_studies_per_patient}")
    overwrite = as_bool(overwrite, "overwrite")
    progress = as_bool(progress, "progress")
    prev = _resolve_prevalence(prevalence)
    params = {
        "seed": seed, "image_size": size, "chexpert_train_patients": int(chexpert_train_patients),
        "chexpert_valid_patients": int(chexpert_valid_patients),
        "max_studies_per_patient": int(max_studies_per_patient),
        "lateral_rate": _check_rate("lateral_rate", lateral_rate), "prevalence": prev,
        "uncertain_rate": _check_rate("uncertain_rate", uncertain_rate),
        "blank_rate": _check_rate("blank_rate", blank_rate),
        "false_uncertain_rate": _check_rate("false_uncertain_rate", false_uncertain_rate),
        "scr_cases": int(scr_cases), "qata_train": int(qata_train), "qata_test": int(qata_test),
    }
    manifest = {"generator": "bundle.data.phantom.generate_phantom_datasets", "format_version": _FORMAT_VERSION,
                "params": params}
    root = Path(os.path.abspath(os.path.expanduser(str(output_dir))))
    _prepare_output(root, manifest, bool(overwrite))
    strays = _remove_stray_temporaries(root)

    # plan (cheap, in this process): CSV rows and the images to draw
    common = dict(seed=seed, max_studies=params["max_studies_per_patient"], lateral_rate=params["lateral_rate"],
                  prevalence=prev, uncertain_rate=params["uncertain_rate"], blank_rate=params["blank_rate"],
                  false_uncertain_rate=params["false_uncertain_rate"])
    train_rows, train_tasks, train_counts = _plan_chexpert(
        split="train", n_patients=params["chexpert_train_patients"], first_patient=1, **common)
    valid_rows, valid_tasks, valid_counts = _plan_chexpert(
        split="valid", n_patients=params["chexpert_valid_patients"],
        first_patient=params["chexpert_train_patients"] + 1, **common)
    scr_tasks, scr_counts = _plan_scr(seed, params["scr_cases"])
    qata_tasks = (_plan_qata(seed, "Train Set", params["qata_train"], 1)
                  + _plan_qata(seed, "Test Set", params["qata_test"], params["qata_train"] + 1))
    tasks = train_tasks + valid_tasks + scr_tasks + qata_tasks

    # draw and write (files first, CSVs last)
    jobs = [(str(root), seed, size, bool(overwrite), task) for task in tasks]
    written = skipped = 0
    bar = _progress(len(jobs), progress)
    try:
        if int(num_workers) <= 1 or len(jobs) < 2:
            _tune_malloc()
            results: Iterable[tuple[str, bool]] = map(_run_task, jobs)
            for _, was_written in results:
                written += was_written
                skipped += not was_written
                bar.update(1)
        else:
            import multiprocessing as mp

            method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            ctx = mp.get_context(method)
            with ctx.Pool(int(num_workers), initializer=_init_worker) as pool:
                for _, was_written in pool.imap_unordered(_run_task, jobs, chunksize=8):
                    written += was_written
                    skipped += not was_written
                    bar.update(1)
    finally:
        bar.close()
    atomic_write_text(root / CHEXPERT_DIR / "train.csv", _csv_text(train_rows))
    atomic_write_text(root / CHEXPERT_DIR / "valid.csv", _csv_text(valid_rows))

    seconds = time.perf_counter() - t0
    summary = {
        "output_dir": str(root),
        "image_size": size,
        "chexpert": {
            "train_csv": str(root / CHEXPERT_DIR / "train.csv"), "valid_csv": str(root / CHEXPERT_DIR / "valid.csv"),
            "train_rows": len(train_rows), "valid_rows": len(valid_rows),
            **{f"train_{k}": v for k, v in train_counts.items()}, **{f"valid_{k}": v for k, v in valid_counts.items()},
        },
        "scr": scr_counts,
        "qata": {"train": params["qata_train"], "test": params["qata_test"]},
        "images": len(jobs), "images_written": written, "images_skipped": skipped,
        "stray_temporaries_removed": strays,
        "seconds": round(seconds, 3),
        "images_per_second": round(written / seconds, 2) if seconds > 0 else None,
    }
    logger.info("phantom datasets in %s: %d images (%d written, %d skipped) in %.1f s", root, len(jobs), written,
                skipped, seconds)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """One-paragraph text of a :func:`generate_phantom_datasets` summary (for logs and the config's ``run``)."""
    c = summary["chexpert"]
    return (f"phantom datasets in {summary['output_dir']} ({summary['image_size']} px): CheXpert train "
            f"{c['train_frontal']} frontal + {c['train_lateral']} lateral from {c['train_patients']} patients, valid "
            f"{c['valid_frontal']} frontal + {c['valid_lateral']} lateral; SCR {summary['scr']['cases']} cases; QaTa "
            f"{summary['qata']['train']} train + {summary['qata']['test']} test. {summary['images']} images: "
            f"{summary['images_written']} written, {summary['images_skipped']} already there; "
            f"{summary['seconds']:.1f} s")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a requirement
        return _NoBar()
    return tqdm(total=total, desc="phantom images", unit="img", mininterval=1.0, dynamic_ncols=True)


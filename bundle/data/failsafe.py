"""Batch jobs that skip bad inputs and report them: ``on_error: raise|skip`` for inference and DoLL generation.

:class:`SkipFailuresDataset` is an iterable dataset that applies the pre-processing to each item; with
``on_error="skip"`` an item whose loading or pre-processing raises is left out of the batch stream, logged, and
recorded in a :class:`FailureLog` with the reason (the innermost exception's message, which for bad files starts with
the file name: :class:`~bundle.utils.BundleInputError`). Every other item is processed as usual. With
``on_error="raise"`` it behaves like MONAI's ``Dataset`` (the first failure ends the run).

A :class:`FailureLog` keeps one small JSON record per failed input in a folder (written atomically, so data-loader
worker processes and distributed ranks can all record), and writes the list as ``failures.csv`` (columns ``input``,
``stage``, ``reason``). A single-image call (MONAI Label applies ``preprocessing`` itself) never goes through here and
still raises.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..utils import PathLike, atomic_write_json, atomic_write_text, load_json

logger = logging.getLogger(__name__)

ON_ERROR: tuple[str, ...] = ("raise", "skip")
FAILURE_COLUMNS: tuple[str, ...] = ("input", "stage", "reason")


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def failure_reason(exc: BaseException) -> str:
    """The message of the innermost cause of ``exc`` (MONAI wraps transform errors in ``RuntimeError``s whose
    message is the transform's name; the cause holds the file and the problem)."""
    inner = exc
    seen = set()
    while inner.__cause__ is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.__cause__
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}"


class FailureLog:
    """Failed inputs of one stage, one JSON record each under ``folder`` (safe across processes).

    Args:
        folder: where the records go (e.g. ``<output_dir>/.failures``).
        stage: written into each row (``inference``, ``doll``).
        reset: remove earlier records first (a fresh inference run); DoLL keeps them across resumed runs and
            reports only the inputs that still have no output.
    """

    def __init__(self, folder: PathLike, stage: str, reset: bool = False):
        self.folder = Path(folder)
        self.stage = stage
        if reset and self.folder.is_dir():
            shutil.rmtree(self.folder, ignore_errors=True)

    def _record(self, input_path: str) -> Path:
        return self.folder / (hashlib.sha1(input_path.encode("utf-8")).hexdigest()[:20] + ".json")

    def record(self, input_path: str, reason: str) -> None:
        logger.error("%s: skipped (%s)", input_path, reason)
        atomic_write_json(self._record(str(input_path)), {"input": str(input_path), "stage": self.stage,
                                                          "reason": reason})

    def forget(self, input_path: str) -> None:
        """Drop the record of an input that has now been processed."""
        try:
            os.remove(self._record(str(input_path)))
        except FileNotFoundError:
            pass

    def rows(self) -> list[dict[str, str]]:
        if not self.folder.is_dir():
            return []
        out = []
        for p in sorted(self.folder.glob("*.json")):
            if ".part" in p.name:
                continue
            try:
                out.append(load_json(p))
            except ValueError:
                continue
        return sorted(out, key=lambda r: r["input"])

    def write_csv(self, path: PathLike, rows: Sequence[Mapping[str, str]] | None = None) -> int:
        """Write ``failures.csv`` (header only when nothing failed, so a stale list never survives); returns the
        number of rows."""
        rows = self.rows() if rows is None else rows
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(FAILURE_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in FAILURE_COLUMNS})
        atomic_write_text(path, buf.getvalue())
        return len(rows)


class SkipFailuresDataset(torch.utils.data.IterableDataset):
    """Apply ``transform`` to each item of ``data``; with ``on_error="skip"`` leave out (and record) the items that
    fail. Items are shared out between data-loader workers by index; there is no ``len`` (the number of good items
    is known only at the end), so an ignite engine runs it to exhaustion.

    Args:
        data: the items (dicts with ``key``).
        transform: the pre-processing (a MONAI ``Compose``).
        on_error: ``"skip"`` or ``"raise"``.
        failure_log: where skipped items are recorded (required for ``"skip"``).
        key: the item's key naming its input file (for the record).
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], transform: Callable[[Any], Any], on_error: str = "skip",
                 failure_log: FailureLog | None = None, key: str = "image"):
        self.data = list(data)
        self.transform = transform
        self.on_error = check_on_error(on_error)
        if self.on_error == "skip" and failure_log is None:
            raise ValueError("on_error='skip' needs a failure_log")
        self.failure_log = failure_log
        self.key = key

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        items = self.data if info is None else self.data[info.id::info.num_workers]
        for item in items:
            if self.on_error == "raise":
                yield self.transform(dict(item))
                continue
            try:
                out = self.transform(dict(item))
            except Exception as e:  # noqa: BLE001 - any per-input failure is recorded with its reason and skipped
                assert self.failure_log is not None
                self.failure_log.record(str(item.get(self.key, item)), failure_reason(e))
                continue
            yield out

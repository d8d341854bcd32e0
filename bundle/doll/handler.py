"""Writing DoLL during an evaluator pass: resumable, atomic, sharded across ranks, with a merged datalist.

Layout under ``doll_dir`` for an image ``<image_root>/<rel>.<ext>``:

- ``<rel>.png``: the DoLL, a uint16 bit-mask PNG (bit ``k`` = observation ``k``; :func:`bundle.data.io.load_bitmask`);
- ``<rel>.soft.npz``: soft maps (optional, float16);
- ``<rel>.json``: the record (image, targets, probabilities, completeness deltas), written LAST: an image is
  finished when its record exists and parses. A re-run skips finished images (:func:`pending_items`), every file
  is written atomically, and the datalist is rebuilt from the records (:func:`merge_datalist`), so a kill at any
  moment loses at most the images in flight and a sharded run gives the same datalist as a single process.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..data.io import encode_bitmask, save_png
from ..utils import atomic_save, atomic_write_json, remove_stale_temp_files

logger = logging.getLogger(__name__)


def relative_stem(image_path: str, image_root: str) -> str:
    """``image_path`` relative to ``image_root``, without its extension (the key of an image's DoLL files)."""
    rel = os.path.relpath(os.path.abspath(image_path), os.path.abspath(image_root))
    if rel.startswith(".."):
        raise ValueError(f"{image_path}: not under the image root {image_root}")
    return os.path.splitext(rel)[0]


def record_path(doll_dir: str, image_path: str, image_root: str) -> str:
    return os.path.join(doll_dir, relative_stem(image_path, image_root) + ".json")


def is_finished(doll_dir: str, image_path: str, image_root: str) -> bool:
    """True when the image's record and mask exist and the record parses."""
    rec = record_path(doll_dir, image_path, image_root)
    try:
        with open(rec) as f:
            data = json.load(f)
        return os.path.exists(data["label"])
    except (OSError, ValueError, KeyError):
        return False


def shard(items: Sequence[Any], rank: int | None = None, world_size: int | None = None) -> list[Any]:
    """This rank's share of ``items`` (``items[rank::world_size]``; rank/world from torch.distributed or 0/1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    return list(items)[rank::world_size]


def pending_items(items: Sequence[dict], doll_dir: str, image_root: str, shard_by_rank: bool = True) -> list[dict]:
    """The items of this rank that have no finished DoLL yet (what a resumed run still has to do)."""
    todo = [it for it in items if not is_finished(doll_dir, it["image"], image_root)]
    mine = shard(todo) if shard_by_rank else todo
    for it in mine:  # temporary files of a writer killed on this image (only this run writes them now)
        stem = os.path.join(doll_dir, relative_stem(it["image"], image_root))
        for suffix in (".json", ".png", ".soft.npz"):
            remove_stale_temp_files(stem + suffix)
    logger.info(f"DoLL: {len(items) - len(todo)} of {len(items)} images already done; {len(mine)} to do here")
    return mine


def merge_datalist(items: Sequence[dict], doll_dir: str, image_root: str, path: str | None = None,
                   keep_keys: Sequence[str] = ("patient", "lesion")) -> list[dict]:
    """Build the DoLL datalist from the records of ``items`` (in ``items`` order) and write it atomically to
    ``path`` (``{"training": [...]}``-style lists are the caller's choice: here a flat list)."""
    out = []
    for it in items:
        rec = record_path(doll_dir, it["image"], image_root)
        try:
            with open(rec) as f:
                data = json.load(f)
        except (OSError, ValueError):
            raise RuntimeError(f"{rec}: DoLL record missing or corrupt; re-run the DoLL stage to finish it") from None
        entry = {"image": it["image"], "label": data["label"], "targets": data["targets"]}
        if data.get("soft"):
            entry["soft"] = data["soft"]
        entry.update({k: it[k] for k in keep_keys if k in it})
        out.append(entry)
    if path is not None:
        atomic_write_json(path, out)
    return out


class DoLLWriter:
    """Ignite handler for an evaluator whose post-processing gives each item's DoLL keys
    (:class:`~bundle.doll.inferer.DoLLPredd` after the batched :class:`~bundle.doll.inferer.DoLLInferer`, or the
    per-image :class:`~bundle.doll.generator.IGToDoLLd`): after
    each iteration it writes every image's DoLL, soft maps (optional) and record (see the module docstring).

    Args:
        doll_dir: output folder.
        image_root: the folder the image paths are taken relative to.
        image_path_key: key of the source image path in each output item (copied there by the pre-processing).
        save_soft: also write the soft maps (float16 ``.npz``).
        observation_names: for the records.
    """

    def __init__(self, doll_dir: str, image_root: str, image_path_key: str = "image_path", save_soft: bool = False,
                 observation_names: Sequence[str] | None = None):
        self.doll_dir = doll_dir
        self.image_root = image_root
        self.image_path_key = image_path_key
        self.save_soft = save_soft
        self.names = list(observation_names) if observation_names else None
        self.count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def write_item(self, item: dict) -> None:
        src = item[self.image_path_key]
        stem = os.path.join(self.doll_dir, relative_stem(src, self.image_root))
        doll = torch.as_tensor(item["doll"]).cpu().numpy().astype(np.uint8)
        mask_path = stem + ".png"
        save_png(mask_path, encode_bitmask(doll))
        soft_path = None
        if self.save_soft and "doll_soft" in item:
            soft = torch.as_tensor(item["doll_soft"]).cpu().numpy().astype(np.float16)
            soft_path = stem + ".soft.npz"
            atomic_save(soft_path, lambda tmp: np.savez_compressed(open(tmp, "wb"), soft=soft))
        targets = [int(t) for t in item.get("doll_targets", [])]
        probs = torch.as_tensor(item.get("doll_probs", torch.zeros(0))).cpu().tolist()
        delta = torch.as_tensor(item.get("doll_delta", torch.zeros(0))).cpu().tolist()
        record = {"image": src, "label": mask_path, "soft": soft_path, "targets": targets,
                  "target_names": [self.names[t] for t in targets] if self.names else None,
                  "probs": probs, "ig_delta": delta, "shape": list(doll.shape)}
        atomic_write_json(stem + ".json", record)  # last: marks the image as finished
        self.count += 1

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        batch = engine.state.batch
        batch = batch if isinstance(batch, list) else [batch]
        for item, src in zip(items, batch):
            if self.image_path_key not in item:  # the evaluator's output keeps image/label/pred: path is in the batch
                item = {**item, self.image_path_key: src[self.image_path_key]}
            self.write_item(item)


def collect_items(datalist_path: str, splits: Sequence[str]) -> list[dict]:
    """The items of ``splits`` of a classification datalist, with their split name in ``"split"``."""
    from ..utils import load_json

    data = load_json(datalist_path)
    out = []
    for split in splits:
        if split not in data:
            raise KeyError(f"{datalist_path}: no split {split!r} (has {sorted(data)})")
        out += [{**it, "split": split} for it in data[split]]
    return out


def finalize_generation(items: Sequence[dict], doll_dir: str, image_root: str, datalist_path: str,
                        failure_log: Any = None) -> dict:
    """After every rank has written its share: wait for all ranks, then rank 0 writes the DoLL datalist
    ``{split: [...]}`` (same order as ``items``, hence identical for any number of ranks). Returns a summary.

    With a ``failure_log`` (:class:`~bundle.data.failsafe.FailureLog`, ``on_error: skip``), the images recorded
    there that still have no DoLL are left out of the datalist and listed in ``<doll_dir>/failures.csv``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if dist.get_rank() != 0:
            return {}
    failed: list[dict] = []
    if failure_log is not None:
        failed = [r for r in failure_log.rows() if not is_finished(doll_dir, r["input"], image_root)]
        failure_log.write_csv(os.path.join(doll_dir, "failures.csv"), failed)
        if failed:
            logger.error(f"DoLL: {len(failed)} image(s) failed and are left out of the datalist: "
                         f"{os.path.join(doll_dir, 'failures.csv')}")
        bad = {r["input"] for r in failed}
        items = [it for it in items if it["image"] not in bad]
    by_split: dict[str, list[dict]] = {}
    for it in items:
        by_split.setdefault(it.get("split", "training"), []).append(it)
    out = {split: merge_datalist(its, doll_dir, image_root) for split, its in by_split.items()}
    atomic_write_json(datalist_path, out)
    n = sum(len(v) for v in out.values())
    n_targets = sum(len(e["targets"]) for v in out.values() for e in v)
    summary = {"n_images": n, "targets_per_image": n_targets / max(n, 1), "datalist": datalist_path,
               "n_failed": len(failed)}
    logger.info(f"DoLL datalist {datalist_path}: {n} images, {summary['targets_per_image']:.2f} targets per image")
    return summary

#!/usr/bin/env python
"""Training throughput of the bundle's fine-tuning trainer against a bare PyTorch loop, in one process.

The bundle side is ``configs/train.yaml``'s ``train#trainer`` (MONAI ``SupervisedTrainer``) with its CacheDataset,
random augmentations, sampler and DataLoader, built through :class:`monai.bundle.ConfigParser` from the configs (only
the handlers are left out: validation, checkpoints and MLflow are not training throughput). The bare side is a plain
loop over the same network architecture (a copy of the same initial weights), the same loss object's class and
arguments, the same optimizer class and hyper-parameters (AdamW, an Adam variant), the same batch size, the same
forward precision (the trainer's inferer: bfloat16 autocast where the CPU has it) and the same images, held in
memory as tensors (the cached, deterministic part of the pipeline; batches drawn at random, no augmentation). The
two run interleaved step by step (after every trainer iteration, one bare step), for ``rounds`` epochs of
``epoch_length`` steps after a warm-up epoch, with the same torch threads; a trainer epoch's time is its wall time
minus the bare steps run inside it. Interleaving single steps makes the comparison robust to a machine shared with
other jobs (both sides see the same load).

    python scripts/bench_train.py                       # synthetic SCR-layout data, 128 x 128, batch 8 (~1-2 min)
    python scripts/bench_train.py --datalist_dir data/datalists --task scr    # a real datalist folder instead

Prints images/s of both and the ratio bundle / bare (target >= 0.85).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_synthetic_scr(folder: Path, n_images: int, size: int = 256, seed: int = 0) -> Path:
    """A small JSRT/SCR-layout dataset of smooth random images with elliptic structure masks, and its datalist
    (``scr.json``: all but two images in ``training``). Returns the datalist folder."""
    import numpy as np
    from PIL import Image

    from bundle.constants import SCR_STRUCTURES
    from bundle.data.datalists import write_datalist

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    items = []
    for i in range(n_images):
        case = f"SYN{i:04d}"
        img = rng.normal(0.5, 0.1, (size, size)).cumsum(0).cumsum(1)
        img = (255 * (img - img.min()) / (np.ptp(img) + 1e-6)).astype(np.uint8)
        image_path = folder / "JSRT" / "images" / f"{case}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(image_path)
        labels = []
        for k, structure in enumerate(SCR_STRUCTURES):
            cx, cy = 0.3 + 0.4 * (k % 2) + rng.uniform(-0.03, 0.03), 0.3 + 0.1 * k + rng.uniform(-0.03, 0.03)
            mask = ((xx - cx) / 0.15) ** 2 + ((yy - cy) / 0.2) ** 2 < 1
            mask_path = folder / "SCR" / "masks" / structure / f"{case}.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
            labels.append(str(mask_path))
        items.append({"image": str(image_path), "label": labels, "patient": case})
    datalist_dir = folder / "datalists"
    write_datalist(datalist_dir / "scr.json", {"training": items[2:], "validation": items[:2], "test": items[:2]})
    return datalist_dir


def build(datalist_dir: str, work: str, args: argparse.Namespace) -> dict[str, Any]:
    """The configured trainer, network, loss and optimizer of ``configs/train.yaml`` (handlers removed)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    parser.update({
        "datalist_dir": datalist_dir, "models_dir": os.path.join(work, "models"),
        "output_root": os.path.join(work, "eval"), "task": args.task, "init": "scratch", "seed": 0,
        "image_size": [args.image_size, args.image_size], "batch_size": args.batch_size,
        "epoch_length": args.epoch_length, "num_iterations": args.epoch_length * (args.rounds + 1),
        "seg_arch": args.arch, "show_progress": False, "train#handlers": [],
        "device": "$torch.device('cpu')",
    })
    if args.no_augment:
        parser.update({"augmentations": []})
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            parser[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parser[key.strip()] = value
    parser.parse(True)
    return {name: parser.get_parsed_content(name) for name in
            ("train#trainer", "train#dataset", "network", "loss", "optimizer")}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="scr")
    ap.add_argument("--arch", default="segresnet")
    ap.add_argument("--datalist_dir", default=None, help="a folder with <task>.json (default: synthetic data)")
    ap.add_argument("--n_images", type=int, default=34, help="synthetic images (32 training)")
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--epoch_length", type=int, default=12, help="steps per round on each side")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no_augment", action="store_true", help="leave the random augmentations out of the pipeline")
    ap.add_argument("--set", action="append", default=[], metavar="ID=VALUE",
                    help="extra config override (JSON value or text), e.g. train#dataloader#_target_=ThreadDataLoader")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import torch
    from ignite.engine import Events

    from monai.utils import set_determinism

    if args.threads:
        torch.set_num_threads(args.threads)
    set_determinism(0)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work:
        datalist_dir = args.datalist_dir or str(write_synthetic_scr(Path(work), args.n_images))
        t0 = time.perf_counter()
        parts = build(datalist_dir, work, args)
        trainer, dataset, net, loss_fn, opt = (parts[k] for k in
                                               ("train#trainer", "train#dataset", "network", "loss", "optimizer"))
        setup_s = time.perf_counter() - t0

        # bare loop: a copy of the same initial network, same loss class/arguments and optimizer hyper-parameters,
        # the cached (deterministic) images and labels as tensors in memory
        bare_net = copy.deepcopy(net)
        bare_loss = copy.deepcopy(loss_fn)
        hyper = {k: opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad") if k in opt.defaults}
        bare_opt = type(opt)(bare_net.parameters(), **hyper)
        cached = [dataset._cache[i] for i in range(len(dataset))]
        images = torch.stack([torch.as_tensor(c["image"]).float() for c in cached])
        labels = torch.stack([torch.as_tensor(c["label"]).float() for c in cached])
        gen = torch.Generator().manual_seed(0)
        bs = args.batch_size

        def bare_steps(n: int) -> float:
            bare_net.train()
            start = time.perf_counter()
            for _ in range(n):
                idx = torch.randint(len(images), (bs,), generator=gen)
                x, y = images[idx], labels[idx]
                bare_opt.zero_grad(set_to_none=True)
                loss = bare_loss(trainer.inferer(x, bare_net), y)  # the trainer's precision (bf16 on CPU)
                loss.backward()
                bare_opt.step()
            return time.perf_counter() - start

        # interleaved step by step: after every trainer iteration one bare step runs (inside the trainer's epoch, in
        # an ITERATION_COMPLETED handler); the trainer's time of an epoch is its wall time minus those bare steps, so
        # it includes everything the trainer does (batch loading and augmentation, collation, the step, the engine)
        bundle_times: list[float] = []
        bare_times: list[float] = []
        state: dict[str, float] = {}

        def epoch_started(engine: Any) -> None:
            state["t"], state["bare"] = time.perf_counter(), 0.0

        def iteration_completed(engine: Any) -> None:
            state["bare"] += bare_steps(1)

        def epoch_completed(engine: Any) -> None:
            bare_times.append(state["bare"])
            bundle_times.append(time.perf_counter() - state["t"] - state["bare"])
            print(f"round {engine.state.epoch - 1}{' (warm-up)' if engine.state.epoch == 1 else ''}: "
                  f"bundle {bundle_times[-1]:.2f} s, bare {bare_times[-1]:.2f} s for {engine.state.epoch_length} "
                  f"steps of {bs}", flush=True)

        trainer.add_event_handler(Events.EPOCH_STARTED, epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_completed)
        trainer.run()

    steps = args.epoch_length * bs
    b = [steps / t for t in bundle_times[1:]]
    p = [steps / t for t in bare_times[1:]]
    total = args.rounds * steps
    result = {"bundle_images_per_s": total / sum(bundle_times[1:]), "bare_images_per_s": total / sum(bare_times[1:]),
              "ratio": sum(bare_times[1:]) / sum(bundle_times[1:]),
              "ratio_per_round_median": statistics.median([x / y for x, y in zip(b, p)]),
              "threads": torch.get_num_threads(), "image_size": args.image_size, "batch_size": bs,
              "augment": not args.no_augment, "setup_s": round(setup_s, 1), "n_train": len(images),
              "overrides": list(args.set)}
    print(f"\n{args.arch} {args.task} {args.image_size}x{args.image_size}, batch {bs}, {torch.get_num_threads()} "
          f"threads, augmentations {'on' if not args.no_augment else 'off'}, {len(images)} training images")
    if args.set:
        print(f"overrides: {' '.join(args.set)}")
    print(f"bundle trainer : {result['bundle_images_per_s']:.1f} images/s ({len(b)} rounds after a warm-up round)")
    print(f"bare PyTorch   : {result['bare_images_per_s']:.1f} images/s")
    print(f"ratio          : {result['ratio']:.3f} (target >= 0.85)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Resolution study: test Dice (and training time) of the fine-tuning recipe against the network's image size.

Runs the low-data sweep (:func:`scripts.sweep.run_sweep`, the same train + evaluate workflows as the pipeline) once
per image size, each in its own output folder, and writes one table of mean and worst-seed test Dice per task,
structure, init and size, with the mean wall time of a run:

    python scripts/resolution_study.py                               # scr + real_lungs, scratch + doll, 128 and 256
    python scripts/resolution_study.py --sizes 128,256,512 --tasks real_lungs --inits scratch --seeds 0,1,2
    python scripts/resolution_study.py --device cuda --sizes 256,512   # the GPU preset's check

Evaluation is always at the label's original size (``configs/evaluate.yaml`` resizes the prediction back), so the
sizes are compared on the same pixels. A size above the data's own resolution only interpolates: the built-in
phantoms and ``real-cxr-lungs`` are 256 px, JSRT is 2048 px (its SCR masks 1024 px). The DoLL init is the network
pre-trained by ``configs/pretrain.yaml`` (any input size: the network is fully convolutional).

Outputs: ``<output_root>/resolution/<size>/...`` (each size's sweep, resumable) and ``--table`` (CSV; a Markdown
copy beside it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.processes import say  # noqa: E402


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def resolution_table(frames: dict[int, object], seconds: dict[int, float]) -> object:
    """Mean and worst-seed test Dice per ``task, structure, init, image_size`` from each size's sweep frame."""
    import pandas as pd

    from bundle.reporting.analysis import seed_table

    rows = []
    for size, frame in frames.items():
        if frame.empty:
            continue
        table = seed_table(frame)
        table.insert(0, "image_size", size)
        table["seconds_per_run"] = seconds.get(size, float("nan"))
        rows.append(table)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256", help="image sizes (square), comma-separated")
    parser.add_argument("--tasks", default="scr,real_lungs")
    parser.add_argument("--inits", default="scratch,doll")
    parser.add_argument("--train_sizes", default="all")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--output_root", default=str(ROOT / "eval"))
    parser.add_argument("--models_dir", default=str(ROOT / "models"))
    parser.add_argument("--data_root", default=str(ROOT / "data"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--table", default=None, help="CSV of the results (default <output_root>/resolution.csv)")
    args = parser.parse_args(argv)

    from scripts.sweep import SweepGrid, collect, run_sweep
    from bundle.utils import atomic_write_text

    pretrained = os.path.join(args.models_dir, "pretrain", "segresnet_doll", "model.pt")
    frames, seconds = {}, {}
    for size in (int(s) for s in _csv(args.sizes)):
        out = os.path.join(args.output_root, "resolution", str(size))
        start = time.time()
        grid = SweepGrid(tasks=_csv(args.tasks), inits=_csv(args.inits), sizes=_csv(args.train_sizes),
                         seeds=_csv(args.seeds), jobs=args.jobs,
                         overrides={"image_size": [size, size], "init_checkpoints#doll": pretrained})
        paths = {"data_root": args.data_root, "output_root": out,
                 "models_dir": os.path.join(args.models_dir, "resolution", str(size))}
        result = run_sweep(grid, paths, device=args.device, keep_going=True)
        done = [r for r in result.runs if r.status == "done"]
        seconds[size] = sum(r.seconds for r in done) / len(done) if done else float("nan")
        frames[size] = collect(result.runs, out)
        say(f"[resolution] {size} px: {len(done)} runs in {time.time() - start:.0f} s")
    table = resolution_table(frames, seconds)
    path = args.table or os.path.join(args.output_root, "resolution.csv")
    atomic_write_text(path, table.to_csv(index=False))
    atomic_write_text(os.path.splitext(path)[0] + ".md", table.to_markdown(index=False, floatfmt=".4f")
                      if hasattr(table, "to_markdown") and _has_tabulate() else table.to_string(index=False))
    say(table.to_string(index=False))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())

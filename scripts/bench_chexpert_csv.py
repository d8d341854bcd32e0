#!/usr/bin/env python
"""Time the CheXpert adapter on a synthetic CSV the size of the real ``train.csv`` (223,414 rows, 32,387 lateral).

Usage: ``.venv/bin/python scripts/bench_chexpert_csv.py [--rows N] [--repeat K] [--policy ones|zeros|ignore]``

The CSV is written to a temporary folder (removed afterwards) with the 19 CheXpert columns, label values
``1.0``/``0.0``/``-1.0``/empty at roughly the real rates, and ``patientNNNNN/studyN/viewN_*.jpg`` paths. Reported:
reading + validation (:func:`read_chexpert_csv`), the whole adapter (:func:`chexpert_items`: validation, uncertainty
policy, frontal filter, patient ids, item dictionaries) and the patient split, best of ``--repeat`` runs, in seconds
and rows per second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without the .pth file too

from bundle.constants import OBSERVATIONS  # noqa: E402
from bundle.data.chexpert import chexpert_items, read_chexpert_csv  # noqa: E402
from bundle.data.splits import split_datalist  # noqa: E402

REAL_ROWS, REAL_LATERAL = 223_414, 32_387
#: Rough label rates of the real train.csv: empty, 1.0, 0.0, -1.0.
RATES = (0.72, 0.14, 0.09, 0.05)


def write_synthetic_csv(path: Path, rows: int = REAL_ROWS, lateral: int = REAL_LATERAL, seed: int = 0) -> Path:
    """Write a CheXpert-like ``train.csv`` (vectorised; a few seconds for the real size)."""
    rng = np.random.default_rng(seed)
    is_lateral = np.zeros(rows, bool)
    is_lateral[rng.choice(rows, min(lateral, rows), replace=False)] = True
    patient = np.sort(rng.integers(1, max(rows // 3, 2), size=rows))
    study = rng.integers(1, 6, size=rows)
    codes = rng.choice(4, size=(rows, len(OBSERVATIONS)), p=RATES)
    text = np.array(["", "1.0", "0.0", "-1.0"], dtype=object)[codes]
    view = np.where(is_lateral, "view2_lateral.jpg", "view1_frontal.jpg")
    paths = ("CheXpert-v1.0-small/train/patient" + pd.Series(patient).astype(str).str.zfill(5) + "/study"
             + pd.Series(study).astype(str) + "/" + pd.Series(view))
    df = pd.DataFrame({
        "Path": paths, "Sex": np.where(rng.random(rows) < 0.5, "Male", "Female"), "Age": rng.integers(18, 91, rows),
        "Frontal/Lateral": np.where(is_lateral, "Lateral", "Frontal"),
        "AP/PA": np.where(is_lateral, "", np.where(rng.random(rows) < 0.6, "AP", "PA")),
    })
    for j, name in enumerate(OBSERVATIONS):
        df[name] = text[:, j]
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=REAL_ROWS)
    parser.add_argument("--lateral", type=int, default=REAL_LATERAL)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--policy", default="ones", choices=["ones", "zeros", "ignore"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_chexpert_") as tmp:
        csv = Path(tmp) / "CheXpert-v1.0-small" / "train.csv"
        t0 = time.perf_counter()
        write_synthetic_csv(csv, args.rows, args.lateral)
        print(f"wrote {args.rows:,} rows ({csv.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.2f} s")

        t_read, (df, _) = best_of(lambda: read_chexpert_csv(csv), args.repeat)  # type: ignore[misc]
        t_items, (items, summary) = best_of(  # type: ignore[misc]
            lambda: chexpert_items(csv, policy=args.policy), args.repeat)
        t_split, split = best_of(
            lambda: split_datalist(items, {"training": 0.9, "validation": 0.1}, seed=0), args.repeat)

    assert len(df) == args.rows and summary["lateral_dropped"] == min(args.lateral, args.rows)
    rows = [
        ("read + validate", t_read, ""),
        (f"adapter (policy {args.policy}, frontal filter, items)", t_items,
         f"-> {len(items):,} items, {summary['patients']:,} patients"),
        ("patient split 0.9 / 0.1", t_split, f"-> {len(split['training']):,} / {len(split['validation']):,}"),
    ]
    for name, seconds, note in rows:
        print(f"{name:48s} {seconds:6.2f} s {args.rows / seconds:12,.0f} rows/s  {note}")

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Pre-training replicates: the DoLL and its controls pre-trained with several seeds, each fine-tuned with one grid,
compared with the pre-training replicate as the unit.

Every control comparison of the protocol fine-tunes from *one* pre-training per label kind, so its paired test over
test images holds the pre-training draw (network initialisation, augmentation, the shuffled control's permutation)
fixed. Here replicate ``s`` pre-trains each label kind with ``configs/pretrain.yaml --seed s`` into a folder of its
own, the sweep fine-tunes every init of the grid from it, and the table gives, per task and replicate, each init's
mean test Dice and the paired differences (Wilcoxon over the test images), then across the replicates the mean
difference, how many replicates favour the first init and a one-sample t-test of the replicates' differences.

    python scripts/pretrain_replicates.py                          # replicates 0,1,2; SCR and infection at 4 labels
    python scripts/pretrain_replicates.py --replicates 0,1,2,3,4 --inits doll,doll_shuffled,doll_oracle,scratch
    python scripts/pretrain_replicates.py --collect_only           # the table of the runs finished so far

Layout under ``--root`` (default ``<bundle>/eval/replicates``): ``rep<s>/models/pretrain/<arch>_<labels>/model.pt``
and ``rep<s>/eval`` per replicate; ``scratch/eval`` for the scratch runs, which no pre-training touches and which run
once. Writes ``<root>/replicates.csv`` and ``<root>/replicates.md`` (the table) and
``<root>/replicates_per_image.csv`` (every run's per-image test Dice with a ``replicate`` column: ``0``, ``1``, ...
or ``scratch``). Finished pre-trainings and runs are skipped, so an interrupted call resumes. Cost on the 2-core CPU (2026-12-06): 3.4-3.8 min per pre-training, 9.0-9.6 min per
replicate for 12 fine-tuning runs (SCR and infection at 4 labels, 2 inits x 3 seeds) two at a time.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bundle.reporting.analysis import replicate_table  # noqa: E402
from bundle.tasks import DEFAULT_SEG_ARCH  # noqa: E402
from scripts.processes import process_pool, say  # noqa: E402
from scripts.sweep import PretrainStep, SweepGrid, _as_list, collect, run_pretraining, run_sweep  # noqa: E402


def replicate_paths(root: str | Path, replicate: int | str, data_root: str | Path) -> dict[str, str]:
    """The shared folders of one replicate (``replicate="scratch"``: the scratch runs' folder)."""
    base = Path(root) / (f"rep{int(replicate)}" if replicate != "scratch" else "scratch")
    return {"data_root": str(data_root), "output_root": str(base / "eval"), "models_dir": str(base / "models")}


def pretrain_doll(replicate: int, paths: Mapping[str, str], arch: str, overrides: Mapping[str, Any]) -> None:
    """The DoLL pre-training of one replicate (``configs/pretrain.yaml --seed <replicate>``), unless its checkpoint
    exists. The controls' pre-trainings are made by the sweep itself (:func:`scripts.sweep.pretrain_steps`) with the
    replicate's seed."""
    ckpt = Path(paths["models_dir"]) / "pretrain" / f"{arch}_doll" / "model.pt"
    if ckpt.is_file():
        return
    args = {**paths, **overrides, "seed": replicate, "seg_arch": arch, "pretrain_labels": "doll",
            "show_progress": False}
    step = PretrainStep("doll", arch, ckpt, [{"name": f"pretrain_{arch}_doll", "configs": ["pretrain.yaml"],
                                              "args": args}])
    with process_pool(1) as pool:
        run_pretraining(pool, step, Path(paths["output_root"]) / "segmentation" / "logs")


def replicate_grid(grid: Mapping[str, Any], inits: Sequence[str], replicate: int,
                   overrides: Mapping[str, Any]) -> SweepGrid:
    """The fine-tuning grid of one replicate: ``grid`` (tasks, sizes, seeds, jobs, overrides) for the pre-trained
    ``inits``, whose missing control pre-trainings the sweep makes with ``--seed <replicate>``."""
    return SweepGrid.from_mapping({**grid, "inits": list(inits), "pretrain_overrides": {**overrides,
                                                                                          "seed": int(replicate)}})


def run_replicates(replicates: Any = (0, 1, 2), tasks: Any = ("scr", "infection"), sizes: Any = (4,),
                   seeds: Any = (0, 1, 2), inits: Any = ("doll", "doll_shuffled", "scratch"), root: str | None = None,
                   data_root: str | None = None, arch: str = DEFAULT_SEG_ARCH, jobs: int = 2,
                   set: Mapping[str, Any] | None = None,  # noqa: A002
                   collect_only: bool = False) -> Any:
    """Pre-train, fine-tune (both skipped where finished) and tabulate the replicates; returns the table.

    Args:
        replicates: pre-training seeds. tasks, sizes, seeds: the fine-tuning grid of every replicate.
        inits: the fine-tuning inits (``doll``, its controls ``doll_<labels>``, ``scratch``).
        root: the replicates' folder (default ``<bundle>/eval/replicates``). data_root: the data (default
            ``<bundle>/data``, a pipeline run's, with its DoLL datalist).
        arch: the segmenter. jobs: fine-tuning runs at once. set: bundle overrides of every pre-training and run.
        collect_only: train nothing, tabulate the finished runs.
    """
    import pandas as pd

    from bundle.utils import atomic_write_text

    root_path = Path(root or ROOT / "eval" / "replicates")
    data = str(data_root or ROOT / "data")
    inits = [str(i) for i in _as_list(inits)]
    overrides = dict(set or {})
    grid = {"tasks": _as_list(tasks), "sizes": _as_list(sizes), "seeds": _as_list(seeds), "jobs": int(jobs),
            "overrides": {**overrides, **({"seg_arch": arch} if arch != DEFAULT_SEG_ARCH else {})}}
    pretrained = [i for i in inits if i != "scratch"]
    frames: dict[int, Any] = {}
    for rep in [int(r) for r in _as_list(replicates)] if pretrained else []:
        paths = replicate_paths(root_path, rep, data)
        rep_grid = replicate_grid(grid, pretrained, rep, overrides)
        if not collect_only and "doll" in pretrained:
            pretrain_doll(rep, paths, arch, overrides)
        say(f"[replicates] rep{rep}: {len(rep_grid.runs())} fine-tuning runs under {paths['output_root']}")
        run_sweep(rep_grid, paths, collect_only=collect_only, log_mlflow=False)
        frames[rep] = collect(rep_grid.runs(), paths["output_root"])
    scratch = None
    if "scratch" in inits:
        paths = replicate_paths(root_path, "scratch", data)
        scratch_grid = SweepGrid.from_mapping({**grid, "inits": ["scratch"]})
        run_sweep(scratch_grid, paths, collect_only=collect_only, log_mlflow=False)
        scratch = collect(scratch_grid.runs(), paths["output_root"])
    table = replicate_table(frames, scratch)
    root_path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(root_path / "replicates.csv"), table.to_csv(index=False))
    runs = [f.assign(replicate=str(rep)) for rep, f in [*frames.items(), ("scratch", scratch)] if f is not None]
    if runs:  # every test image's Dice of every run, with its replicate, for re-analysis
        atomic_write_text(str(root_path / "replicates_per_image.csv"), pd.concat(runs, ignore_index=True)
                          .to_csv(index=False))
    with pd.option_context("display.width", 160, "display.max_rows", 500):
        text = table.to_string(index=False, float_format=lambda v: f"{v:.4f}")
    from bundle.reporting.publish import _markdown  # a pipe table as the report renders its tables

    atomic_write_text(str(root_path / "replicates.md"), "# Pre-training replicates\n\n" + _markdown(table) + "\n")
    print(text, flush=True)
    say(f"[replicates] {len(table)} rows -> {root_path / 'replicates.csv'}")
    return table


@functools.wraps(run_replicates)
def main(*args: Any, **kwargs: Any) -> None:
    """The command line of :func:`run_replicates` (the table is printed and written, not returned to ``fire``)."""
    run_replicates(*args, **kwargs)


if __name__ == "__main__":
    import fire

    fire.Fire(main)

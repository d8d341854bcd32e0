#!/usr/bin/env python
"""Cross-validation by patient for a small task: every image tested once, by a network that never saw its patient.

A fixed split of a small dataset tests few images (the real lungs of ``../shared/data/real-cxr-lungs``: 8 test
images of 34), so one unlucky draw of test patients moves the figure by more than the differences it is meant to
show. Here the task's datalist (all its sections pooled) is cut into ``--folds`` folds by patient
(:func:`bundle.data.splits.crossval_datalist`); fold ``k`` tests its own patients and trains on the others (a share
of them held out for validation: the checkpoint choice and the plateau rule), with the sweep's ordinary grid of
inits and seeds. The folds' test rows pool into one estimate over every image, and the inits are compared with the
images as the paired units (:func:`bundle.reporting.analysis.crossval_table`).

    python scripts/crossval.py                                  # the real lungs, 4 folds, DoLL and scratch, seeds 0-2
    python scripts/crossval.py --folds 5 --seeds 0,1,2,3,4 --set "{'seg_arch': 'unet'}"
    python scripts/crossval.py --collect_only                   # the tables of the runs finished so far
    python scripts/crossval.py --sizes "[4]" --pretrain_replicates "{1: 'eval/replicates/rep1/models', 2: ...}"
    python scripts/crossval.py --inits "[doll,doll_shuffled,scratch]"   # with the shuffled-DoLL control (its
                                                                        # pre-training in <models_dir>/pretrain)

Reads ``<data_root>/datalists/<task's datalist>`` (a pipeline run's data, default ``<bundle>/data``) and the DoLL
pre-training of ``<models_dir>`` (default ``<bundle>/models``), which every fold shares. Layout under ``--root``
(default ``<bundle>/eval/crossval/<task>``): ``fold<k>/datalist.json``, ``fold<k>/eval`` (the sweep's folder) and
``fold<k>/models`` (its checkpoints; ``pretrain`` links to ``<models_dir>/pretrain``). Writes
``crossval_per_image.csv`` (every run's per-image test Dice with its ``fold``), ``crossval.csv`` (per init: the mean
over all images, the worst seed, the lowest and highest fold), ``crossval_tests.csv`` (paired tests against
scratch), ``crossval_controls.csv`` (with a pre-training control in ``--inits``, e.g. ``doll_shuffled``: the DoLL
against each control and scratch), ``crossval_efficiency.csv`` (optimizer steps to 95% of each run's best validation
Dice) with its paired tests ``crossval_efficiency_tests.csv``, and ``crossval.md``; with ``--pretrain_replicates``,
the same folds for each further pre-training under ``rep<label>/`` and ``crossval_replicates.csv`` (the pre-training
as the unit). Finished runs are skipped, so an interrupted call resumes.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bundle.data.splits import crossval_datalist  # noqa: E402
from bundle.reporting.analysis import (  # noqa: E402
    CONTROL_INITS, controls_table, crossval_table, efficiency_pairs, efficiency_table)
from bundle.tasks import task_spec  # noqa: E402
from bundle.utils import BundleInputError, atomic_write_json, atomic_write_text  # noqa: E402
from scripts.processes import say  # noqa: E402
from scripts.sweep import SweepGrid, _as_list, collect, collect_curves, run_sweep  # noqa: E402

SECTIONS = ("training", "validation", "test")


def fold_paths(root: str | Path, fold: int, data_root: str | Path) -> dict[str, str]:
    """The shared folders of one fold's sweep."""
    base = Path(root) / f"fold{int(fold)}"
    return {"data_root": str(data_root), "output_root": str(base / "eval"), "models_dir": str(base / "models")}


def write_fold_datalists(source: str | Path, root: str | Path, folds: int, validation_fraction: float = 0.25,
                         split_seed: int = 0) -> list[Path]:
    """``<root>/fold<k>/datalist.json`` for every fold from the datalist ``source`` (its sections pooled; its other
    keys kept, with ``crossval`` describing the fold). Written atomically; returns the paths.

    Raises:
        BundleInputError: naming ``source`` when it is missing or has no items.
    """
    source = Path(source)
    if not source.is_file():
        raise BundleInputError(source, "datalist not found (run the pipeline's data stage first: "
                                       "bash scripts/main.sh --stages data, or pass --data_root)")
    spec = json.loads(source.read_text())
    items = [it for section in SECTIONS for it in spec.get(section, [])]
    if not items:
        raise BundleInputError(source, f"no items in its sections {list(SECTIONS)}")
    meta = {k: v for k, v in spec.items() if k not in SECTIONS and not k.startswith("num")}
    paths = []
    for k in range(int(folds)):
        parts = crossval_datalist(items, k, int(folds), validation_fraction, split_seed)
        out = {**meta, **parts, "numTraining": len(parts["training"]), "numValidation": len(parts["validation"]),
               "numTest": len(parts["test"]),
               "crossval": {"fold": k, "folds": int(folds), "validation_fraction": validation_fraction,
                            "split_seed": split_seed, "source": str(source)}}
        path = Path(root) / f"fold{k}" / "datalist.json"
        atomic_write_json(path, out)
        paths.append(path)
    return paths


def link_pretrainings(models_dir: str | Path, fold_models: str | Path) -> None:
    """Make ``<fold_models>/pretrain`` a link to ``<models_dir>/pretrain``: every fold fine-tunes from the same
    pre-trainings (and a pre-training the sweep has to make is made once, there)."""
    source = (Path(models_dir) / "pretrain").absolute()
    source.mkdir(parents=True, exist_ok=True)
    link = Path(fold_models) / "pretrain"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) == source:
        return
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise BundleInputError(link, f"exists and is not a link to {source}; remove it to share the pre-trainings")
    link.symlink_to(source, target_is_directory=True)


def crossval_efficiency(curves: Any) -> tuple[Any, Any]:
    """Training efficiency of the folds' validation curves, every fold and seed one run: per init
    (:func:`bundle.reporting.analysis.efficiency_table`), each init against scratch paired by fold and seed, and the
    DoLL init against each pre-training control of the grid (``doll_shuffled`` ...: is a faster start the DoLL's or
    any pre-training's?) (:func:`bundle.reporting.analysis.efficiency_pairs`); empty frames when no run has a curve."""
    import pandas as pd

    if curves.empty or "steps" not in curves.columns:
        return pd.DataFrame(), pd.DataFrame()
    runs = curves.assign(seed=curves["fold"].astype(str) + ":" + curves["seed"].astype(str))
    present = set(runs["init"].astype(str))
    pairs = [efficiency_pairs(runs)]
    if "doll" in present:
        pairs += [efficiency_pairs(runs[runs["init"].astype(str).isin(["doll", control])], reference=control)
                  for control in CONTROL_INITS if control != "scratch" and control in present]
    return (efficiency_table(runs).rename(columns={"n_seeds": "n_runs"}),
            pd.concat([p for p in pairs if len(p)] or [pairs[0]], ignore_index=True))


def crossval_controls(frame: Any) -> Any:
    """The DoLL init against each pre-training control of the grid (shuffled DoLL, Grad-CAM or single-classifier
    labels, true lesions) and scratch, the images as the paired units
    (:func:`bundle.reporting.analysis.controls_table`, Holm over the table); an empty frame when the grid has no
    control other than scratch (:func:`bundle.reporting.analysis.crossval_table` already tests against scratch)."""
    import pandas as pd

    present = set(frame["init"].astype(str)) if len(frame) else set()
    if "doll" not in present or not present & (set(CONTROL_INITS) - {"scratch"}):
        return pd.DataFrame()
    return controls_table(frame.assign(train_size=frame["train_size"].astype(str)))


def _run_folds(root_path: Path, data: Path, models: Path, task: str, folds: int, grid: Mapping[str, Any],
               validation_fraction: float, split_seed: int, collect_only: bool) -> tuple[Any, Any]:
    """Write the folds' datalists under ``root_path``, run (or collect) ``grid`` in every fold with the pre-trainings
    of ``models``; returns the folds' per-image frame and validation curves, each with its ``fold``."""
    import pandas as pd

    datalists = write_fold_datalists(data / "datalists" / task_spec(task).datalist, root_path, folds,
                                     float(validation_fraction), int(split_seed))
    frames, curves = [], []
    for k, datalist in enumerate(datalists):
        paths = fold_paths(root_path, k, data)
        link_pretrainings(models, paths["models_dir"])
        fold_grid = SweepGrid.from_mapping({**grid, "overrides": {**grid.get("overrides", {}),
                                                                  "datalist": str(datalist.absolute())}})
        say(f"[crossval] fold {k}: {len(fold_grid.runs())} runs under {paths['output_root']}")
        run_sweep(fold_grid, paths, collect_only=collect_only, log_mlflow=False)
        frames.append(collect(fold_grid.runs(), paths["output_root"]).assign(fold=k))
        curves.append(collect_curves(fold_grid.runs(), paths["output_root"]).assign(fold=k))
    return pd.concat(frames, ignore_index=True), pd.concat(curves, ignore_index=True)


def run_crossval(task: str = "real_lungs", folds: int = 4, inits: Any = ("doll", "scratch"), sizes: Any = ("all",),
                 seeds: Any = (0, 1, 2), root: str | None = None, data_root: str | None = None,
                 models_dir: str | None = None, jobs: int = 2, validation_fraction: float = 0.25,
                 split_seed: int = 0, set: Mapping[str, Any] | None = None,  # noqa: A002
                 pretrain_replicates: Mapping[Any, str] | None = None, collect_only: bool = False) -> Any:
    """Write the folds' datalists, fine-tune every fold's grid (finished runs skipped) and tabulate; returns
    ``(summary, tests)`` of :func:`bundle.reporting.analysis.crossval_table`.

    Args:
        task: the fine-tuning task (``configs/train.yaml --task``). folds: the number of folds.
        inits, sizes, seeds: the grid every fold runs. jobs: fine-tuning runs at once.
        root: the cross-validation's folder (default ``<bundle>/eval/crossval/<task>``).
        data_root: the data (default ``<bundle>/data``). models_dir: where the pre-trainings are (default
            ``<bundle>/models``).
        validation_fraction: the share of each fold's training patients' images held out for validation.
        split_seed: the seed of the folds and of the training/validation cut.
        set: bundle overrides of every run.
        pretrain_replicates: more pre-trainings of the pre-trained inits, ``{label: models_dir}`` (e.g. the
            ``rep<s>/models`` folders of ``scripts/pretrain_replicates.py``; label ``0`` is ``models_dir``'s own and
            may not be given). Each runs the same folds and grid for the pre-trained inits under
            ``<root>/rep<label>``, against the one set of scratch runs; ``crossval_replicates.csv`` then has
            :func:`bundle.reporting.analysis.replicate_table` with the pre-training as the unit.
        collect_only: train nothing, tabulate the finished runs.
    """
    import pandas as pd

    from bundle.reporting.analysis import replicate_table
    from bundle.reporting.publish import _markdown

    root_path = Path(root or ROOT / "eval" / "crossval" / task)
    data = Path(data_root or ROOT / "data")
    models = Path(models_dir or ROOT / "models")
    replicates = {str(k): v for k, v in dict(pretrain_replicates or {}).items()}
    if "0" in replicates:
        raise ValueError("pretrain_replicates: label 0 is models_dir's own pre-training; give the others")
    grid = {"tasks": [task], "inits": _as_list(inits), "sizes": _as_list(sizes), "seeds": _as_list(seeds),
            "jobs": int(jobs), "overrides": dict(set or {})}
    frame, curves = _run_folds(root_path, data, models, task, folds, grid, validation_fraction, split_seed,
                               collect_only)
    if replicates:
        pretrained = [i for i in grid["inits"] if i != "scratch"]
        by_rep = {"0": frame[frame["init"].isin(pretrained)]}
        for label, rep_models in replicates.items():
            by_rep[label], _ = _run_folds(root_path / f"rep{label}", data, Path(rep_models), task, folds,
                                          {**grid, "inits": pretrained}, validation_fraction, split_seed,
                                          collect_only)
        table = replicate_table(by_rep, frame[frame["init"] == "scratch"])
        atomic_write_text(str(root_path / "crossval_replicates.csv"), table.to_csv(index=False))
        atomic_write_text(str(root_path / "crossval_replicates_per_image.csv"), pd.concat(
            [f.assign(replicate=label) for label, f in by_rep.items()], ignore_index=True).to_csv(index=False))
    summary, tests = crossval_table(frame)
    controls = crossval_controls(frame)
    efficiency, pairs = crossval_efficiency(curves)
    atomic_write_text(str(root_path / "crossval_efficiency.csv"), efficiency.to_csv(index=False))
    atomic_write_text(str(root_path / "crossval_efficiency_tests.csv"), pairs.to_csv(index=False))
    atomic_write_text(str(root_path / "crossval_per_image.csv"), frame.to_csv(index=False))
    atomic_write_text(str(root_path / "crossval.csv"), summary.to_csv(index=False))
    atomic_write_text(str(root_path / "crossval_tests.csv"), tests.to_csv(index=False))
    if len(controls):
        atomic_write_text(str(root_path / "crossval_controls.csv"), controls.to_csv(index=False))
    else:  # the tables describe the grid of this call: no control table of an earlier grid is left beside them
        (root_path / "crossval_controls.csv").unlink(missing_ok=True)
    text = [f"# Cross-validation by patient: {task}, {folds} folds\n", _markdown(summary)]
    if not tests.empty:
        text += ["\nPaired tests (images as units, each image's Dice averaged over seeds):\n",
                 _markdown(tests.drop(columns=["wilcoxon_stat", "significant"], errors="ignore"))]
    if len(controls):
        text += ["\nThe DoLL against each pre-training control (images as units, each image's Dice averaged over "
                 "seeds; Holm over the table):\n", _markdown(controls.drop(
                     columns=["wilcoxon_stat", "significant", "conclusion", "unit", "confidence"], errors="ignore"))]
    if not efficiency.empty:
        text += ["\nTraining efficiency (each fold and seed is a run; steps of 8 images to 95% of the run's best "
                 "validation Dice):\n", _markdown(efficiency)]
    if not pairs.empty:
        text += ["\nPaired by fold and seed against scratch and the DoLL against each control (Wilcoxon signed-rank "
                 "over the runs):\n", _markdown(pairs)]
    if replicates:
        text += ["\nPre-training replicates (the pre-training as the unit; per replicate a Wilcoxon test over the "
                 "images, across replicates a one-sample t-test):\n", _markdown(table)]
    atomic_write_text(str(root_path / "crossval.md"), "\n".join(text) + "\n")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
    say(f"[crossval] {len(frame)} rows of {frame['image'].nunique() if len(frame) else 0} images -> "
        f"{root_path / 'crossval.csv'}")
    return summary, tests


@functools.wraps(run_crossval)
def main(*args: Any, **kwargs: Any) -> None:
    """The command line of :func:`run_crossval` (the tables are printed and written, not returned to ``fire``)."""
    run_crossval(*args, **kwargs)


if __name__ == "__main__":
    import fire

    fire.Fire(main)

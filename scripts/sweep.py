#!/usr/bin/env python
"""Low-data sweep of the fine-tuning stage: tasks x initialisations x training-set sizes x seeds (x modes).

Each run is two ordinary bundle workflows (so each can be repeated alone with these commands), executed one after
the other in one fresh process per run, forked from a server process that has imported MONAI once (so no run pays
the interpreter and import start-up; :func:`scripts.processes.process_pool`):

    python -m monai.bundle run --config_file "['configs/train.yaml']" \\
        --task scr --init doll --train_size 4 --seed 0 --mode full ...
    python -m monai.bundle run --config_file "['configs/train.yaml','configs/evaluate.yaml']" ...

A run whose per-image metrics CSV exists (``<output_root>/segmentation/<run_name>/metrics_<split>.csv``) is finished
and skipped; an interrupted run resumes from its ``last.pt``. At the end the per-run CSVs are concatenated into one
tidy CSV (``task, init, train_size, seed, mode, split, n_train, image, structure, dice, iou, hd95, pred_area,
ref_area``; default ``<output_root>/segmentation/sweep_<split>.csv``) and an MLflow run
(``<mlflow_experiment_prefix>_sweep``) records the grid, the mean Dice per cell and the CSV. Every training and
evaluation run is also in MLflow (``<prefix>_finetune``) with the tags ``task``, ``init``, ``train_size``, ``seed``,
``mode``.

    python scripts/sweep.py                                  # configs/sweep.yaml "default" grid
    python scripts/sweep.py --settings quick                 # the CPU check: 4 SCR images x 3 seeds, doll vs scratch
    python scripts/sweep.py --tasks scr --inits doll,scratch --sizes 2,4,all --seeds 0,1 --set num_iterations=100

``run_sweep(...)`` is the same as a function (used by ``scripts/run_pipeline.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bundle.workflows.segmentation import INIT_CHOICES, TASKS, parse_train_size, run_name  # noqa: E402
from scripts.processes import process_pool, run_workflows_in_child, say, threads_for  # noqa: E402

#: Columns of the sweep's tidy CSV, in order (the per-run CSVs of configs/evaluate.yaml have them all).
COLUMNS = ("task", "init", "train_size", "seed", "mode", "split", "n_train", "image", "structure", "dice", "iou",
           "hd95", "pred_area", "ref_area")
TRAIN_CONFIGS = ("train.yaml",)
EVAL_CONFIGS = ("train.yaml", "evaluate.yaml")


def _size_label(size: int | str | None) -> str:
    n = parse_train_size(size)
    return "all" if n is None else str(n)


@dataclass
class SweepRun:
    """One cell of the grid and what happened to it (``status``: ``pending``, ``skipped`` (finished before),
    ``done``, ``failed``)."""

    task: str
    init: str
    train_size: str
    seed: int
    mode: str = "full"
    #: bundle overrides of this run alone (an extra grid's ``overrides``, e.g. its own ``image_size``)
    overrides: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"
    seconds: float = 0.0
    error: str = ""

    @property
    def name(self) -> str:
        return run_name(self.task, self.init, self.train_size, self.seed, self.mode)

    def args(self) -> dict[str, Any]:
        """The bundle overrides that select this run."""
        return {"task": self.task, "init": self.init, "train_size": self.train_size, "seed": self.seed,
                "mode": self.mode}


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: the runs (with their status), the tidy CSV and its row count."""

    runs: list[SweepRun]
    csv_path: str
    num_rows: int
    mlflow_run_id: str | None = None
    summary: list[dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.runs if r.status == status)


def make_grid(tasks: Sequence[str], inits: Sequence[str], sizes: Sequence[int | str], seeds: Sequence[int],
              modes: Sequence[str] = ("full",)) -> list[SweepRun]:
    """The runs of the grid, in the order they run (task, init, size, seed, mode; sizes small to large).

    Raises:
        ValueError: unknown task, init or mode, or a bad size.
    """
    from bundle.networks.finetune import FINETUNE_MODES

    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for i in inits:
        if i not in INIT_CHOICES:
            raise ValueError(f"unknown init {i!r}; choose from {', '.join(INIT_CHOICES)}")
    for m in modes:
        if m not in FINETUNE_MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(FINETUNE_MODES)}")
    labels = [_size_label(s) for s in sizes]
    labels = sorted(dict.fromkeys(labels), key=lambda s: (s == "all", int(s) if s != "all" else 0))
    return [SweepRun(t, i, s, int(seed), m) for t in tasks for i in inits for s in labels for seed in seeds
            for m in modes]


def metrics_csv(output_root: str | os.PathLike, run: SweepRun, split: str = "test") -> Path:
    """The per-image CSV of a run (``configs/evaluate.yaml``'s ``metrics_csv``): its existence marks a finished run."""
    return Path(output_root) / "segmentation" / run.name / f"metrics_{split}.csv"


def collect(runs: Sequence[SweepRun], output_root: str | os.PathLike, split: str = "test") -> Any:
    """Concatenate the per-run CSVs of the finished ``runs`` into one tidy ``pandas.DataFrame`` (:data:`COLUMNS`
    first, then any other columns)."""
    import pandas as pd

    frames = []
    for run in runs:
        path = metrics_csv(output_root, run, split)
        if path.is_file():
            frame = pd.read_csv(path, dtype={"train_size": str})
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    frame = pd.concat(frames, ignore_index=True)
    extra = [c for c in frame.columns if c not in COLUMNS]
    return frame[[c for c in COLUMNS if c in frame.columns] + extra]


def collect_curves(runs: Sequence[SweepRun], output_root: str | os.PathLike) -> Any:
    """Concatenate the validation curves (``<output_root>/segmentation/<run>/val_curve.csv``, written during
    training by :class:`bundle.workflows.handlers.ValidationCurveWriter`) of ``runs`` into one ``DataFrame``."""
    import pandas as pd

    frames = [pd.read_csv(p, dtype={"train_size": str}) for p in
              (Path(output_root) / "segmentation" / run.name / "val_curve.csv" for run in runs) if p.is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summarise(frame: Any) -> Any:
    """Mean Dice per (task, init, train_size) and per seed: the per-image mean over structures, averaged over the
    images of each seed, then mean and standard deviation over seeds (``n_seeds`` says how many)."""
    import pandas as pd

    if frame.empty:
        return pd.DataFrame(columns=["task", "init", "train_size", "mode", "dice_mean", "dice_std", "n_seeds"])
    per_image = frame.groupby(["task", "init", "train_size", "mode", "seed", "image"], as_index=False)["dice"].mean()
    per_seed = per_image.groupby(["task", "init", "train_size", "mode", "seed"], as_index=False)["dice"].mean()
    out = per_seed.groupby(["task", "init", "train_size", "mode"], as_index=False)["dice"].agg(
        dice_mean="mean", dice_std="std", n_seeds="count")
    order = out["train_size"].map(lambda s: 10**9 if str(s) == "all" else int(s))
    return out.assign(_order=order).sort_values(["task", "_order", "init", "mode"]).drop(columns="_order")


def run_sweep(
    tasks: Sequence[str] = ("scr",),
    inits: Sequence[str] = ("doll", "scratch"),
    sizes: Sequence[int | str] = (2, 4, 8, 16, "all"),
    seeds: Sequence[int] = (0, 1, 2),
    modes: Sequence[str] = ("full",),
    overrides: Mapping[str, Any] | None = None,
    data_root: str | os.PathLike | None = None,
    output_root: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    device: str | None = None,
    split: str = "test",
    output_csv: str | os.PathLike | None = None,
    verbose: bool = False,
    keep_going: bool = False,
    log_mlflow: bool = True,
    jobs: int = 1,
    extra: Sequence[Mapping[str, Any]] = (),
) -> SweepResult:
    """Run (or resume) the low-data grid and write its tidy per-image CSV.

    Args:
        tasks, inits, sizes, seeds, modes: the grid (``configs/train.yaml`` ids ``task``, ``init``, ``train_size``,
            ``seed``, ``mode``).
        overrides: extra bundle overrides for every run (e.g. ``{"num_iterations": 100, "image_size": [64, 64]}``;
            ``tracking_uri`` and ``mlflow_experiment_prefix`` are honoured by the sweep's own MLflow run too).
        data_root, output_root, models_dir: the shared folders (default: ``data``, ``eval``, ``models`` under the
            bundle root, as in the configs).
        device: torch device of every run (default: the config's).
        split: the evaluated split.
        output_csv: the tidy CSV (default ``<output_root>/segmentation/sweep_<split>.csv``).
        verbose: stream the runs' output (default: ``<output_root>/segmentation/logs/<run>.log``).
        keep_going: record a failed run and continue (default: raise at the first failure).
        log_mlflow: log the sweep's summary run to MLflow.
        extra: further grids (mappings with ``tasks``, ``inits``, ``sizes``, ``seeds`` and optionally ``modes`` and
            ``overrides``, bundle overrides of that grid's runs on top of ``overrides``) whose runs join this sweep
            (same CSV, same MLflow run), e.g. a real-data check at its own image size.
        jobs: runs executed concurrently, the CPU threads shared out between them
            (:func:`~scripts.processes.thread_env`; each run is still one deterministic process: same seed, same
            jobs, same result).

    Returns:
        :class:`SweepResult` (each run's status: ``skipped`` when its CSV existed, else ``done`` or ``failed``).

    Raises:
        RuntimeError: a run failed (without ``keep_going``); the message has the command's log tail.
    """
    import pandas as pd

    from bundle.utils import atomic_write_text

    paths = {"data_root": str(data_root or ROOT / "data"), "output_root": str(output_root or ROOT / "eval"),
             "models_dir": str(models_dir or ROOT / "models")}
    runs = make_grid(tasks, inits, sizes, seeds, modes)
    for grid in extra:
        for run in make_grid(grid["tasks"], grid["inits"], grid["sizes"], grid["seeds"], grid.get("modes", modes)):
            run.overrides = dict(grid.get("overrides") or {})
            if run.name not in {r.name for r in runs}:
                runs.append(run)
    common: dict[str, Any] = {**paths, "show_progress": False, **dict(overrides or {})}
    if device:
        common["device"] = f"$torch.device('{device}')"
    log_dir = Path(paths["output_root"]) / "segmentation" / "logs"
    sizes_run = list(dict.fromkeys(r.train_size for r in runs))
    say(f"[sweep] {len(runs)} runs: tasks={list(tasks)} inits={list(inits)} sizes={sizes_run} seeds={list(seeds)} "
        f"modes={list(modes)}" + (f" + extra grids {[dict(g) for g in extra]}" if extra else ""))
    threads = threads_for(jobs)
    failures: list[str] = []

    def execute(k: int, run: SweepRun) -> None:
        if metrics_csv(paths["output_root"], run, split).is_file():
            run.status = "skipped"
            say(f"[sweep] {k}/{len(runs)} {run.name}: finished before, skipped")
            return
        if failures and not keep_going:
            return
        start = time.time()
        args = {**common, **run.overrides, **run.args()}
        steps = [{"name": "train", "configs": list(TRAIN_CONFIGS), "args": args},
                 {"name": "eval", "configs": list(EVAL_CONFIGS), "args": {**args, "eval_split": split}}]
        log_path = log_dir / f"{run.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        code = pool.submit(run_workflows_in_child, steps, None if verbose else str(log_path), threads).result()
        tail = "" if verbose else "".join(log_path.read_text(errors="replace").splitlines(True)[-30:])
        if code != 0:
            run.status, run.error = "failed", f"exit {code}"
            message = f"[sweep] {run.name}: failed (exit {code}); log {log_path}"
            failures.append(message + "\n" + tail)
            say(message + ("" if keep_going else "\n" + tail))
        else:
            run.status = "done"
        run.seconds = round(time.time() - start, 1)
        say(f"[sweep] {k}/{len(runs)} {run.name}: {run.status} in {run.seconds:.0f} s")

    from concurrent.futures import ThreadPoolExecutor

    # one thread per concurrent run submits it to the process pool and waits (the pool forks a fresh process each)
    with process_pool(jobs) as pool, ThreadPoolExecutor(max_workers=max(1, jobs)) as threads_pool:
        list(threads_pool.map(lambda kr: execute(*kr), enumerate(runs, 1)))
    if failures and not keep_going:
        raise RuntimeError(failures[0])

    frame = collect(runs, paths["output_root"], split)
    csv_path = str(output_csv or Path(paths["output_root"]) / "segmentation" / f"sweep_{split}.csv")
    atomic_write_text(csv_path, frame.to_csv(index=False))
    curves = collect_curves(runs, paths["output_root"])
    if not curves.empty:
        atomic_write_text(str(Path(csv_path).with_name("sweep_val_curves.csv")), curves.to_csv(index=False))
    table = summarise(frame)
    if not table.empty:
        with pd.option_context("display.width", 120, "display.max_rows", 200):
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
    result = SweepResult(runs=runs, csv_path=csv_path, num_rows=len(frame), summary=table.to_dict("records"))
    if log_mlflow and not frame.empty:
        result.mlflow_run_id = _log_sweep(result, paths["output_root"], dict(overrides or {}), split,
                                          {"tasks": list(tasks), "inits": list(inits), "sizes": [str(s) for s in sizes],
                                           "seeds": list(seeds), "modes": list(modes),
                                           "extra": [dict(g) for g in extra]})
    say(f"[sweep] {result.count('done')} run, {result.count('skipped')} skipped, {result.count('failed')} failed; "
        f"{len(frame)} rows in {csv_path}")
    return result


def _log_sweep(result: SweepResult, output_root: str, overrides: Mapping[str, Any], split: str,
               grid: Mapping[str, Any]) -> str:
    """One MLflow run for the sweep: the grid as params, mean Dice per cell as metrics, the CSV as artifact."""
    from monai.utils import path_to_sqlite_uri

    from bundle.workflows.tracking import log_run

    uri = str(overrides.get("tracking_uri") or path_to_sqlite_uri(os.path.join(output_root, "mlruns.db")))
    prefix = str(overrides.get("mlflow_experiment_prefix", "cxr_doll"))
    metrics = {f"dice_{r['task']}_{r['init']}_n{r['train_size']}" + ("" if r["mode"] == "full" else f"_{r['mode']}"):
               float(r["dice_mean"]) for r in result.summary}
    params = {**{k: json.dumps(v) for k, v in grid.items()}, "split": split,
              "overrides": json.dumps({k: v for k, v in overrides.items() if k != "tracking_uri"}, default=str),
              "runs": len(result.runs)}
    return log_run(uri, f"{prefix}_sweep", f"sweep_{split}", params=params, metrics=metrics,
                   artifacts=[result.csv_path], tags={"stage": "sweep", "split": split})


def _csv_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: Sequence[str] | None = None) -> SweepResult:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="default", help="grid of configs/sweep.yaml (default | quick)")
    parser.add_argument("--tasks", help="comma-separated tasks (e.g. scr,infection,real_lungs)")
    parser.add_argument("--inits", help="comma-separated inits (doll,scratch,classifier_encoder,external)")
    parser.add_argument("--sizes", help="comma-separated training-set sizes (e.g. 2,4,8,16,all)")
    parser.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2)")
    parser.add_argument("--modes", help="comma-separated fine-tuning modes (full,warmup,adapter)")
    parser.add_argument("--set", action="append", default=[], metavar="ID=VALUE",
                        help="bundle override for every run (JSON value or text), repeatable")
    parser.add_argument("--data_root")
    parser.add_argument("--output_root")
    parser.add_argument("--models_dir")
    parser.add_argument("--device", help="torch device (default: the config's)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output_csv")
    parser.add_argument("--keep_going", action="store_true", help="continue after a failed run")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at once, CPU threads shared out (default: the settings' `jobs`, else 1)")
    parser.add_argument("--verbose", action="store_true", help="stream the runs' output instead of logging it")
    parser.add_argument("--dry_run", action="store_true", help="list the runs and their status, run nothing")
    args = parser.parse_args(argv)
    settings = yaml.safe_load((ROOT / "configs" / "sweep.yaml").read_text())
    if args.settings not in settings:
        parser.error(f"unknown settings {args.settings!r}; configs/sweep.yaml has {', '.join(settings)}")
    grid = dict(settings[args.settings])
    for key in ("tasks", "inits", "sizes", "seeds", "modes"):
        value = getattr(args, key)
        if value:
            grid[key] = _csv_list(value)
    grid["seeds"] = [int(s) for s in grid.get("seeds", [0])]
    overrides = dict(grid.get("overrides") or {})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects ID=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_value(value)
    if args.dry_run:
        out = Path(args.output_root or ROOT / "eval")
        runs = make_grid(grid["tasks"], grid["inits"], grid["sizes"], grid["seeds"], grid.get("modes", ["full"]))
        for run in runs:
            done = metrics_csv(out, run, args.split).is_file()
            print(f"{run.name}: {'finished' if done else 'to run'}")
        return SweepResult(runs=runs, csv_path="", num_rows=0)
    return run_sweep(grid["tasks"], grid["inits"], grid["sizes"], grid["seeds"], grid.get("modes", ["full"]),
                     overrides=overrides, data_root=args.data_root, output_root=args.output_root,
                     models_dir=args.models_dir, device=args.device, split=args.split, output_csv=args.output_csv,
                     verbose=args.verbose, keep_going=args.keep_going,
                     jobs=int(args.jobs if args.jobs is not None else grid.get("jobs", 1)),
                     extra=[] if args.tasks else list(grid.get("extra") or []))


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result.count("failed") else 0)

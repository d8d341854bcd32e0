"""Publish a finished run's results as files to commit (``docs/results/<name>/``).

A run of the low-data protocol (``scripts/sweep.py --settings full``, then the analysis and report stages) leaves its
results under ``<output_root>`` (``report/``, ``segmentation/sweep_test.csv``) and its run times in MLflow. This
module copies what a reader of the repository needs into one folder:

* ``README.md``: provenance (date, commit, command), the runs per cell, and the measured compute: the wall time of
  every fine-tuning and pre-training run, read back from MLflow (:func:`run_times`), summed per task and architecture;
* ``report.md`` with its ``tables/`` and ``figures/`` (the report stage's output, unchanged);
* ``sweep_test.csv.gz``: the tidy per-image test Dice of every run, for re-analysis;
* ``run_times.csv``: one row per MLflow run of the published sweep (:func:`runs_of_sweep`) with its wall seconds.

The folder is written beside its destination and renamed into place, so an interrupted publish leaves the previous
results whole (:func:`publish_results`).
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..utils import BundleInputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RUN_TIME_STAGES", "run_times", "runs_of_sweep", "compute_summary", "runs_per_cell", "publish_results"]

#: the MLflow experiments (``<prefix>_<stage>``) whose runs are timed: the training runs of the protocol
RUN_TIME_STAGES = ("finetune", "pretrain")
_TAGS = ("task", "arch", "init", "train_size", "seed", "labels")


def run_times(tracking_uri: str, prefix: str, stages: Sequence[str] = RUN_TIME_STAGES) -> pd.DataFrame:
    """Wall seconds of every finished run of the experiments ``<prefix>_<stage>``, read back from MLflow.

    Returns:
        DataFrame (``stage`` is the run's own ``stage`` tag, e.g. ``finetune`` or ``evaluate`` in the fine-tuning
        experiment) ``stage, run_name, task, arch, init, train_size, seed, labels, seconds`` (tags a run does not have
        are empty), sorted by stage and run name; empty when the store has none of those experiments.
    """
    import pandas as pd

    from ..tracking import read_runs

    rows = []
    for stage in stages:
        for run in read_runs(tracking_uri, f"{prefix}_{stage}"):
            if run.info.status != "FINISHED" or not run.info.end_time:
                continue
            tags = dict(run.data.tags)
            if run.data.params.get("pretrain_labels"):  # the labels the run was given (older runs tagged every
                tags["labels"] = run.data.params["pretrain_labels"]  # pre-training control "doll")
            rows.append({"stage": tags.get("stage", stage), "run_name": run.info.run_name,
                         **{k: tags.get(k, "") for k in _TAGS},
                         "seconds": round((run.info.end_time - run.info.start_time) / 1000.0, 1)})
    columns = ["stage", "run_name", *_TAGS, "seconds"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(["stage", "run_name"], ignore_index=True) if len(frame) else frame


def runs_of_sweep(times: pd.DataFrame, sweep: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`run_times` that made ``sweep`` (the tidy per-image CSV): the fine-tuning and evaluation
    runs of its cells (task, architecture, init, training size, seed) and the pre-trainings its inits start from
    (``doll`` -> the DoLL pre-training, ``doll_<labels>`` -> that control's, per architecture). Runs of the same
    MLflow store that the published sweep does not hold (another grid, a probe, a run still going) are left out."""
    from ..doll.controls import init_pretrain_labels
    from ..tasks import DEFAULT_SEG_ARCH

    if times.empty:
        return times

    def arch_of(value: Any) -> str:
        return str(value) if isinstance(value, str) and value else DEFAULT_SEG_ARCH

    sweep_arch = sweep["arch"] if "arch" in sweep else [DEFAULT_SEG_ARCH] * len(sweep)
    cells = {(str(t), arch_of(a), str(i), str(n), str(s)) for t, a, i, n, s in
             zip(sweep["task"], sweep_arch, sweep["init"], sweep["train_size"], sweep["seed"])}
    pretrained = {(arch, labels) for _, arch, init, _, _ in cells if (labels := init_pretrain_labels(init))}
    keep = [((arch_of(r.arch), str(r.labels)) in pretrained) if r.stage == "pretrain" else
            ((str(r.task), arch_of(r.arch), str(r.init), str(r.train_size), str(r.seed)) in cells)
            for r in times.itertuples()]
    return times[keep].reset_index(drop=True)


def compute_summary(times: pd.DataFrame) -> pd.DataFrame:
    """Runs, median and total seconds per stage, task and architecture of :func:`run_times`' table."""
    import pandas as pd

    if times.empty:
        return pd.DataFrame(columns=["stage", "task", "arch", "runs", "median_s", "total_s"])
    grouped = times.fillna("").groupby(["stage", "task", "arch"], sort=True)["seconds"]
    out = grouped.agg(runs="count", median_s="median", total_s="sum").reset_index()
    out["median_s"] = out["median_s"].round(1)
    out["total_s"] = out["total_s"].round(0)
    return out


def runs_per_cell(sweep: pd.DataFrame) -> pd.DataFrame:
    """Seeds per task, architecture, init and training size of the sweep's tidy CSV (``arch`` may be absent in
    CSVs of older runs: then every run is SegResNet's)."""
    from ..tasks import DEFAULT_SEG_ARCH
    from .plots import sort_by_size

    frame = sweep.copy()
    if "arch" not in frame:
        frame["arch"] = DEFAULT_SEG_ARCH
    frame["train_size"] = frame["train_size"].astype(str)
    cells = frame.groupby(["task", "arch", "init", "train_size"])["seed"].agg(
        seeds="nunique", seed_list=lambda s: ",".join(str(v) for v in sorted(set(s)))).reset_index()
    return sort_by_size(cells, ["task", "arch", "train_size", "init"])


def _markdown(frame: pd.DataFrame, **formats: Callable[[Any], str]) -> str:
    """``frame`` as a pipe table, rendered as the report renders its tables."""
    from .report import Report, Table

    return "\n".join(Report._md_block(Table("table", frame, formats=formats)))


def _git_commit(*roots: str | os.PathLike) -> str:
    """``git rev-parse HEAD`` of the first of ``roots`` that lies in a git checkout."""
    for root in roots:
        try:
            out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=30, check=True)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown (not a git checkout)"


def publish_results(output_root: str | os.PathLike, dest: str | os.PathLike, tracking_uri: str, prefix: str,
                    command: str = "", notes: str = "", commit: str | None = None, jobs: int | None = None,
                    bundle_root: str | os.PathLike | None = None) -> Path:
    """Copy a finished run's report, tables, figures, per-image CSV and measured run times into ``dest``.

    Args:
        output_root: the run's output folder (``report/report.md`` and ``segmentation/sweep_test.csv`` inside).
        dest: the folder to (re)write, e.g. ``docs/results/full_protocol``; replaced whole.
        tracking_uri, prefix: the MLflow store and experiment prefix of the run (for the run times).
        command: the command that produced the run (written into the README).
        notes: free text for the README (machine, load, what was not run).
        commit: the code's commit (default: ``git rev-parse HEAD`` of the checkout that holds ``output_root``, else
            of ``bundle_root``).
        jobs: runs that ran at once, to turn the summed run times into a wall-time estimate.
        bundle_root: this code's checkout (default: two folders above this module).

    Returns:
        ``dest``.

    Raises:
        BundleInputError: the report or the sweep CSV is missing (names the file and the stage that writes it).
    """
    import pandas as pd

    out = Path(output_root)
    report = out / "report" / "report.md"
    sweep_csv = out / "segmentation" / "sweep_test.csv"
    if not report.is_file():
        raise BundleInputError(report, "no report to publish; run configs/analysis.yaml and configs/report.yaml on "
                                       "the finished sweep first (nothing written)")
    if not sweep_csv.is_file():
        raise BundleInputError(sweep_csv, "no sweep results to publish; run scripts/sweep.py first (nothing written)")
    try:
        sweep = pd.read_csv(sweep_csv, dtype={"train_size": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise BundleInputError(sweep_csv, f"not a readable CSV ({e}); nothing written") from None
    missing = {"task", "init", "train_size", "seed", "dice"} - set(sweep.columns)
    if missing:
        raise BundleInputError(sweep_csv, f"missing columns {sorted(missing)}; nothing written")

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shutil.copy2(report, tmp / "report.md")
        for folder in ("tables", "figures"):
            if (report.parent / folder).is_dir():
                shutil.copytree(report.parent / folder, tmp / folder)
        sweep.to_csv(tmp / "sweep_test.csv.gz", index=False, compression={"method": "gzip", "mtime": 0})
        times = runs_of_sweep(run_times(tracking_uri, prefix), sweep)
        times.to_csv(tmp / "run_times.csv", index=False)
        readme = _readme(sweep, times, command=command, notes=notes, jobs=jobs,
                         commit=commit or _git_commit(out, bundle_root or Path(__file__).resolve().parents[2]))
        (tmp / "README.md").write_text(readme)  # the folder as a whole is renamed into place below
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def _readme(sweep: pd.DataFrame, times: pd.DataFrame, command: str, notes: str, jobs: int | None,
            commit: str) -> str:
    cells = runs_per_cell(sweep)
    summary = compute_summary(times)
    total = float(times["seconds"].sum()) if len(times) else 0.0
    n_runs = int(cells["seeds"].sum())
    lines = [
        "# Published results",
        "",
        f"- Published: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Code: commit `{commit}`",
        f"- Command: `{command}`" if command else "- Command: not recorded",
        f"- Fine-tuning runs in the per-image CSV: {n_runs}",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    lines += [
        "The report ([report.md](report.md)) and its [tables](tables/) are the analysis stage's output on this run's",
        "sweep, unchanged; `sweep_test.csv.gz` holds every test image's Dice of every run.",
        "",
        "## Measured compute",
        "",
        "Wall time of each fine-tuning and pre-training run of this sweep as MLflow recorded it (`run_times.csv`), per",
        "stage, task and architecture:",
        "",
        _markdown(summary, median_s="{:.1f}".format, total_s="{:,.0f}".format) if len(summary)
        else "No finished run in the MLflow store.",
        "",
        f"Sum over the runs: {total:,.0f} s ({total / 3600:.1f} h)"
        + (f"; with {jobs} runs at once, about {total / jobs / 3600:.1f} h of wall time." if jobs else "."),
        "",
        "## Runs per cell",
        "",
        _markdown(cells),
        "",
    ]
    return "\n".join(lines)

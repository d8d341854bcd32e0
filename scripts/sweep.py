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
ref_area``; default ``<output_root>/segmentation/sweep_<split>.csv``, which lists every finished run of the folder,
the runs other grids wrote into it included) and an MLflow run
(``<mlflow_experiment_prefix>_sweep``) records the grid, the mean Dice per cell and the CSV. Every training and
evaluation run is also in MLflow (``<prefix>_finetune``) with the tags ``task``, ``init``, ``train_size``, ``seed``,
``mode``.

    python scripts/sweep.py                                  # configs/sweep.yaml "default" grid
    python scripts/sweep.py --settings quick                 # the CPU check: 4 SCR images x 3 seeds, doll vs scratch
    python scripts/sweep.py --settings full                  # the full protocol (docs/README.md)
    python scripts/sweep.py --settings full,controls --collect_only   # one table of both grids' finished runs
    python scripts/sweep.py --tasks scr --inits doll,scratch --sizes 2,4,all --seeds 0,1 --set "{'num_iterations': 100}"

Every grid lives in configs/sweep.yaml (the pipeline's too: configs/pipeline.yaml names them); the command line
(``fire``) only narrows or extends one. ``run_sweep(SweepGrid.from_settings(name), ...)`` is the same as a function
(used by ``scripts/run_pipeline.py`` and ``scripts/resolution_study.py``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bundle.tasks import (DEFAULT_SEG_ARCH, INIT_CHOICES, TASKS, arch_task, parse_train_size,  # noqa: E402
                          run_name)
from scripts.processes import process_pool, run_workflows_in_child, say, threads_for  # noqa: E402

#: Columns of the sweep's tidy CSV, in order (the per-run CSVs of configs/evaluate.yaml have them all).
COLUMNS = ("task", "init", "train_size", "seed", "mode", "split", "n_train", "image", "structure", "dice", "iou",
           "hd95", "pred_area", "ref_area")
#: The columns that name a run in the tidy CSV (with ``arch`` where present).
RUN_KEYS = ("task", "init", "train_size", "seed", "mode")
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
    def arch(self) -> str:
        """The segmenter architecture (``seg_arch`` of its overrides, else the configs' default)."""
        return str(self.overrides.get("seg_arch", DEFAULT_SEG_ARCH))

    @property
    def name(self) -> str:
        return run_name(self.task, self.init, self.train_size, self.seed, self.mode, self.arch)

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


#: The grids' file: every grid of the project is a named entry of it.
SWEEP_YAML = ROOT / "configs" / "sweep.yaml"


def _as_list(value: Any) -> list[Any]:
    """A grid axis from YAML, Python or the command line (``"2,4,all"``, ``(2, 4, 'all')`` or ``4``)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass
class SweepGrid:
    """One grid of the low-data protocol: tasks x inits x sizes x seeds x modes, the bundle overrides of its runs,
    further grids that join the same sweep (``extra``: mappings with the same fields, e.g. the real lungs at their own
    image size) and how many runs execute at once (``jobs``)."""

    tasks: list[str]
    inits: list[str]
    sizes: list[str]
    seeds: list[int]
    modes: list[str] = field(default_factory=lambda: ["full"])
    overrides: dict[str, Any] = field(default_factory=dict)
    extra: list[dict[str, Any]] = field(default_factory=list)
    jobs: int = 1
    #: bundle overrides of the label generation (``generate_doll.yaml``) and of the pre-training (``pretrain.yaml``)
    #: of the pre-trainings this grid needs and lacks (:func:`pretrain_steps`), e.g. a real CheXpert's
    #: ``image_root`` for the Grad-CAM labels; empty: the configs' defaults, as the pipeline's DoLL pre-training
    generate_overrides: dict[str, Any] = field(default_factory=dict)
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    #: only the runs of these segmenter architectures, the extra grids' included (``None``: every run), e.g. one
    #: architecture's part of a long protocol first
    archs: list[str] | None = None

    def __post_init__(self) -> None:
        self.tasks = [str(t) for t in _as_list(self.tasks)]
        self.inits = [str(i) for i in _as_list(self.inits)]
        self.sizes = [_size_label(s) for s in _as_list(self.sizes)]
        self.seeds = [int(s) for s in _as_list(self.seeds)]
        self.modes = [str(m) for m in _as_list(self.modes)]
        self.overrides = dict(self.overrides or {})
        self.extra = [dict(g) for g in self.extra or []]
        self.jobs = int(self.jobs)
        self.generate_overrides = dict(self.generate_overrides or {})
        self.pretrain_overrides = dict(self.pretrain_overrides or {})
        self.archs = None if self.archs is None else [str(a) for a in _as_list(self.archs)]
        if self.archs is not None:
            from bundle.networks.segmentation import ARCHITECTURES

            unknown = sorted(set(self.archs) - set(ARCHITECTURES))
            if unknown:
                raise ValueError(f"unknown architectures {unknown}; choose from {', '.join(ARCHITECTURES)}")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> "SweepGrid":
        """A grid from a mapping with the fields of this class (a configs/sweep.yaml entry)."""
        known = {"tasks", "inits", "sizes", "seeds", "modes", "overrides", "extra", "jobs", "generate_overrides",
                 "pretrain_overrides", "archs"}
        unknown = set(settings) - known
        if unknown:
            raise ValueError(f"unknown sweep grid fields {sorted(unknown)}; a grid has {sorted(known)}")
        return cls(**dict(settings))

    @classmethod
    def from_settings(cls, name: str | Sequence[str], path: str | os.PathLike = SWEEP_YAML) -> "SweepGrid":
        """The grid ``name`` of configs/sweep.yaml; several names (``"full,controls"`` or a list) give their
        :meth:`union`."""
        import yaml

        names = _as_list(name)
        settings = yaml.safe_load(Path(path).read_text())
        for n in names:
            if n not in settings:
                raise ValueError(f"unknown sweep settings {n!r}; {path} has {', '.join(settings)}")
        grids = [cls.from_mapping(settings[n]) for n in names]
        return grids[0] if len(grids) == 1 else cls.union(grids)

    @classmethod
    def union(cls, grids: Sequence["SweepGrid"]) -> "SweepGrid":
        """One sweep of several grids, e.g. the full protocol and the control grid collected into one published
        table (``--settings full,controls``): the first grid with every other grid and its extra grids joined as
        extra grids, each keeping its architecture; a run of several grids is run (and collected) once.

        Raises:
            ValueError: the grids' common bundle overrides (other than ``seg_arch``) or their label-generation /
                pre-training overrides differ (the runs of one sweep share them; put such a grid in a sweep of
                its own).
        """
        first = grids[0]

        def common(g: "SweepGrid") -> dict[str, Any]:
            return {k: v for k, v in g.overrides.items() if k != "seg_arch"}

        extra = list(first.extra)
        for g in grids[1:]:
            if (common(g), g.generate_overrides, g.pretrain_overrides) != \
                    (common(first), first.generate_overrides, first.pretrain_overrides):
                raise ValueError("grids joined in one sweep must share their overrides: "
                                 f"{common(first)} / {first.generate_overrides} / {first.pretrain_overrides} vs "
                                 f"{common(g)} / {g.generate_overrides} / {g.pretrain_overrides}")
            arch = {"seg_arch": g.overrides.get("seg_arch", DEFAULT_SEG_ARCH)}
            own = {"tasks": g.tasks, "inits": g.inits, "sizes": g.sizes, "seeds": g.seeds}
            for part in (own, *g.extra):
                extra.append({"modes": g.modes, **part, "overrides": {**arch, **dict(part.get("overrides") or {})}})
        return cls.from_mapping({**first.__dict__, "extra": extra, "jobs": max(g.jobs for g in grids)})

    def runs(self) -> list[SweepRun]:
        """Every run of the grid and of its extra grids (each extra run once, with its grid's overrides), of the
        architectures ``archs`` only when it is set."""
        arch = {"seg_arch": self.overrides["seg_arch"]} if "seg_arch" in self.overrides else {}
        runs = make_grid(self.tasks, self.inits, self.sizes, self.seeds, self.modes)
        for run in runs:
            run.overrides = dict(arch)  # the grid's architecture names its runs (run_name)
        names = {r.name for r in runs}
        for grid in self.extra:
            sub = SweepGrid.from_mapping({"modes": self.modes, **grid})
            for run in make_grid(sub.tasks, sub.inits, sub.sizes, sub.seeds, sub.modes):
                run.overrides = {**arch, **sub.overrides}
                if run.name not in names:
                    runs.append(run)
                    names.add(run.name)
        return runs if self.archs is None else [r for r in runs if r.arch in self.archs]

    def describe(self) -> dict[str, Any]:
        """The grid as plain values (MLflow params, logs)."""
        return {"tasks": self.tasks, "inits": self.inits, "sizes": self.sizes, "seeds": self.seeds,
                "modes": self.modes, "extra": self.extra}


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


def pretrain_labels_of(init: str) -> str | None:
    """The pre-training labels (``configs/pretrain.yaml`` ``pretrain_labels``) of a pre-training control init
    (``doll_shuffled`` -> ``shuffled``); ``None`` for the other inits: the DoLL init's checkpoint of the default
    architecture is the pipeline's pre-training stage (or a path the user gives), never made behind the user's back
    (another architecture's is: :func:`pretrain_steps`)."""
    from bundle.doll.controls import init_pretrain_labels

    labels = init_pretrain_labels(init)
    return labels if labels != "doll" else None


@dataclass
class PretrainStep:
    """One pre-training control (bundle/doll/controls.py) a grid needs and that is not made yet: the labels, the segmenter architecture, the bundle runs that make its
    checkpoint (``generate_doll.yaml --doll_labels`` when the labels are generated and their datalist is missing,
    then ``pretrain.yaml --pretrain_labels``) and the checkpoint itself."""

    labels: str
    arch: str
    checkpoint: Path
    steps: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return f"pretrain_{self.arch}_{self.labels}"


def pretrain_steps(runs: Sequence[SweepRun], paths: Mapping[str, str], overrides: Mapping[str, Any] | None = None,
                   generate_overrides: Mapping[str, Any] | None = None,
                   pretrain_overrides: Mapping[str, Any] | None = None) -> list[PretrainStep]:
    """The control pre-trainings that ``runs`` fine-tune from and that are not made yet (no ``model.pt`` under
    ``<models_dir>/pretrain/<arch>_<labels>``, no ``init_checkpoints#<init>`` override), in the order of the runs,
    and the DoLL pre-training of an architecture other than :data:`DEFAULT_SEG_ARCH` (e.g. the full protocol's UNet:
    the pipeline's pre-training stage makes the default architecture's only).
    They use the configs' defaults plus ``overrides`` (both stages), ``generate_overrides`` / ``pretrain_overrides``
    (one stage) and the shared folders: the recipe of the pipeline's DoLL pre-training."""
    from bundle.doll.controls import GENERATED_LABELS, doll_datalist_name

    out: dict[tuple[str, str], PretrainStep] = {}
    for run in runs:
        labels = pretrain_labels_of(run.init)
        arch = run.arch
        if labels is None and run.init == "doll" and arch != DEFAULT_SEG_ARCH:
            labels = "doll"  # the pipeline pre-trains the default architecture only: another one's DoLL init here
        if labels is None or (labels, arch) in out or f"init_checkpoints#{run.init}" in run.overrides:
            continue  # not a control, listed already, or its checkpoint given
        ckpt = Path(paths["models_dir"]) / "pretrain" / f"{arch}_{labels}" / "model.pt"
        if ckpt.is_file():
            continue
        base = {"data_root": paths["data_root"], "output_root": paths["output_root"],
                "models_dir": paths["models_dir"], "show_progress": False, **(overrides or {})}
        steps = []
        datalist = Path(paths["data_root"]) / "datalists" / doll_datalist_name(labels)
        if labels in GENERATED_LABELS and not datalist.is_file():
            steps.append({"name": f"generate_doll_{labels}", "configs": ["generate_doll.yaml"],
                          "args": {**base, **(generate_overrides or {}), "doll_labels": labels}})
        steps.append({"name": f"pretrain_{arch}_{labels}", "configs": ["pretrain.yaml"],
                      "args": {**base, **(pretrain_overrides or {}), "seg_arch": arch, "pretrain_labels": labels}})
        out[(labels, arch)] = PretrainStep(labels, arch, ckpt, steps)
    return list(out.values())


def run_pretraining(pool: Any, control: PretrainStep, log_dir: str | os.PathLike, verbose: bool = False) -> None:
    """Run one pre-training's steps in ``pool`` (:func:`scripts.processes.process_pool`) with every thread, its
    output to ``<log_dir>/<name>.log`` (``verbose``: streamed instead).

    Raises:
        RuntimeError: a step failed or the checkpoint is missing afterwards; the message has the log's tail."""
    start = time.time()
    log_path = Path(log_dir) / f"{control.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    say(f"[sweep] {control.name}: {', '.join(s['name'] for s in control.steps)} (log {log_path})")
    code = pool.submit(run_workflows_in_child, control.steps, None if verbose else str(log_path),
                       threads_for(1)).result()
    if code != 0 or not control.checkpoint.is_file():
        tail = "" if verbose else "".join(log_path.read_text(errors="replace").splitlines(True)[-30:])
        raise RuntimeError(f"[sweep] {control.name}: failed (exit {code}); log {log_path}\n{tail}")
    say(f"[sweep] {control.name}: done in {time.time() - start:.0f} s")


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


def _runs_of(keys: Any, unique: bool = True) -> list[SweepRun]:
    """The runs named by the rows of a frame with the :data:`RUN_KEYS` columns (and ``arch`` where present), in their
    order: once each (``unique``) or one per row."""
    import pandas as pd

    keys = keys[list(RUN_KEYS)].assign(arch=keys["arch"] if "arch" in keys.columns else None)
    if unique:
        keys = keys.drop_duplicates()
    return [SweepRun(str(task), str(init), str(size), int(seed), str(mode),
                     {} if arch is None or pd.isna(arch) else {"seg_arch": str(arch)})
            for task, init, size, seed, mode, arch in keys.itertuples(index=False)]


def folder_runs(csv_path: str | os.PathLike, runs: Sequence[SweepRun], output_root: str | os.PathLike | None = None,
                split: str = "test") -> list[SweepRun]:
    """The runs of an output folder's tidy CSV: every finished run of the folder, this grid's and those other grids
    wrote into it. Order: the runs ``csv_path`` already lists (in their order), then those of ``runs`` it does not
    list, then any other finished run found under ``<output_root>/segmentation/<run>/metrics_<split>.csv`` (by
    name; e.g. one an older table lost).

    So a second grid run into a pipeline's folder (the controls, pre-training replicates, more seeds) adds its runs to
    the table the analysis reads instead of replacing it, and a run whose per-run CSV has been deleted drops out when
    :func:`collect` re-reads the per-run CSVs. A table that cannot be read only loses its ordering (its rows come from
    the per-run CSVs, so nothing is lost)."""
    import pandas as pd

    def read_keys(path: Path, **kwargs: Any) -> list[SweepRun]:
        try:
            return _runs_of(pd.read_csv(path, dtype={"train_size": str},
                                        usecols=lambda c: c in (*RUN_KEYS, "arch"), **kwargs))
        except (ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            say(f"[sweep] {path}: no run keys ({err}); left out of the folder's table")
            return []

    path = Path(csv_path)
    listed = read_keys(path) if path.is_file() else []
    found: list[SweepRun] = []
    if output_root is not None:
        for csv in sorted((Path(output_root) / "segmentation").glob(f"*/metrics_{split}.csv")):
            found += [r for r in read_keys(csv, nrows=1) if r.name == csv.parent.name]
    by_name = {run.name: run for run in runs}
    out: dict[str, SweepRun] = {}
    for run in [*listed, *runs, *found]:
        out.setdefault(run.name, by_name.get(run.name, run))
    return list(out.values())


def collect_curves(runs: Sequence[SweepRun], output_root: str | os.PathLike) -> Any:
    """Concatenate the validation curves (``<output_root>/segmentation/<run>/val_curve.csv``, written during
    training by :class:`bundle.handlers.training.ValidationCurveWriter`) of ``runs`` into one ``DataFrame``."""
    import pandas as pd

    frames = [pd.read_csv(p, dtype={"train_size": str}) for p in
              (Path(output_root) / "segmentation" / run.name / "val_curve.csv" for run in runs) if p.is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summarise(frame: Any) -> Any:
    """Mean Dice per (task, init, train_size) and per seed: the per-image mean over structures, averaged over the
    images of each seed, then mean and standard deviation over seeds (``n_seeds`` says how many)."""
    import pandas as pd

    from bundle.reporting.plots import sort_by_size

    if frame.empty:
        return pd.DataFrame(columns=["task", "init", "train_size", "mode", "dice_mean", "dice_std", "n_seeds"])
    if "arch" in frame.columns:  # another architecture's runs apart: task "<task>:<arch>"
        frame = frame.assign(task=[arch_task(t, None if pd.isna(a) else str(a))
                                   for t, a in zip(frame["task"], frame["arch"])])
    per_image = frame.groupby(["task", "init", "train_size", "mode", "seed", "image"], as_index=False)["dice"].mean()
    per_seed = per_image.groupby(["task", "init", "train_size", "mode", "seed"], as_index=False)["dice"].mean()
    out = per_seed.groupby(["task", "init", "train_size", "mode"], as_index=False)["dice"].agg(
        dice_mean="mean", dice_std="std", n_seeds="count")
    return sort_by_size(out, ["task", "train_size", "init", "mode"])


def run_sweep(
    grid: SweepGrid,
    paths: Mapping[str, str | os.PathLike] | None = None,
    device: str | None = None,
    split: str = "test",
    output_csv: str | os.PathLike | None = None,
    verbose: bool = False,
    keep_going: bool = False,
    log_mlflow: bool = True,
    collect_only: bool = False,
) -> SweepResult:
    """Run (or resume) the low-data grid and write its tidy per-image CSV.

    Args:
        grid: the runs (:class:`SweepGrid`; ``configs/train.yaml`` ids ``task``, ``init``, ``train_size``, ``seed``,
            ``mode``), the bundle overrides of every run (e.g. ``{"num_iterations": 100}``; ``tracking_uri`` and
            ``mlflow_experiment_prefix`` are honoured by the sweep's own MLflow run too) and ``jobs``, the runs
            executed concurrently with the CPU threads shared out (each run is still one deterministic process).
        paths: the shared folders ``data_root``, ``output_root``, ``models_dir`` (default: ``data``, ``eval``,
            ``models`` under the bundle root, as in the configs).
        device: torch device of every run (default: the config's).
        split: the evaluated split.
        output_csv: the tidy CSV of this grid's runs. Default: the folder's table
            ``<output_root>/segmentation/sweep_<split>.csv``, which lists every finished run of the folder, other
            grids' included (:func:`folder_runs`); the printed and logged summary is this grid's.
        verbose: stream the runs' output (default: ``<output_root>/segmentation/logs/<run>.log``).
        keep_going: record a failed run and continue (default: raise at the first failure).
        log_mlflow: log the sweep's summary run to MLflow.
        collect_only: train nothing: write the CSVs of the runs finished so far (``missing`` for the others), e.g.
            to analyse a long protocol part-way while it runs elsewhere or before it is resumed.

    Returns:
        :class:`SweepResult` (each run's status: ``skipped`` when its CSV existed, else ``done`` or ``failed``;
        ``missing`` for an unfinished run under ``collect_only``).

    Raises:
        RuntimeError: a run failed (without ``keep_going``); the message has the command's log tail.
    """
    import pandas as pd

    from bundle.utils import atomic_write_text

    given = dict(paths or {})
    paths = {key: str(given.get(key) or ROOT / default) for key, default in
             (("data_root", "data"), ("output_root", "eval"), ("models_dir", "models"))}
    runs = grid.runs()
    overrides = grid.overrides
    jobs = grid.jobs
    common: dict[str, Any] = {**paths, "show_progress": False, **overrides}
    if device:
        common["device"] = f"$torch.device('{device}')"
    log_dir = Path(paths["output_root"]) / "segmentation" / "logs"
    sizes_run = list(dict.fromkeys(r.train_size for r in runs))
    say(f"[sweep] {len(runs)} runs: tasks={grid.tasks} inits={grid.inits} sizes={sizes_run} seeds={grid.seeds} "
        f"modes={grid.modes}" + (f" + extra grids {grid.extra}" if grid.extra else ""))
    threads = threads_for(jobs)
    failures: list[str] = []
    shared = {k: v for k, v in common.items() if k in ("device", "tracking_uri", "mlflow_experiment_prefix")}
    pretrainings = [] if collect_only else pretrain_steps(runs, paths, shared, grid.generate_overrides,
                                                          grid.pretrain_overrides)

    def execute(k: int, run: SweepRun) -> None:
        if metrics_csv(paths["output_root"], run, split).is_file():
            run.status = "skipped"
            say(f"[sweep] {k}/{len(runs)} {run.name}: finished before, skipped")
            return
        if collect_only:
            run.status = "missing"
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
    if collect_only:
        for k, run in enumerate(runs, 1):
            execute(k, run)
    else:
        with process_pool(jobs) as pool, ThreadPoolExecutor(max_workers=max(1, jobs)) as threads_pool:
            for control in pretrainings:  # the missing pre-trainings first, one at a time with every thread
                run_pretraining(pool, control, log_dir, verbose)
            list(threads_pool.map(lambda kr: execute(*kr), enumerate(runs, 1)))
    if failures and not keep_going:
        raise RuntimeError(failures[0])

    csv_path = str(output_csv or Path(paths["output_root"]) / "segmentation" / f"sweep_{split}.csv")
    # the folder's table keeps the runs other grids wrote there (an explicit output_csv holds this grid alone)
    table_runs = runs if output_csv else folder_runs(csv_path, runs, paths["output_root"], split)
    frame = collect(table_runs, paths["output_root"], split)
    atomic_write_text(csv_path, frame.to_csv(index=False))
    curves = collect_curves(table_runs, paths["output_root"])
    if not curves.empty:
        atomic_write_text(str(Path(csv_path).with_name("sweep_val_curves.csv")), curves.to_csv(index=False))
    own = {run.name for run in runs}  # the summary is this grid's: its rows of the folder's table
    table = summarise(frame[[run.name in own for run in _runs_of(frame, unique=False)]])
    if not table.empty:
        with pd.option_context("display.width", 120, "display.max_rows", 200):
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
    result = SweepResult(runs=runs, csv_path=csv_path, num_rows=len(frame), summary=table.to_dict("records"))
    if log_mlflow and not collect_only and not frame.empty:
        result.mlflow_run_id = _log_sweep(result, paths["output_root"], overrides, split, grid.describe())
    say(f"[sweep] {result.count('done')} run, {result.count('skipped')} skipped, {result.count('failed')} failed"
        + (f", {result.count('missing')} not finished yet (collected only)" if collect_only else "")
        + f"; {len(frame)} rows in {csv_path}")
    return result


def _log_sweep(result: SweepResult, output_root: str, overrides: Mapping[str, Any], split: str,
               grid: Mapping[str, Any]) -> str:
    """One MLflow run for the sweep: the grid as params, mean Dice per cell as metrics, the CSV as artifact."""
    from monai.utils import path_to_sqlite_uri

    from bundle.tracking import log_run

    uri = str(overrides.get("tracking_uri") or path_to_sqlite_uri(os.path.join(output_root, "mlruns.db")))
    prefix = str(overrides.get("mlflow_experiment_prefix", "cxr_doll"))
    metrics = {f"dice_{r['task']}_{r['init']}_n{r['train_size']}" + ("" if r["mode"] == "full" else f"_{r['mode']}"):
               float(r["dice_mean"]) for r in result.summary}
    params = {**{k: json.dumps(v) for k, v in grid.items()}, "split": split,
              "overrides": json.dumps({k: v for k, v in overrides.items() if k != "tracking_uri"}, default=str),
              "runs": len(result.runs)}
    return log_run(uri, f"{prefix}_sweep", f"sweep_{split}", params=params, metrics=metrics,
                   artifacts=[result.csv_path], tags={"stage": "sweep", "split": split})


def main(settings: Any = "default", tasks: Any = None, inits: Any = None, sizes: Any = None, seeds: Any = None,
         modes: Any = None, set: Mapping[str, Any] | None = None, jobs: int | None = None,  # noqa: A002
         data_root: str | None = None, output_root: str | None = None, models_dir: str | None = None,
         device: str | None = None, split: str = "test", output_csv: str | None = None, keep_going: bool = False,
         verbose: bool = False, dry_run: bool = False, collect_only: bool = False, archs: Any = None) -> SweepResult:
    """Run the grid ``settings`` of configs/sweep.yaml, narrowed by the command line.

    Args:
        settings: the grid's name in configs/sweep.yaml (default, quick, full, pipeline, ...); several names
            (``full,controls``) run or collect their union (:meth:`SweepGrid.union`).
        tasks, inits, sizes, seeds, modes: replace that axis (comma-separated, e.g. ``--sizes 2,4,all``); giving
            ``tasks`` also drops the grid's extra grids.
        set: bundle overrides for every run on top of the grid's (``--set "{'num_iterations': 100}"``).
        jobs: runs at once (default: the grid's ``jobs``).
        data_root, output_root, models_dir: the shared folders (default: under the bundle root).
        device: torch device (default: the config's). split: the evaluated split. output_csv: the tidy CSV.
        keep_going: continue after a failed run. verbose: stream the runs' output. dry_run: list the runs and
            whether each is finished, run nothing. collect_only: run nothing, write the CSVs of the finished runs
            (the analysis of a protocol part-way).
        archs: only the runs of these segmenter architectures, the extra grids' included (e.g. ``--archs unet``
            runs the full protocol's UNet part first; a later run without it skips what is finished).
    """
    grid = SweepGrid.from_settings(settings)
    changes = {k: v for k, v in (("tasks", tasks), ("inits", inits), ("sizes", sizes), ("seeds", seeds),
                                 ("modes", modes)) if v is not None}
    if changes:
        grid = SweepGrid.from_mapping({**grid.__dict__, **changes, "extra": [] if tasks is not None else grid.extra})
    if set:
        if not isinstance(set, Mapping):
            raise SystemExit(f"--set expects a mapping of bundle overrides, e.g. \"{{'num_iterations': 100}}\", got {set!r}")
        grid.overrides.update(set)
    if jobs is not None:
        grid.jobs = int(jobs)
    if archs is not None:
        grid = SweepGrid.from_mapping({**grid.__dict__, "archs": archs})
    paths = {"data_root": data_root, "output_root": output_root, "models_dir": models_dir}
    if dry_run:
        out = Path(output_root or ROOT / "eval")
        runs = grid.runs()
        folders = {"data_root": str(data_root or ROOT / "data"), "output_root": str(out),
                   "models_dir": str(models_dir or ROOT / "models")}
        for step in pretrain_steps(runs, folders):
            print(f"{step.name}: to run first ({', '.join(s['name'] for s in step.steps)})")
        for run in runs:
            print(f"{run.name}: {'finished' if metrics_csv(out, run, split).is_file() else 'to run'}")
        return SweepResult(runs=runs, csv_path="", num_rows=0)
    return run_sweep(grid, paths, device=device, split=split, output_csv=output_csv, verbose=verbose,
                     keep_going=keep_going, collect_only=collect_only)


if __name__ == "__main__":
    import fire

    result = fire.Fire(main, serialize=lambda r: None)
    sys.exit(1 if isinstance(result, SweepResult) and result.count("failed") else 0)

#!/usr/bin/env python
"""Run the bundle's stages in order on the built-in phantom data (the README's main job).

Every stage is an ordinary ``python -m monai.bundle run`` of its config (so each can also be run alone); this script
only chains them, passes the shared output folders, and times them. Each workflow runs in a fresh process forked
from a server that has imported MONAI once (``scripts/processes.py``), torchrun stages as commands.
Settings: ``configs/pipeline.yaml``.

    python scripts/run_pipeline.py                 # default size (CPU, minutes)
    python scripts/run_pipeline.py --quick         # CI's end-to-end smoke run (outputs under <root>/quick/)
    python scripts/run_pipeline.py --stages data,classifier
    python scripts/run_pipeline.py --data data.yaml  # the user's datasets replace their phantoms (outputs: <root>/real/)

Outputs: ``data/`` (phantoms, datalists), ``models/`` (checkpoints), ``eval/`` (metrics, MLflow store ``mlruns.db``,
logs in ``eval/logs/<stage>.log``, timings in ``eval/pipeline_timing.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bundle.utils import atomic_write_json  # noqa: E402
from scripts.processes import (cli_value, env_with_threads, process_pool, run_workflows_in_child,  # noqa: E402
                               say, threads_for)

STAGES = ("data", "classifier", "doll", "pretrain", "finetune", "export", "analysis", "report")


#: sections of configs/pipeline.yaml that are not presets (``--preset`` takes any other top-level section)
BASE_SECTIONS = ("default", "quick", "quick_data")


def merge_settings(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the entries of ``extra`` (a preset or ``quick_data``): top-level entries replace, while
    ``overrides`` merge per stage and per id, so a preset that sets one data id keeps the stage's other ids."""
    overrides = {stage: dict(ids or {}) for stage, ids in (base.get("overrides") or {}).items()}
    for stage, ids in (extra.get("overrides") or {}).items():
        overrides[stage] = {**overrides.get(stage, {}), **(ids or {})}
    return {**base, **{k: v for k, v in extra.items() if k != "overrides"}, "overrides": overrides}


class Pipeline:
    """Chains the stage configs with shared folders; each stage's output goes to ``eval/logs/<stage>.log``."""

    def __init__(self, quick: bool, device: str | None, root: Path | None = None, verbose: bool = False,
                 data: Path | None = None, preset: str | None = None):
        settings = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
        self.settings = settings["quick" if quick else "default"]
        if quick and data is not None:  # CI's size for the data path: `quick_data` replaces entries of `quick`
            self.settings = merge_settings(self.settings, settings.get("quick_data") or {})
        if preset is not None:  # a named variant of the run (e.g. doll_data), merged over default / quick
            presets = sorted(k for k in settings if k not in BASE_SECTIONS)
            if preset not in presets:
                raise SystemExit(f"[pipeline] --preset {preset!r}: not a section of configs/pipeline.yaml; "
                                 f"presets: {presets}")
            self.settings = merge_settings(self.settings, settings[preset] or {})
        self.quick = quick
        self.data_file = data
        self.data_spec: dict[str, Any] = {}
        if data is not None:  # checked before anything runs or is written: the error names the file
            from bundle.data.userdata import load_data_spec
            from bundle.utils import BundleInputError

            try:
                self.data_spec = load_data_spec(data)
            except BundleInputError as e:
                raise SystemExit(f"[pipeline] --data: {e}") from None
        base = root or (ROOT / "quick" if quick else ROOT)
        if preset is not None and root is None:
            base = base / preset  # a preset's outputs never overwrite the default run's
        if data is not None and root is None:
            base = base / "real"  # the user's data never mix with the phantom run's outputs
        self.paths = {"data_root": str(base / "data"), "output_root": str(base / "eval"),
                      "models_dir": str(base / "models")}
        self.device = device
        self.verbose = verbose
        self.log_dir = Path(self.paths["output_root"]) / "logs"
        self.timing: dict[str, float] = {}   # wall seconds per stage (stages run one after the other)
        self.steps: dict[str, float] = {}    # wall seconds per bundle command (some run concurrently)
        self._pool: Any = None

    def bundle_run(self, name: str, configs: list[str], overrides: dict[str, Any] | None = None,
                   threads: int | None = None, launcher: list[str] | None = None) -> None:
        """Run the bundle workflow of ``configs`` (names under configs/: a standalone config, then its overlays) with the shared
        folders, as ``python -m monai.bundle run --config_file [...] --id value ...`` would: in a fresh process of
        the runner's pool (:func:`~scripts.processes.process_pool`) with ``threads`` CPU threads (``None``: all), or
        with ``launcher`` (e.g. torchrun) as a command."""
        args = dict(self.paths)
        if self.device:
            args["device"] = f"$torch.device('{self.device}')"
        args.update(overrides or {})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        start = time.time()
        say(f"[pipeline] {name}: {' '.join(configs)}")
        if launcher:
            files = [str(ROOT / "configs" / c) for c in list(configs)]
            cmd = [*launcher, "-m", "monai.bundle", "run", "--config_file", json.dumps(files)]
            for key, value in args.items():
                cmd += [f"--{key}", cli_value(value)]
            with open(log_path, "w") as log:
                code = subprocess.run(cmd, cwd=ROOT, stdout=None if self.verbose else log, stderr=subprocess.STDOUT,
                                      env=env_with_threads(threads)).returncode
        else:
            step = {"name": name, "configs": list(configs), "args": args}
            code = self.pool.submit(run_workflows_in_child, [step], None if self.verbose else str(log_path),
                                    threads).result()
        elapsed = time.time() - start
        self.steps[name] = round(elapsed, 1)
        if code != 0:
            tail = "" if self.verbose else "".join(open(log_path).readlines()[-40:])
            raise SystemExit(f"[pipeline] stage {name} failed (exit {code}); log: {log_path}\n{tail}")
        say(f"[pipeline] {name}: done in {elapsed:.0f} s")

    @property
    def pool(self) -> Any:
        """The runner's process pool (``jobs`` workers; created on first use, shut down at the end of :meth:`run`)."""
        if self._pool is None:
            self._pool = process_pool(self.jobs)
        return self._pool

    # ---- stages -------------------------------------------------------------------------------------------------
    def data(self) -> None:
        """Stage 1 (configs/prepare_data.yaml): phantoms where the data file gives no dataset, then every datalist."""
        overrides = dict(self.settings["overrides"].get("data") or {})
        if self.data_file is not None:
            overrides["data_spec"] = str(Path(self.data_file).absolute())
        self.bundle_run("data", ["prepare_data.yaml"], overrides)

    def datalist_info(self, name: str) -> dict[str, Any]:
        """The data stage's ``summary.json`` entry of datalist ``name`` (``{}`` before the data stage ran)."""
        path = Path(self.paths["data_root"]) / "datalists" / "summary.json"
        try:
            return dict(json.loads(path.read_text()).get(name) or {})
        except (OSError, json.JSONDecodeError):
            return {}

    def doll_overrides(self) -> dict[str, Any]:
        """DoLL stage ids that depend on the data: with real CheXpert, ``image_root`` (the folder its CSV paths are
        relative to, where the DoLL records mirror the image tree)."""
        if self.datalist_info("chexpert").get("source") != "real":
            return {}
        content = json.loads((Path(self.paths["data_root"]) / "datalists" / "chexpert.json").read_text())
        root = ((content.get("summary") or {}).get("train_csv") or {}).get("data_root")
        return {"image_root": root} if root else {}

    def cpu_setting(self, key: str) -> int:
        """A process-count setting (``jobs``, ``doll_processes``; default 1) that only applies on CPU: 1 on CUDA."""
        return 1 if (self.device or "cpu").startswith("cuda") else int(self.settings.get(key, 1))

    @property
    def jobs(self) -> int:
        """Independent runs executed at once (classifiers, sweep cells), CPU threads shared out between them."""
        return self.cpu_setting("jobs")

    def classifier(self) -> None:
        """Stage 2: every classifier of the settings (trained, then evaluated on the test split), ``jobs`` at once."""
        common = self.settings["overrides"].get("classifier") or {}
        jobs = min(self.jobs, len(self.settings["classifiers"]))
        threads = threads_for(jobs)

        def one(spec: dict[str, Any]) -> None:
            spec = {**common, **spec, "show_progress": False}
            name = f"{spec['classifier_arch']}_seed{spec['seed']}"
            self.bundle_run(f"classifier_{name}", ["train_classifier.yaml"], spec, threads=threads)
            self.bundle_run(f"classifier_{name}_eval", ["train_classifier.yaml", "evaluate_classifier.yaml"],
                            {k: v for k, v in spec.items() if k in ("classifier_arch", "seed")}, threads=threads)

        if jobs > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(one, self.settings["classifiers"]))  # re-raises the first failure
        else:
            for spec in self.settings["classifiers"]:
                one(spec)

    def classifier_names(self) -> list[str]:
        return [f"{c['classifier_arch']}_seed{c['seed']}" for c in self.settings["classifiers"]]

    def doll(self) -> None:
        """Stage 3: DoLL generation (sharded over ``doll_processes`` torchrun ranks on CPU, gloo), then its quality."""
        overrides = {"classifier_names": self.classifier_names(), **self.doll_overrides(),
                     **(self.settings["overrides"].get("doll") or {})}
        nproc = self.cpu_setting("doll_processes")
        if nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            self.bundle_run("doll_generate", ["generate_doll.yaml"], {**overrides, "distributed": True},
                            threads=threads_for(nproc), launcher=launcher)
        else:
            self.bundle_run("doll_generate", ["generate_doll.yaml"], overrides)
        info = self.datalist_info("chexpert")
        if info.get("source") == "real" and not info.get("with_lesion"):  # no phantom lesions, no CheXlocalize
            say("[pipeline] doll_quality: skipped (real CheXpert without lesion masks to score the DoLL against: "
                "give CheXlocalize's segmentations as chexpert.localize in the data file)")
            return
        quality = {**overrides, **(self.settings["overrides"].get("doll_quality") or {})}
        self.bundle_run("doll_quality", ["generate_doll.yaml", "evaluate_doll.yaml"], quality)

    def pretrain(self) -> None:
        """Stage 4 (configs/pretrain.yaml): the segmenter pre-trained end to end on the DoLL datalist; on CPU over
        ``pretrain_processes`` torchrun ranks (gloo, configs/multi_gpu_pretrain.yaml) with the batch shared out, so
        that one optimizer step still sees ``batch_size`` images (the single-process recipe)."""
        overrides = {"show_progress": False, **(self.settings["overrides"].get("pretrain") or {})}
        nproc = self.cpu_setting("pretrain_processes")
        if nproc > 1:
            batch = int(overrides.get("batch_size")
                        or yaml.safe_load((ROOT / "configs" / "pretrain.yaml").read_text())["batch_size"])
            if batch % nproc:
                raise SystemExit(f"[pipeline] pretrain: batch_size {batch} is not divisible by pretrain_processes "
                                 f"{nproc} (configs/pipeline.yaml)")
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            self.bundle_run("pretrain", ["pretrain.yaml", "multi_gpu_pretrain.yaml"],
                            {**overrides, "batch_size": batch // nproc}, threads=threads_for(nproc), launcher=launcher)
        else:
            self.bundle_run("pretrain", ["pretrain.yaml"], overrides)

    def finetune(self) -> None:
        """Stage 5: the low-data sweep (scripts/sweep.py): the grid configs/pipeline.yaml names in configs/sweep.yaml,
        train + evaluate runs."""
        from bundle.tasks import TASKS, task_spec
        from scripts.sweep import SweepGrid, run_sweep

        grid = SweepGrid.from_settings(self.settings["sweep"])
        extra = []
        for g in grid.extra:  # e.g. the real-lungs check: only where its datalist was written
            missing = [t for t in g["tasks"] if not (Path(self.paths["data_root"]) / "datalists"
                                                    / TASKS[t].datalist).is_file()]
            if missing:
                say(f"[pipeline] finetune: no datalist for {missing} (data absent), grid {g} skipped")
            else:
                extra.append(g)
        for task, g in (self.settings.get("real_data_sweep") or {}).items():  # real datasets of the data file
            if self.datalist_info(task_spec(task).datalist[:-len(".json")]).get("given_as") and \
                    task not in grid.tasks and all(task not in e["tasks"] for e in extra):
                say(f"[pipeline] finetune: the data file gives the {task} task's data: grid {g} added")
                extra.append(g)
        grid.extra = extra
        grid.jobs = self.jobs
        # a grid with pre-training controls makes their labels and checkpoints with the settings of the pipeline's
        # own DoLL and pre-training stages
        grid.generate_overrides = {"classifier_names": self.classifier_names(), **self.doll_overrides(),
                                   **(self.settings["overrides"].get("doll") or {}), **grid.generate_overrides}
        grid.pretrain_overrides = {**(self.settings["overrides"].get("pretrain") or {}), **grid.pretrain_overrides}
        start = time.time()
        say(f"[pipeline] finetune: sweep {self.settings['sweep']!r} {grid.describe()}")
        result = run_sweep(grid, self.paths, device=self.device, verbose=self.verbose)
        self.steps["finetune"] = round(time.time() - start, 1)
        say(f"[pipeline] finetune: {len(result.runs)} runs, {result.num_rows} rows -> {result.csv_path} "
            f"in {self.steps['finetune']:.0f} s")

    def export(self) -> None:
        """Stage 6: the shipped model = the SCR fine-tune of the DoLL checkpoint on all training images (seed 0),
        copied to ``<models_dir>/model.pt`` and exported to TorchScript ``model.ts`` with ``ckpt_export``."""
        import shutil

        from bundle.utils import atomic_save, remove_stale_temp_files
        from bundle.tasks import run_name

        src = Path(self.paths["models_dir"]) / "segmentation" / run_name("scr", "doll", "all", 0) / "model.pt"
        if not src.is_file():
            raise SystemExit(f"[pipeline] export: {src} missing (the sweep must include init doll, size all, seed 0)")
        dst = Path(self.paths["models_dir"]) / "model.pt"
        for stale in (dst, dst.with_suffix(".ts")):  # temporary files of a killed earlier export
            remove_stale_temp_files(stale)
        atomic_save(dst, lambda tmp: shutil.copyfile(src, tmp))
        start = time.time()

        def export(tmp: str) -> None:  # TorchScript to a temporary file, renamed when whole (a kill leaves no half file)
            cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", tmp,
                   "--ckpt_file", str(dst), "--meta_file", str(ROOT / "configs" / "metadata.json"),
                   "--config_file", str(ROOT / "configs" / "inference.yaml")]
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"[pipeline] export failed:\n{res.stderr[-3000:]}")

        atomic_save(dst.with_suffix(".ts"), export)
        self.steps["export"] = round(time.time() - start, 1)
        say(f"[pipeline] export: {src} -> {dst} and {dst.with_suffix('.ts')}")
        if dst.parent.resolve() == (ROOT / "models").resolve():   # the shipped weights: their publication record
            write_large_files(ROOT / "large_files.yml", [dst, dst.with_suffix(".ts")], ROOT)
            # metadata.json's eval_metrics: the shipped model's own test evaluation (the sweep's evaluate run)
            from bundle.metadata import eval_metrics_from, write_eval_metrics

            metrics = Path(self.paths["output_root"]) / "segmentation" / src.parent.name / "metrics_test.json"
            real = self.datalist_info("scr").get("source") == "real"
            write_eval_metrics(ROOT / "configs" / "metadata.json", eval_metrics_from(metrics),
                               data="real (--data)" if real else "phantom")
            say(f"[pipeline] export: metadata.json eval_metrics from {metrics}")

    def analysis(self) -> None:
        """Stage 7 (configs/analysis.yaml): statistics, learning curves, Grad-CAM and ensembles of the sweep; the
        sections whose inputs earlier stages did not write are recorded as not run."""
        self.bundle_run("analysis", ["analysis.yaml"], self.settings["overrides"].get("analysis"))

    def report(self) -> None:
        """Stage 8 (configs/report.yaml): the HTML/Markdown/CSV report. This run's timings so far are merged into
        ``pipeline_timing.json`` first, so that the report shows them (the report's own time is added after)."""
        self.write_timing()
        self.bundle_run("report", ["report.yaml"], self.settings["overrides"].get("report"))

    def write_timing(self) -> dict[str, Any]:
        """Merge this run's stage and step timings into ``<output_root>/pipeline_timing.json``: ``{stage: seconds,
        ..., "total": sum of the stages, "steps": {bundle command: seconds}}`` (stages of an earlier partial run
        are kept)."""
        path = Path(self.paths["output_root"]) / "pipeline_timing.json"
        timing: dict[str, Any] = {}
        if path.is_file():
            try:
                timing = json.loads(path.read_text())
            except json.JSONDecodeError:
                timing = {}
        steps = {**(timing.pop("steps", None) or {}), **self.steps}
        timing.pop("total", None)
        timing.update(self.timing)
        timing = {k: timing[k] for k in STAGES if k in timing}
        timing["total"] = round(sum(timing.values()), 1)
        timing["steps"] = steps
        atomic_write_json(path, timing)
        return timing

    def run(self, stages: list[str]) -> None:
        start = time.time()
        try:
            for stage in stages:
                t0 = time.time()
                getattr(self, stage)()
                self.timing[stage] = round(time.time() - t0, 1)
        finally:
            if self._pool is not None:
                self._pool.shutdown()
        timing = self.write_timing()
        say(f"[pipeline] finished {', '.join(stages)} in {time.time() - start:.0f} s "
            f"(pipeline_timing.json total: {timing['total']:.0f} s)")


def write_large_files(path: Path, files: list[Path], root: Path) -> None:
    """The Model Zoo's ``large_files.yml`` for ``files`` (paths relative to ``root``, MD5 hashes): the record that
    ``python -m monai.bundle download_large_files`` checks when the weights are published outside the repository.
    ``url`` stays empty while the files are in the repository; fill it in where they are hosted."""
    import hashlib

    from bundle.utils import atomic_write_text

    entries = [{"path": f.relative_to(root).as_posix(), "url": "",
                "hash_val": hashlib.md5(f.read_bytes()).hexdigest(), "hash_type": "md5"} for f in files]
    header = ("# Weights of this bundle (written by the pipeline's export stage). They are in the repository; for the\n"
              "# Model Zoo, host them and fill in `url`: `python -m monai.bundle download_large_files` checks hash_val.\n")
    atomic_write_text(path, header + yaml.safe_dump({"large_files": entries}, sort_keys=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a few-minute end-to-end run (CI)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--device", default=None, help="torch device for every stage (default: cuda if available)")
    parser.add_argument("--root", default=None, help="folder for data/, eval/, models/ (default: the bundle root)")
    parser.add_argument("--verbose", action="store_true", help="stream the stages' output instead of logging it")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="a named variant of configs/pipeline.yaml merged over the run's settings (e.g. doll_data:"
                             " 4x the phantom CheXpert studies and the consensus DoLL); outputs under <root>/<NAME>/"
                             " unless --root is given")
    parser.add_argument("--data", default=None, metavar="FILE.yaml",
                        help="the user's datasets (chexpert, jsrt_scr, qata or covid_qu_ex, folder; see docs/README.md):"
                             " each one replaces its phantom; outputs under <root>/real/ unless --root is given")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    Pipeline(args.quick, args.device, Path(args.root) if args.root else None, args.verbose,
             Path(args.data) if args.data else None, args.preset).run(stages)


if __name__ == "__main__":
    main()

"""The pipeline runner (scripts/run_pipeline.py) and the sweep's process settings: thread sharing between
concurrent runs, the timing file the report reads, the settings of configs/pipeline.yaml."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from scripts.run_pipeline import STAGES, Pipeline, merge_settings
from scripts.processes import cli_value, thread_env

ROOT = Path(__file__).resolve().parent.parent


def test_thread_env_shares_the_cores_out():
    cores = len(os.sched_getaffinity(0))
    env = thread_env(2)
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2)) == env["MKL_NUM_THREADS"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert thread_env(4 * cores)["OMP_NUM_THREADS"] == "1"          # never zero threads
    one = thread_env(1)                                              # one job: the caller's settings stay
    assert one.get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")


def test_allocator_settings_reach_children_and_yield_to_the_user(monkeypatch):
    """The worker processes get glibc's malloc settings (set where unset), a value the user set wins, and
    CXR_DOLL_MALLOC_TUNE=0 leaves glibc's defaults."""
    from scripts.processes import MALLOC_ENV, allocator_env

    for key in MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("CXR_DOLL_MALLOC_TUNE", raising=False)
    env = thread_env(2)
    assert {k: env[k] for k in MALLOC_ENV} == MALLOC_ENV
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 1024 * 1024)     # glibc's maximum, in bytes
    monkeypatch.setenv("MALLOC_TOP_PAD_", "4096")
    assert thread_env(2)["MALLOC_TOP_PAD_"] == "4096"
    assert not any(k in allocator_env({"CXR_DOLL_MALLOC_TUNE": "0"}) for k in MALLOC_ENV)


@pytest.mark.parametrize("value", [False, True, 0, 3, 1e-05, 0.5, [128, 256], {"init_filters": 16},
                                   {"amp": False, "prior": None, "sizes": [4, "all"]}, "text"])
def test_cli_value_reads_back_as_the_same_value(value):
    """What the runner passes reaches the config as the value it meant: ``python -m monai.bundle run`` parses its
    arguments with fire, which keeps JSON's ``false``/``null`` as text (``'false'`` is true to ``bool()``)."""
    import fire.parser

    assert fire.parser.DefaultParseValue(cli_value(value)) == value
    assert type(fire.parser.DefaultParseValue(cli_value(value))) is type(value)
    assert fire.parser.DefaultParseValue(cli_value((1, 2))) == [1, 2]  # JSON's form: a tuple arrives as a list


def test_every_override_reaches_the_config_and_none_switches_off():
    """``monai.bundle run`` drops ``None``-valued arguments (``update_kwargs(ignore_none=True)``), so a ``None``
    override would silently leave the config default in place (CI's quick run trained with the 0.05 output prior it
    meant to switch off, and its real-lungs Dice fell to 0): every override of the sweep's grids must arrive, and
    ``None`` arrives as the text ``null`` that the finetune init reads as off."""
    import fire.parser
    from monai.bundle.scripts import update_kwargs

    from bundle.networks.finetune import FinetuneInit

    grids = yaml.safe_load((ROOT / "configs" / "sweep.yaml").read_text())
    overrides = {}
    for grid in grids.values():
        overrides.update(grid.get("overrides") or {})
        for extra in grid.get("extra") or []:
            overrides.update(extra.get("overrides") or {})
    assert overrides.get("output_bias_prior", 0) is None            # the case that failed: it is still exercised
    args = update_kwargs(**{k: fire.parser.DefaultParseValue(cli_value(v)) for k, v in overrides.items()})
    assert set(args) == set(overrides)
    assert args["output_bias_prior"] == "null"

    from monai.networks.nets import SegResNet

    net = SegResNet(spatial_dims=2, in_channels=1, out_channels=1, init_filters=8)
    off = FinetuneInit(net, "scratch", output_bias_prior=args["output_bias_prior"])
    on = FinetuneInit(SegResNet(spatial_dims=2, in_channels=1, out_channels=1, init_filters=8), "scratch",
                      output_bias_prior=0.05)
    assert off.output_bias is None and on.output_bias is not None


def test_timing_file_sums_stages_and_keeps_earlier_ones(tmp_path):
    pipe = Pipeline(quick=True, device="cpu", root=tmp_path)
    out = tmp_path / "eval"
    out.mkdir(parents=True)
    # an earlier partial run recorded the data and classifier stages
    (out / "pipeline_timing.json").write_text(json.dumps(
        {"data": 10.0, "classifier": 30.0, "total": 40.0, "steps": {"data": 10.0, "classifier_a": 25.0}}))
    pipe.timing = {"classifier": 20.0, "doll": 5.5}                  # this run re-ran the classifiers, then DoLL
    pipe.steps = {"classifier_a": 12.0, "classifier_b": 13.0, "doll_generate": 5.0}
    timing = pipe.write_timing()
    assert json.loads((out / "pipeline_timing.json").read_text()) == timing
    assert [k for k in timing if k not in ("total", "steps")] == ["data", "classifier", "doll"]  # stage order
    assert timing["classifier"] == 20.0 and timing["total"] == pytest.approx(35.5)
    assert timing["steps"] == {"data": 10.0, "classifier_a": 12.0, "classifier_b": 13.0, "doll_generate": 5.0}


def test_pipeline_settings_are_consistent():
    settings = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
    for name in ("default", "quick"):
        s = settings[name]
        names = [f"{c['classifier_arch']}_seed{c['seed']}" for c in s["classifiers"]]
        assert len(set(names)) == len(names) >= 2, "DoLL boosts across at least two distinct classifiers"
        from scripts.sweep import SweepGrid

        grid = SweepGrid.from_settings(s["sweep"]).__dict__
        # the export stage ships the DoLL fine-tune on all images, seed 0: the sweep must produce it
        assert "doll" in grid["inits"] and "all" in [str(x) for x in grid["sizes"]] and 0 in grid["seeds"]
        assert int(s.get("jobs", 1)) >= 1 and int(s.get("doll_processes", 1)) >= 1
    assert set(STAGES) >= {"data", "classifier", "doll", "pretrain", "finetune", "export", "analysis", "report"}
    # the default grid holds the acceptance comparison: DoLL against scratch at 4 images over >= 3 seeds
    d = SweepGrid.from_settings(settings["default"]["sweep"])
    assert {"doll", "scratch"} <= set(d.inits) and "4" in d.sizes and len(d.seeds) >= 3


def test_merge_settings_merges_overrides_per_stage_and_id():
    base = {"jobs": 2, "sweep": "pipeline", "overrides": {"data": {"a": 1, "b": 2}, "doll": {"n": 8}}}
    extra = {"sweep": "other", "overrides": {"data": {"b": 3}, "pretrain": {"max_epochs": 1}}}
    merged = merge_settings(base, extra)
    assert merged == {"jobs": 2, "sweep": "other", "overrides": {"data": {"a": 1, "b": 3}, "doll": {"n": 8},
                                                                  "pretrain": {"max_epochs": 1}}}
    assert base["overrides"]["data"] == {"a": 1, "b": 2}              # the inputs are not changed


def test_preset_doll_data_is_merged_over_the_run_and_writes_apart(tmp_path):
    from scripts.run_pipeline import ROOT as RUNNER_ROOT
    from bundle.constants import OBSERVATIONS

    default = Pipeline(False, "cpu")
    pipe = Pipeline(False, "cpu", preset="doll_data")
    over = pipe.settings["overrides"]
    assert over["data"]["phantom#chexpert_train_patients"] == 2400
    assert over["doll"]["doll#ig#explainer"] == "ig_gradcam"
    assert set(over["doll"]["doll#post#class_threshold_values"]) == set(OBSERVATIONS[1:])  # every finding, no No Finding
    assert pipe.settings["classifiers"] == default.settings["classifiers"]   # the rest is the default run
    assert pipe.settings["sweep"] == default.settings["sweep"]
    assert pipe.paths["data_root"] == str(RUNNER_ROOT / "doll_data" / "data")  # never the default run's folders
    assert Pipeline(False, "cpu", root=tmp_path, preset="doll_data").paths["data_root"] == str(tmp_path / "data")
    quick = Pipeline(True, "cpu", preset="doll_data").settings["overrides"]
    assert quick["data"]["phantom#chexpert_train_patients"] == 2400 and quick["data"]["phantom#scr_cases"] == 24
    with pytest.raises(SystemExit, match="doll_data"):              # the message lists the presets
        Pipeline(False, "cpu", preset="nope")
    with pytest.raises(SystemExit):
        Pipeline(False, "cpu", preset="quick")                       # a base section is not a preset


def test_concurrent_processes_share_a_new_tracking_store(tmp_path):
    """Concurrent stages (classifiers, sweep cells) open one new SQLite store at once: MLflow's schema creation and
    experiment creation are serialised by bundle.tracking.store_lock, so every run lands."""
    import subprocess
    import sys

    import mlflow

    uri = f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}"
    code = ("import sys; from bundle.tracking import log_run; "
            "log_run(sys.argv[1], 'cxr_doll_concurrent', 'run' + sys.argv[2], metrics={'m': float(sys.argv[2])})")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("cxr_doll_concurrent").experiment_id])
    assert sorted(r.data.metrics["m"] for r in runs) == [0.0, 1.0, 2.0, 3.0]


def test_datalist_policy_reads_the_recorded_policy():
    from bundle.data.datalists import datalist_policy

    overrides = {"train_csv": {"policy": {"default": "ignore", "No Finding": "zeros"}}}
    assert datalist_policy({"summary": overrides}) == "{'default': 'ignore', 'No Finding': 'zeros'}"
    assert datalist_policy({"summary": {"train_csv": {"policy": "ones"}}}) == "ones"
    assert datalist_policy({"training": []}) == "unknown"


def test_pooled_workflow_runs_like_a_bundle_process(tmp_path, monkeypatch):
    """A workflow run in the runners' process pool (forked from a server that imported MONAI once) gets its own
    log (native output included), the requested threads, the allocator settings and the exit status a
    `monai.bundle run` process would."""
    from scripts.processes import MALLOC_ENV, process_pool, run_workflows_in_child

    for key in MALLOC_ENV:   # the pool adds them (a server started earlier in this process had them too)
        monkeypatch.delenv(key, raising=False)

    config = tmp_path / "probe.yaml"
    config.write_text(
        "imports: ['$import torch', '$import os']\n"
        "out: ''\n"
        "run:\n"
        "  - \"$print('probe says hello', flush=True)\"\n"
        "  - \"$open(@out, 'w').write(str(torch.get_num_threads()) + ' ' + str(torch.zeros(3).sum().item()) + ' '"
        " + str(b'MALLOC_TRIM_THRESHOLD_=' in open('/proc/self/environ', 'rb').read()))\"\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("run:\n  - \"$1 / 0\"\n")
    out = tmp_path / "out.txt"
    with process_pool(2) as pool:
        ok = pool.submit(run_workflows_in_child, [{"name": "probe", "configs": [str(config)],
                                                   "args": {"out": str(out)}}], str(tmp_path / "ok.log"), 1)
        bad = pool.submit(run_workflows_in_child, [{"name": "broken", "configs": [str(broken)], "args": {}}],
                          str(tmp_path / "bad.log"), 1)
        assert ok.result() == 0 and bad.result() == 1
    threads, total, tuned = out.read_text().split()
    assert (threads, total) == ("1", "0.0")                                # one thread, as asked
    # the environment the process started with (what glibc read: the server's, inherited by the fork)
    assert tuned == "True"
    assert "probe says hello" in (tmp_path / "ok.log").read_text()
    assert "ZeroDivisionError" in (tmp_path / "bad.log").read_text()      # the traceback is in the run's log
    assert "probe says hello" not in (tmp_path / "bad.log").read_text()


def test_sweep_collect_only_writes_the_finished_runs_and_trains_nothing(tmp_path):
    """A long protocol analysed part-way: --collect_only gathers the finished runs' CSVs, marks the others missing,
    and starts no training or pre-training (no log folder, no MLflow store)."""
    from scripts.sweep import SweepGrid, metrics_csv, run_sweep

    grid = SweepGrid.from_mapping({"tasks": ["scr"], "inits": ["doll", "scratch", "doll_shuffled"], "sizes": [4],
                                   "seeds": [0]})
    runs = grid.runs()
    out = tmp_path / "eval"
    finished = metrics_csv(out, runs[1])
    finished.parent.mkdir(parents=True)
    finished.write_text("task,init,train_size,seed,mode,split,image,structure,dice\n"
                        "scr,scratch,4,0,full,test,a,lungs,0.9\nscr,scratch,4,0,full,test,a,heart,0.8\n")
    paths = {"data_root": str(tmp_path / "data"), "output_root": str(out), "models_dir": str(tmp_path / "models")}
    result = run_sweep(grid, paths, collect_only=True)
    assert [r.status for r in result.runs] == ["missing", "skipped", "missing"]
    frame = __import__("pandas").read_csv(result.csv_path)
    assert result.csv_path == str(out / "segmentation" / "sweep_test.csv") and len(frame) == result.num_rows == 2
    assert set(frame["init"]) == {"scratch"} and result.mlflow_run_id is None
    assert not (out / "segmentation" / "logs").exists() and not (out / "mlruns.db").exists()
    assert not (tmp_path / "models").exists()  # the shuffled control's pre-training was not started


def test_a_second_grid_in_the_same_folder_keeps_the_first_grids_runs_in_the_table(tmp_path):
    """The folder's sweep_test.csv (what the analysis reads) lists every finished run of the folder, whichever grid
    made it, listed runs first in their order; a run whose per-run CSV is deleted drops out; --output_csv holds one
    grid alone."""
    import pandas as pd

    from scripts.sweep import SweepGrid, metrics_csv, run_sweep

    out = tmp_path / "eval"
    paths = {"data_root": str(tmp_path / "data"), "output_root": str(out), "models_dir": str(tmp_path / "models")}

    def finish(run, dice):
        path = metrics_csv(out, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("task,init,train_size,seed,mode,split,image,structure,dice,arch\n"
                        f"{run.task},{run.init},{run.train_size},{run.seed},{run.mode},test,a,lungs,{dice},"
                        f"{run.arch}\n")

    first = SweepGrid.from_mapping({"tasks": ["scr"], "inits": ["doll", "scratch"], "sizes": [4], "seeds": [0]})
    second = SweepGrid.from_mapping({"tasks": ["scr"], "inits": ["scratch"], "sizes": [4], "seeds": [0, 1],
                                     "overrides": {"seg_arch": "unet"}})
    for k, run in enumerate(first.runs() + second.runs()):
        finish(run, 0.5 + k / 10)
    run_sweep(first, paths, collect_only=True)
    result = run_sweep(second, paths, collect_only=True)
    frame = pd.read_csv(result.csv_path)
    assert list(zip(frame["init"], frame["seed"], frame["arch"])) == [
        ("doll", 0, "segresnet"), ("scratch", 0, "segresnet"), ("scratch", 0, "unet"), ("scratch", 1, "unet")]
    assert [r["init"] for r in result.summary] == ["scratch"] and result.summary[0]["n_seeds"] == 2
    metrics_csv(out, first.runs()[0]).unlink()
    frame = pd.read_csv(run_sweep(first, paths, collect_only=True).csv_path)
    assert list(zip(frame["init"], frame["arch"])) == [("scratch", "segresnet"), ("scratch", "unet"),
                                                       ("scratch", "unet")]
    alone = run_sweep(second, paths, output_csv=str(tmp_path / "second.csv"), collect_only=True)
    assert set(pd.read_csv(alone.csv_path)["arch"]) == {"unet"} and alone.num_rows == 2
    # a table that lost runs (written by an older version, or deleted): the folder's finished runs come back
    Path(alone.csv_path).replace(out / "segmentation" / "sweep_test.csv")
    frame = pd.read_csv(run_sweep(first, paths, collect_only=True).csv_path)
    assert list(zip(frame["init"], frame["arch"])) == [("scratch", "unet"), ("scratch", "unet"),
                                                       ("scratch", "segresnet")]
    (out / "segmentation" / "sweep_test.csv").unlink()
    frame = pd.read_csv(run_sweep(second, paths, collect_only=True).csv_path)
    assert list(zip(frame["seed"], frame["arch"])) == [(0, "unet"), (1, "unet"), (0, "segresnet")]


def test_pretrain_over_processes_shares_the_batch_out(monkeypatch):
    """pretrain_processes > 1 on CPU: torchrun with configs/multi_gpu_pretrain.yaml and batch_size / nproc per rank (a
    step still sees the single-process batch); 1, or CUDA: the plain config; an indivisible batch is refused."""
    calls = []
    pipe = Pipeline(False, "cpu")
    monkeypatch.setattr(pipe, "bundle_run", lambda name, configs, overrides=None, threads=None, launcher=None:
                        calls.append((configs, overrides, threads, launcher)))
    batch = yaml.safe_load((ROOT / "configs" / "pretrain.yaml").read_text())["batch_size"]
    pipe.settings["pretrain_processes"] = 2
    pipe.pretrain()
    configs, overrides, threads, launcher = calls[-1]
    assert configs == ["pretrain.yaml", "multi_gpu_pretrain.yaml"] and overrides["batch_size"] == batch // 2
    assert "--nproc_per_node=2" in launcher and threads == max(1, len(os.sched_getaffinity(0)) // 2)
    pipe.settings["overrides"]["pretrain"] = {"batch_size": 12}
    pipe.pretrain()
    assert calls[-1][1]["batch_size"] == 6
    pipe.settings["overrides"]["pretrain"] = {"batch_size": 7}
    with pytest.raises(SystemExit, match="not divisible"):
        pipe.pretrain()
    pipe.settings["pretrain_processes"] = 1
    pipe.pretrain()
    assert calls[-1][0] == ["pretrain.yaml"] and calls[-1][1]["batch_size"] == 7 and calls[-1][3] is None
    cuda = Pipeline(False, "cuda")
    monkeypatch.setattr(cuda, "bundle_run", lambda name, configs, overrides=None, threads=None, launcher=None:
                        calls.append((configs, overrides, threads, launcher)))
    cuda.settings["pretrain_processes"] = 2
    cuda.pretrain()
    assert calls[-1][0] == ["pretrain.yaml"]                          # one process per GPU is torchrun's business

"""Publishing a finished run into docs/results/<name>/: the files are copied, the run times are read back from MLflow
(hand-set start and end times), the per-cell seeds are counted, and a failed publish leaves the old results whole."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest

from bundle.reporting.publish import compute_summary, publish_results, run_times, runs_of_sweep, runs_per_cell
from bundle.utils import BundleInputError

PREFIX = "pubtest"
#: (experiment stage, run name, tags, start ms, end ms): finished runs with known wall times, one unfinished
RUNS = [
    ("finetune", "scr_doll_n4_seed0", {"stage": "finetune", "task": "scr", "arch": "segresnet", "init": "doll",
                                       "train_size": "4", "seed": "0"}, 1_000_000, 1_130_500),
    ("finetune", "scr_doll_n4_seed0_eval_test", {"stage": "evaluate", "task": "scr", "arch": "segresnet",
                                                 "init": "doll", "train_size": "4", "seed": "0"}, 1_200_000, 1_201_000),
    ("finetune", "scr_scratch_n4_seed1_unet", {"stage": "finetune", "task": "scr", "arch": "unet", "init": "scratch",
                                               "train_size": "4", "seed": "1"}, 2_000_000, 2_100_000),
    ("pretrain", "segresnet_doll", {"stage": "pretrain", "arch": "segresnet", "labels": "doll"}, 500_000, 750_000),
    ("pretrain", "unet_doll", {"stage": "pretrain", "arch": "unet", "labels": "doll"}, 3_000_000, None),  # running
    # not in the published sweep: another task's run and a control's pre-training (tagged "doll" as older runs were;
    # its pretrain_labels param says gradcam)
    ("finetune", "real_lungs_doll_n2_seed0", {"stage": "finetune", "task": "real_lungs", "arch": "segresnet",
                                              "init": "doll", "train_size": "2", "seed": "0"}, 4_000_000, 4_300_000),
    ("pretrain", "segresnet_gradcam", {"stage": "pretrain", "arch": "segresnet", "labels": "doll"}, 600_000, 700_000),
]
PARAMS = {"segresnet_gradcam": {"pretrain_labels": "gradcam"}, "segresnet_doll": {"pretrain_labels": "doll"}}


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    import mlflow
    from monai.utils import path_to_sqlite_uri

    root = tmp_path_factory.mktemp("published_run") / "eval"
    (root / "report" / "tables").mkdir(parents=True)
    (root / "report" / "figures").mkdir()
    (root / "segmentation").mkdir()
    (root / "report" / "report.md").write_text("# report\n| a | b |\n")
    (root / "report" / "tables" / "seeds.csv").write_text("task,mean\nscr,0.9\n")
    (root / "report" / "figures" / "curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    rows = [{"task": "scr", "init": init, "train_size": "4", "seed": seed, "arch": arch, "image": f"im{i}",
             "structure": "lungs", "dice": 0.9 + 0.01 * i}
            for init, arch, seeds in (("doll", "segresnet", (0, 1, 2)), ("scratch", "unet", (1,)))
            for seed in seeds for i in range(3)]
    pd.DataFrame(rows).to_csv(root / "segmentation" / "sweep_test.csv", index=False)

    uri = path_to_sqlite_uri(str(root / "mlruns.db"))
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments: dict[str, str] = {}
    for stage, name, tags, start, end in RUNS:
        if stage not in experiments:
            experiments[stage] = client.create_experiment(f"{PREFIX}_{stage}")
        run = client.create_run(experiments[stage], start_time=start, tags=tags, run_name=name)
        for key, value in PARAMS.get(name, {}).items():
            client.log_param(run.info.run_id, key, value)
        if end is not None:
            client.set_terminated(run.info.run_id, status="FINISHED", end_time=end)
    return root, uri


def test_run_times_are_read_back_from_mlflow(run_root: tuple[Path, str]) -> None:
    _, uri = run_root
    times = run_times(uri, PREFIX).set_index("run_name")
    # the unfinished run is left out; each wall time is end - start of its run
    assert sorted(times.index) == sorted(r[1] for r in RUNS if r[4] is not None)
    assert times.loc["scr_doll_n4_seed0", "seconds"] == pytest.approx(130.5)
    assert times.loc["scr_doll_n4_seed0_eval_test", "stage"] == "evaluate"  # the run's own stage tag
    assert times.loc["segresnet_doll", "seconds"] == pytest.approx(250.0)
    assert times.loc["segresnet_gradcam", "labels"] == "gradcam"  # the run's labels param wins over its old tag
    summary = compute_summary(times.reset_index()).set_index(["stage", "task", "arch"])
    assert summary.loc[("finetune", "scr", "unet"), "total_s"] == 100
    assert summary.loc[("finetune", "scr", "segresnet"), "runs"] == 1
    assert run_times(uri, "no_such_prefix").empty


def test_runs_per_cell_counts_seeds() -> None:
    sweep = pd.DataFrame({"task": ["scr"] * 5, "init": ["doll"] * 5, "train_size": [4, 4, "all", 4, 16],
                          "seed": [0, 1, 0, 1, 0], "dice": 0.5})
    cells = runs_per_cell(sweep)
    assert list(cells["train_size"]) == ["4", "16", "all"]  # sizes in numeric order, "all" last
    cells = cells.set_index(["init", "train_size"])  # no arch column: SegResNet's runs
    assert cells.loc[("doll", "4"), "seeds"] == 2 and cells.loc[("doll", "4"), "seed_list"] == "0,1"
    assert cells.loc[("doll", "all"), "seeds"] == 1
    assert set(cells["arch"]) == {"segresnet"}


def test_runs_of_sweep_keeps_the_sweeps_runs_and_their_pretrainings(run_root: tuple[Path, str]) -> None:
    root, uri = run_root
    sweep = pd.read_csv(root / "segmentation" / "sweep_test.csv", dtype={"train_size": str})
    kept = runs_of_sweep(run_times(uri, PREFIX), sweep)
    # the sweep's fine-tuning + evaluation runs and the DoLL pre-training of its doll init; not the real-lungs run (no
    # such cell), not the Grad-CAM control's pre-training (no doll_gradcam init), not the unfinished UNet one
    assert sorted(kept["run_name"]) == ["scr_doll_n4_seed0", "scr_doll_n4_seed0_eval_test",
                                        "scr_scratch_n4_seed1_unet", "segresnet_doll"]
    with_control = pd.concat([sweep, sweep.head(1).assign(init="doll_gradcam")], ignore_index=True)
    assert "segresnet_gradcam" in set(runs_of_sweep(run_times(uri, PREFIX), with_control)["run_name"])


def test_publish_writes_the_folder_whole_and_replaces_the_old_one(run_root: tuple[Path, str], tmp_path: Path) -> None:
    root, uri = run_root
    dest = tmp_path / "results" / "full_protocol"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("from an earlier publish")
    out = publish_results(root, dest, uri, PREFIX, command="python scripts/sweep.py --settings full", jobs=2,
                          commit="abc123")
    assert out == dest and not (dest / "stale.txt").exists()
    assert (dest / "report.md").read_text() == (root / "report" / "report.md").read_text()
    assert (dest / "tables" / "seeds.csv").is_file()
    assert (dest / "figures" / "curve.png").read_bytes() == (root / "report" / "figures" / "curve.png").read_bytes()
    with gzip.open(dest / "sweep_test.csv.gz", "rt") as f:
        assert len(pd.read_csv(f)) == 12
    readme = (dest / "README.md").read_text()
    assert "commit `abc123`" in readme and "python scripts/sweep.py --settings full" in readme
    assert "Fine-tuning runs in the per-image CSV: 4" in readme
    # 130.5 + 1 + 100 + 250 s of the sweep's finished runs, two at a time (the other runs of the store left out)
    assert "Sum over the runs: 482 s" in readme and "with 2 runs at once" in readme
    assert "| scr | unet | scratch | 4 | 1 | 1 |" in readme
    assert len(pd.read_csv(dest / "run_times.csv")) == 4
    assert [p.name for p in dest.parent.iterdir()] == ["full_protocol"]  # no temporary folder left


def test_publish_refuses_a_run_without_report_and_keeps_the_old_results(tmp_path: Path) -> None:
    root = tmp_path / "eval"
    (root / "segmentation").mkdir(parents=True)
    dest = tmp_path / "results" / "x"
    dest.mkdir(parents=True)
    (dest / "README.md").write_text("old")
    with pytest.raises(BundleInputError, match=r"report\.md: no report to publish"):
        publish_results(root, dest, "sqlite:///unused.db", PREFIX)
    (root / "report").mkdir()
    (root / "report" / "report.md").write_text("# r\n")
    with pytest.raises(BundleInputError, match=r"sweep_test\.csv: no sweep results"):
        publish_results(root, dest, "sqlite:///unused.db", PREFIX)
    (root / "segmentation" / "sweep_test.csv").write_text("task,init\nscr,doll\n")
    with pytest.raises(BundleInputError, match=r"sweep_test\.csv: missing columns \['dice', 'seed', 'train_size'\]"):
        publish_results(root, dest, "sqlite:///unused.db", PREFIX)
    assert (dest / "README.md").read_text() == "old" and [p.name for p in dest.parent.iterdir()] == ["x"]

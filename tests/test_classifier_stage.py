"""The classifier stage through `python -m monai.bundle run`: it learns on the phantom, logs to MLflow, resumes after a
kill, trains under torchrun (2 gloo processes), and its network definition passes verify_net_in_out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _configs(*names: str) -> str:
    return json.dumps([str(CONFIGS / n) for n in names])


def _run_args(root: Path, *names: str, **overrides) -> list[str]:
    args = ["-m", "monai.bundle", "run", "--config_file", _configs(*names),
            "--datalist", str(root / "datalists" / "chexpert.json"), "--models_dir", str(root / "models"),
            "--output_root", str(root / "eval"), "--image_size", "[64,64]", "--show_progress", "false",
            "--device", "$torch.device('cpu')"]
    for k, v in overrides.items():
        args += [f"--{k}", str(v)]
    return args


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A small phantom CheXpert set at 64 px with its datalist."""
    from bundle.data.datalists import build_all_datalists
    from bundle.data.phantom import generate_phantom_datasets

    root = tmp_path_factory.mktemp("cls")
    generate_phantom_datasets(root / "phantom", seed=0, image_size=64, chexpert_train_patients=150,
                              chexpert_valid_patients=40, scr_cases=2, qata_train=1, qata_test=1, progress=False)
    build_all_datalists(root / "phantom", root / "datalists", seed=0)
    return root


@pytest.fixture(scope="module")
def trained(phantom) -> Path:
    """One classifier trained for a few epochs (shared by the tests below)."""
    res = subprocess.run([sys.executable, *_run_args(phantom, "train_classifier.yaml", max_epochs=5)],
                         cwd=phantom, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return phantom


@pytest.mark.slow
def test_classifier_learns_above_chance(trained):
    ckpt = trained / "models" / "classifiers" / "densenet_small_seed0"
    assert (ckpt / "model.pt").exists() and (ckpt / "classifier.json").exists()
    res = subprocess.run([sys.executable, *_run_args(trained, "train_classifier.yaml", "evaluate_classifier.yaml")],
                         cwd=trained, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((trained / "eval" / "classifiers" / "densenet_small_seed0" / "metrics_test.json").read_text())
    per_class = {k: v for k, v in metrics["metrics"].items() if k.startswith("auroc_")}
    assert len(per_class) >= 8                      # AUROC only where both classes occur, per observation
    assert metrics["metrics"]["val_mean_auroc"] > 0.62, metrics  # clearly above chance (0.5) after 5 short epochs


@pytest.mark.slow
def test_mlflow_run_reads_back(trained):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained / 'eval' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("cxr_doll_classifiers")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    run = runs["densenet_small_seed0"]
    assert run.info.status == "FINISHED"
    assert run.data.params["arch"] == "densenet_small" and run.data.params["max_epochs"] == "5"
    assert run.data.tags["stage"] == "classifier"
    history = client.get_metric_history(run.info.run_id, "val_mean_auroc")
    assert [h.step for h in history] == [1, 2, 3, 4, 5]
    assert client.get_metric_history(run.info.run_id, "train_loss")  # per-iteration loss
    assert "model.pt" in [a.path for a in client.list_artifacts(run.info.run_id)]


@pytest.mark.slow
def test_resume_after_kill_mid_epoch(phantom, tmp_path):
    root = tmp_path
    os.symlink(phantom / "datalists", root / "datalists")
    cmd = [sys.executable, *_run_args(root, "train_classifier.yaml", max_epochs=3)]
    proc = subprocess.Popen(cmd, cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    last = root / "models" / "classifiers" / "densenet_small_seed0" / "last.pt"
    deadline = time.time() + 400
    while time.time() < deadline and not last.exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)             # right after the first epoch's checkpoint: mid-run
    proc.wait()
    saved = torch.load(last, weights_only=True)["trainer"]      # ignite keeps iteration and epoch_length
    done = saved["iteration"] // saved["epoch_length"]
    assert 1 <= done < 3
    res = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "resumed from" in log and f"at epoch {done}" in log
    assert "Epoch[1] Complete" not in log.replace("SupervisedEvaluator - INFO - Epoch[1]", "")
    final = torch.load(last, weights_only=True)["trainer"]
    assert final["iteration"] // final["epoch_length"] == 3
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("cxr_doll_classifiers")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1                           # the resumed run continues the interrupted MLflow run
    steps = [h.step for h in client.get_metric_history(runs[0].info.run_id, "val_mean_auroc")]
    assert steps == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_gloo_processes(phantom, tmp_path):
    os.symlink(phantom / "datalists", tmp_path / "datalists")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_run_args(tmp_path, "train_classifier.yaml", "multi_gpu_train_classifier.yaml", max_epochs=1)]
    res = subprocess.run(cmd, cwd=tmp_path, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = tmp_path / "models" / "classifiers" / "densenet_small_seed0"
    state = torch.load(ckpt / "last.pt", weights_only=True)["trainer"]
    # one epoch; each rank saw half of the training set: half the iterations of a single-process epoch
    n_train = len(json.loads((phantom / "datalists" / "chexpert.json").read_text())["training"])
    assert state["iteration"] == state["epoch_length"] == int(np.ceil(np.ceil(n_train / 2) / 16))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cxr_doll_classifiers").experiment_id])
    assert len(runs) == 1 and "val_mean_auroc" in runs[0].data.metrics   # rank 0 alone logged


@pytest.mark.parametrize("arch", ["densenet_small", "segresnet_encoder", "densenet121"])
def test_verify_net_in_out(arch):
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
           "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", _configs("train_classifier.yaml"),
           "--classifier_arch", arch, "--n", "8", "--_meta_#network_data_format#outputs#pred#num_channels", "14"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "verified with no error" in res.stdout + res.stderr


def test_verify_net_in_out_detects_a_wrong_output_count():
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
           "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", _configs("train_classifier.yaml"),
           "--n", "8"]                                # metadata says 3 output channels (the segmenter), not 14
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert res.returncode != 0 and "doesn't match" in res.stdout + res.stderr


def test_masked_loss_and_auroc_against_references():
    from bundle.networks.losses import MaskedBCEWithLogitsLoss
    from bundle.metrics.classification import auroc, per_class_auroc

    # AUROC: hand-computed (pairs ranked correctly / all pairs, ties count half)
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    labels = np.array([0, 0, 1, 1, 1])
    # positive/negative pairs: (.35,.1)=1 (.35,.4)=0 (.8,.1)=1 (.8,.4)=1 (.4,.1)=1 (.4,.4)=0.5
    assert auroc(scores, labels) == pytest.approx(4.5 / 6)
    assert np.isnan(auroc(scores, np.ones(5)))           # one class only: undefined
    table = per_class_auroc(np.stack([scores, scores], 1), np.stack([labels, [np.nan, 0, 1, 1, np.nan]], 1))
    assert table[1] == pytest.approx(0.5)                 # NaN labels left out: pairs (.35,.4)=0, (.8,.4)=1
    # masked BCE equals torch's BCE over the labelled entries only
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    target = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, float("nan")]])
    valid = ~torch.isnan(target)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[valid], target[valid])
    assert MaskedBCEWithLogitsLoss()(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)

"""Segmentation stages: DoLL pre-training (configs/pretrain.yaml), fine-tuning (configs/train.yaml), evaluation
(configs/evaluate.yaml), multi-process fine-tuning (configs/multi_gpu_train.yaml), the low-data sweep
(scripts/sweep.py) and their helpers (bundle.tasks, bundle.networks.finetune, bundle.transforms, ...).

The end-to-end tests share one tiny phantom (64 px, a few cases) and an oracle DoLL made from its true lesion masks,
and run the configs as ``python -m monai.bundle run`` subprocesses with tiny budgets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bundle.handlers.checkpoint import ResumableCheckpoint
from bundle.metrics.segmentation import MultiLabelDice, per_channel_dice
from bundle.networks.finetune import FinetuneInit, build_finetune_network
from bundle.tasks import epochs_for, parse_train_size, run_name, subset_items, task_spec
from bundle.transforms import RandAffineJointd, ResizeLiked, ResizeMaskd
from tests.helpers import write_oracle_doll

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
PREFIX = "segtest"


# ----------------------------------------------------------------------------------------------------------------
# helpers and fixtures
# ----------------------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def bundle_run(configs: list[str], overrides: dict[str, Any], torchrun: int = 0,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` (or torchrun with ``torchrun`` processes) on ``configs``; output captured."""
    files = json.dumps([str(CONFIGS / c) for c in configs])
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={torchrun}", "-m", "monai.bundle", "run", "--config_file", files]
    else:
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        cmd += [f"--{key}", _fmt(value)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if torchrun else os.environ.get(
        "OMP_NUM_THREADS", "2")}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def check(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny phantom (64 px), its datalists and an oracle DoLL datalist (true lesion masks as DoLL)."""
    from bundle.data.datalists import build_all_datalists
    from bundle.data.phantom import generate_phantom_datasets

    root = tmp_path_factory.mktemp("segstage")
    data = root / "data"
    generate_phantom_datasets(data / "phantom", image_size=64, chexpert_train_patients=8,
                              chexpert_valid_patients=2, scr_cases=8, qata_train=4, qata_test=2, progress=False,
                              num_workers=0)
    build_all_datalists(data / "phantom", data / "datalists", real_lungs_dir=None)
    counts = write_oracle_doll(data / "datalists" / "chexpert.json", data / "doll",
                                   data / "datalists" / "doll.json", (64, 64))
    assert counts["training"] > 0 and counts["validation"] > 0
    overrides = {"data_root": str(data), "output_root": str(root / "eval"), "models_dir": str(root / "models"),
                 "image_size": [64, 64], "show_progress": False, "device": "$torch.device('cpu')",
                 "mlflow_experiment_prefix": PREFIX}
    return {"root": root, "overrides": overrides, "tracking_uri": _tracking_uri(root / "eval")}


def _tracking_uri(output_root: Path) -> str:
    from monai.utils import path_to_sqlite_uri

    return path_to_sqlite_uri(str(output_root / "mlruns.db"))


def _runs(uri: str, experiment: str) -> list[Any]:
    from bundle.tracking import read_runs

    return read_runs(uri, experiment)


FT = {"task": "scr", "init": "doll", "train_size": 2, "seed": 0, "num_iterations": 2, "epoch_length": 1,
      "batch_size": 4}


@pytest.fixture(scope="module")
def pretrained(env: dict[str, Any]) -> Path:
    """configs/pretrain.yaml for one epoch on the oracle DoLL; returns the best checkpoint."""
    out = check(bundle_run(["pretrain.yaml"], {**env["overrides"], "max_epochs": 1, "batch_size": 8}))
    env["pretrain_log"] = out
    return env["root"] / "models" / "pretrain" / "segresnet_doll" / "model.pt"


@pytest.fixture(scope="module")
def finetuned(env: dict[str, Any], pretrained: Path) -> Path:
    """configs/train.yaml (scr, doll init, 2 images): first stopped after epoch 1 through MONAI Label's
    ``train#trainer#max_epochs`` override, then re-run to resume and finish epoch 2. Returns the run's folder."""
    first = check(bundle_run(["train.yaml"], {**env["overrides"], **FT, "train#trainer#max_epochs": 1}))
    second = check(bundle_run(["train.yaml"], {**env["overrides"], **FT}))
    env["train_logs"] = (first, second)
    return env["root"] / "models" / "segmentation" / "scr_doll_n2_seed0"


@pytest.fixture(scope="module")
def evaluated(env: dict[str, Any], finetuned: Path) -> Path:
    """configs/evaluate.yaml on the fine-tuned run; returns its evaluation folder."""
    env["eval_log"] = check(bundle_run(["train.yaml", "evaluate.yaml"], {**env["overrides"], **FT}))
    return env["root"] / "eval" / "segmentation" / "scr_doll_n2_seed0"


# ----------------------------------------------------------------------------------------------------------------
# helpers of the segmentation stages (fast)
# ----------------------------------------------------------------------------------------------------------------
def test_task_specs_and_names() -> None:
    assert task_spec("scr").structures == ("lungs", "heart", "clavicles")
    assert task_spec("scr").union_groups_list() == [[0, 1], [2], [3, 4]]
    assert task_spec("infection").datalist == "qata.json" and task_spec("infection").num_classes == 1
    assert task_spec("real_lungs").union_groups is None
    with pytest.raises(ValueError, match="unknown segmentation task"):
        task_spec("liver")
    assert run_name("scr", "doll", 4, 1) == "scr_doll_n4_seed1"
    assert run_name("scr", "scratch", "all", 0, "adapter") == "scr_scratch_nall_seed0_adapter"
    assert parse_train_size("all") is None and parse_train_size(-1) is None
    assert parse_train_size("8") == 8
    for bad in (0, -3, "few"):
        with pytest.raises(ValueError, match="train_size"):
            parse_train_size(bad)
    assert epochs_for(150, 15) == 10 and epochs_for(151, 15) == 11 and epochs_for(1, 15) == 1


def test_config_ids_for_monai_label_and_sweep_grid() -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    for key in ("train#trainer", "train#dataset", "train#dataset#data", "train#handlers", "validate#evaluator",
                "validate#dataset#data", "validate#handlers", "val_interval", "network_def", "network", "device",
                "train#trainer#max_epochs", "task", "init", "mode", "train_size", "seed", "num_iterations"):
        assert parser.get(key) is not None, key
    # every train handler is a component dict (MONAI Label reads them with .get("_target_"))
    assert all(isinstance(h, dict) and "_target_" in h for h in parser.get("train#handlers"))
    targets = [h["_target_"].rsplit(".", 1)[-1] for h in parser.get("train#handlers")]
    assert targets[0] == "EpochSeed"          # first, so that a resumed run re-seeds every epoch as a whole run does
    # the plateau rule runs after the validation and before the checkpoint handler saves its counter
    assert targets.index("ValidationHandler") < targets.index("TrainerEarlyStop") < targets.index("ResumableCheckpoint")
    sys.path.insert(0, str(REPO / "scripts"))
    import sweep

    runs = sweep.make_grid(["scr"], ["doll", "scratch"], ["all", 4, "2"], [0, 1])
    assert len(runs) == 12 and [r.train_size for r in runs[:6]] == ["2", "2", "4", "4", "all", "all"]
    with pytest.raises(ValueError, match="unknown init"):
        sweep.make_grid(["scr"], ["imagenet"], [2], [0])
    with pytest.raises(ValueError, match="unknown task"):
        sweep.make_grid(["liver"], ["doll"], [2], [0])


def test_subset_items_nested_and_seeded() -> None:
    items = [{"image": f"/x/{i}.png", "patient": f"p{i // 2}"} for i in range(20)]
    subsets = {n: subset_items(items, n, seed=3) for n in (2, 4, 8)}
    images = {n: {it["image"] for it in s} for n, s in subsets.items()}
    assert [len(images[n]) for n in (2, 4, 8)] == [2, 4, 8]
    assert images[2] <= images[4] <= images[8]  # nested
    assert len({it["patient"] for it in subsets[4]}) == 4  # spread over patients
    assert subsets[4] == subset_items(items, 4, seed=3)  # deterministic
    assert images[4] != {it["image"] for it in subset_items(items, 4, seed=4)}  # the seed matters
    assert len(subset_items(items, "all", seed=0)) == 20 and len(subset_items(items, 50, seed=0)) == 20


def test_multilabel_dice_and_resize() -> None:
    from ignite.engine import Engine

    pred = torch.zeros(2, 2, 4, 4)
    ref = torch.zeros(2, 2, 4, 4)
    pred[0, 0, :2] = 1
    ref[0, 0, :1] = 1  # dice 2*4/(8+4) = 2/3
    pred[1, 0, :2] = 1
    ref[1, 0, :2] = 1  # dice 1
    pred[0, 1, 0, 0] = 1  # channel 1: empty references everywhere
    metric = MultiLabelDice(names=["a", "b"], ignore_empty=True, prefix="dice_")
    engine = Engine(lambda e, b: b)
    metric.attach(engine, "mean_dice")
    engine.run([(pred, ref)], max_epochs=1)
    assert engine.state.metrics["mean_dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert engine.state.metrics["dice_a"] == pytest.approx((2 / 3 + 1) / 2)
    assert "dice_b" not in engine.state.metrics  # only empty references: ignored
    strict = per_channel_dice(pred, ref, ignore_empty=False)
    assert strict[0, 1].item() == 0.0 and strict[1, 1].item() == 1.0  # false positive vs both empty

    resized = ResizeLiked("pred", "label")({"pred": torch.ones(3, 8, 8), "label": torch.zeros(3, 16, 12)})
    assert tuple(resized["pred"].shape) == (3, 16, 12) and torch.allclose(resized["pred"], torch.ones(1))


def test_resize_mask_stays_on_the_image_grid() -> None:
    """Halving a mask keeps it registered with its area-resized image: over every parity of position and size, a
    square's centre (in source pixels) moves by 0 on average (+-0.5 per case, where a half-covered edge pixel is
    kept); nearest resizing (MONAI's Resized(mode="nearest"): the top-left pixel of each 2x2 block) moves it by +0.5
    on average, down and right, the bug this replaced (hand-computed: a square [a, a + n) gives centre shifts
    0 / +1 for a even / odd with nearest)."""
    from monai.transforms import Resized
    from scipy import ndimage

    from bundle.data.io import resample_image, resize_mask

    def centre(m: np.ndarray, scale: float) -> np.ndarray:  # centre of mass in source pixel coordinates
        return (np.asarray(ndimage.center_of_mass(m.astype(float))) + 0.5) * scale - 0.5

    shifts: dict[str, list[np.ndarray]] = {"ours": [], "nearest": [], "image": []}
    for a in (100, 101):
        for b in (60, 61):
            for n in (40, 41):
                mask = np.zeros((256, 256), np.uint8)
                mask[a:a + n, b:b + n + 6] = 1
                truth = centre(mask, 1.0)
                ours = resize_mask(mask, (128, 128))
                assert ours.dtype == bool and ours.shape == (128, 128)
                shifts["ours"].append(centre(ours, 2.0) - truth)
                near = Resized("m", (128, 128), mode="nearest")({"m": torch.as_tensor(mask[None])})["m"][0].numpy()
                shifts["nearest"].append(centre(near, 2.0) - truth)
                shifts["image"].append(centre(resample_image(mask.astype(np.float32), (128, 128)), 2.0) - truth)
    mean = {k: np.mean(v, axis=0) for k, v in shifts.items()}
    assert np.abs(mean["ours"]).max() < 1e-9
    assert np.abs(np.asarray(shifts["ours"])).max() <= 0.5 + 1e-9
    assert np.abs(np.asarray(shifts["image"])).max() < 0.02  # the image itself: its centre, every case
    assert np.allclose(mean["nearest"], 0.5)
    # hand-computed case: a 2x2 block at an odd offset covers four output pixels by a quarter each (dropped), a
    # 2-pixel bar covering half of each block is kept (coverage 0.5 counts)
    small = np.zeros((4, 4), np.uint8)
    small[1:3, 1:3] = 1
    assert not resize_mask(small, (2, 2)).any()
    small[:] = 0
    small[:, 1:3] = 1
    assert resize_mask(small, (2, 2)).all()
    # growing keeps the grid (bilinear coverage): a 2x upsampled pixel becomes the 2x2 block it covers
    grown = resize_mask(np.eye(3, dtype=bool), (6, 6))
    assert grown.sum() == 3 * 4 and grown[0:2, 0:2].all()
    # the dictionary transform: every channel, the input's dtype, identity at the target size
    stack = torch.as_tensor(np.stack([mask, 1 - mask]), dtype=torch.uint8)
    out = ResizeMaskd("label", (128, 128))({"label": stack})["label"]
    assert out.dtype == torch.uint8 and tuple(out.shape) == (2, 128, 128)
    assert torch.equal(out[0], torch.as_tensor(ours, dtype=torch.uint8))
    same = ResizeMaskd("label", (256, 256))({"label": stack})["label"]
    assert same is stack


def test_rand_affine_joint_moves_image_and_mask_together() -> None:
    square = torch.zeros(1, 32, 48)
    square[:, 8:20, 10:30] = 1
    data = {"image": square.clone(), "label": square.to(torch.uint8)}
    identity = RandAffineJointd(["image", "label"], prob=1.0, mode=["bilinear", "nearest"])(data)
    assert torch.allclose(identity["image"], square, atol=1e-5) and torch.equal(identity["label"], data["label"])
    aug = RandAffineJointd(["image", "label"], prob=1.0, rotate_range=0.3, scale_range=0.1, translate_range=4,
                               mode=["bilinear", "nearest"], padding_mode=["border", "zeros"])
    aug.set_random_state(seed=7)
    out = aug(data)
    assert out["label"].dtype == torch.uint8 and set(out["label"].unique().tolist()) <= {0, 1}
    assert not torch.equal(out["label"], data["label"])  # it moved
    agree = ((out["image"] > 0.5) == (out["label"] > 0)).float().mean()
    assert agree > 0.97  # the mask follows the image
    aug.set_random_state(seed=7)
    assert torch.equal(aug(data)["label"], out["label"])  # seeded
    assert RandAffineJointd(["image"], prob=0.0, rotate_range=1.0)(data)["image"] is data["image"]


def test_resumable_training_honours_max_epochs(tmp_path: Path) -> None:
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    def trainer(max_epochs: int) -> SupervisedTrainer:
        net = torch.nn.Conv2d(1, 1, 1)
        opt = torch.optim.Adam(net.parameters())
        data = [{"image": torch.zeros(2, 1, 4, 4), "label": torch.zeros(2, 1, 4, 4)}] * 3
        return SupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=data, network=net,
                                 optimizer=opt, loss_function=torch.nn.MSELoss(),
                                 train_handlers=[ResumableCheckpoint(str(tmp_path), net, opt)])

    first = trainer(1)
    first.run()
    assert (first.state.epoch, first.state.iteration) == (1, 3)
    second = trainer(3)
    started = []
    second.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    second.run()
    assert started == [2, 3] and (second.state.epoch, second.state.iteration) == (3, 9)  # resumed after epoch 1
    third = trainer(3)
    calls = []
    third.add_event_handler(Events.ITERATION_COMPLETED, lambda e: calls.append(1))
    third.run()
    assert calls == []  # already complete: nothing trained
    assert torch.load(tmp_path / "last.pt", weights_only=True)["trainer"]["iteration"] == 9


def test_finetune_init_modes_and_errors(tmp_path: Path) -> None:
    from bundle.networks.segmentation import build_segmenter, head_parameter_names
    from bundle.utils import BundleInputError

    scratch = FinetuneInit(build_finetune_network("segresnet", 3, "warmup"), "scratch", mode="warmup",
                               warmup_epochs=2, report_path=tmp_path / "r.json")
    assert scratch.report is None and type(scratch.handler).__name__ == "EncoderWarmupHandler"
    assert json.loads((tmp_path / "r.json").read_text())["init"] == "scratch"

    source = build_segmenter("segresnet", out_channels=14)
    torch.save(source.state_dict(), tmp_path / "doll.pt")
    adapted = FinetuneInit(build_finetune_network("segresnet", 3, "adapter"), "doll", tmp_path / "doll.pt",
                               mode="adapter")
    trainable = {n for n, p in adapted.network.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n or n in head_parameter_names(adapted.network) for n in trainable)
    assert adapted.handler is None  # only the warmup mode has a handler (FinetuneHandler attaches nothing else)
    assert adapted.tracking_params["transfer_loaded"] == len(adapted.report.loaded) > 0

    with pytest.raises(ValueError, match="needs a weights file"):
        FinetuneInit(build_finetune_network("segresnet", 1), "external", "")
    with pytest.raises(BundleInputError, match="run configs/pretrain.yaml first"):
        FinetuneInit(build_finetune_network("segresnet", 1), "doll", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown init"):
        FinetuneInit(build_finetune_network("segresnet", 1), "imagenet")


def test_train_config_starts_the_head_at_the_training_labels_foreground(env: dict[str, Any]) -> None:
    """configs/train.yaml's default output-bias prior: the mean foreground fraction of the run's training labels
    (the subset of train_size), read from the mask files here with PIL, and the new head's bias at its logit."""
    from PIL import Image
    from monai.bundle import ConfigParser

    from bundle.networks.segmentation import head_module_names

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({**env["overrides"], "task": "infection", "init": "scratch", "train_size": 3, "seed": 0,
                   "cpu_bf16": False})
    items = parser.get_parsed_content("train#dataset#data")
    assert len(items) == 3
    ref = float(np.mean([(np.asarray(Image.open(it["label"]).convert("L")) > 127).mean() for it in items]))
    assert 0.01 < ref < 0.5                                      # not a clipped bound: the data's own figure
    prior = parser.get_parsed_content("output_bias_prior")
    assert prior == pytest.approx([ref], abs=1e-6)
    net = parser.get_parsed_content("network")
    head = net.get_submodule(head_module_names(net)[-1])
    bias = [m for m in head.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1].bias
    assert torch.sigmoid(bias).tolist() == pytest.approx([ref], rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# stages end to end (subprocesses)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_writes_checkpoint_and_mlflow(env: dict[str, Any], pretrained: Path) -> None:
    assert pretrained.is_file() and (pretrained.parent / "last.pt").is_file()
    sd = torch.load(pretrained, map_location="cpu", weights_only=True)
    assert sd["conv_final.2.conv.weight"].shape[0] == 14  # 14 DoLL outputs
    runs = _runs(env["tracking_uri"], f"{PREFIX}_pretrain")
    assert runs, "no MLflow pre-training run"
    run = runs[0]
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["arch"] == "segresnet"
    assert "val_mean_dice" in run.data.metrics and "val_lesion_dice" in run.data.metrics  # DoLL + true lesions
    assert 0.0 <= run.data.metrics["val_lesion_dice"] <= 1.0
    assert run.data.params["background_weight"] == "0.1"


@pytest.mark.slow
def test_doll_init_loads_every_non_head_tensor(env: dict[str, Any], pretrained: Path, finetuned: Path) -> None:
    from bundle.networks.segmentation import head_module_names, matches_prefix

    pre = torch.load(pretrained, map_location="cpu", weights_only=True)
    # the report written by the fine-tuning run: every non-head tensor loaded, only the head re-initialised
    report = json.loads((finetuned / "transfer_report.json").read_text())
    head_keys = [k for k in pre if k.startswith("conv_final.2.")]
    assert sorted(report["reinitialised"]) == sorted(head_keys)
    assert sorted(report["report"]["loaded"]) == sorted(k for k in pre if k not in head_keys)
    # and the same transfer in this process, checked tensor by tensor against the pre-training checkpoint
    net = build_finetune_network("segresnet", 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    init = FinetuneInit(net, "doll", pretrained)
    head = head_module_names(net)
    after = init.network.state_dict()
    for key, value in after.items():
        if matches_prefix(key, head):
            assert value.shape[0] == 3 and torch.equal(value, before[key])  # new head, fresh init kept
        else:
            assert torch.equal(value, pre[key]), key
    assert init.report.non_head_fraction == 1.0


@pytest.mark.slow
def test_finetune_resumes_and_tracks(env: dict[str, Any], finetuned: Path) -> None:
    first, second = env["train_logs"]
    assert "resuming at epoch" not in first
    assert "resuming at epoch 1 of 2" in second  # the second run continued after the first run's epoch
    last = torch.load(finetuned / "last.pt", map_location="cpu", weights_only=True)
    assert last["trainer"]["iteration"] == 2 * FT["epoch_length"]  # two epochs in all
    assert (finetuned / "model.pt").is_file()
    runs = [r for r in _runs(env["tracking_uri"], f"{PREFIX}_finetune") if r.info.run_name == "scr_doll_n2_seed0"]
    assert runs
    tags, params = runs[0].data.tags, runs[0].data.params
    assert {k: tags[k] for k in ("init", "task", "train_size", "seed", "mode")} == {
        "init": "doll", "task": "scr", "train_size": "2", "seed": "0", "mode": "full"}
    assert params["n_train"] == "2" and int(params["transfer_loaded"]) > 0
    assert "val_mean_dice" in runs[0].data.metrics and "val_dice_heart" in runs[0].data.metrics
    import mlflow

    artifacts = [a.path for a in mlflow.MlflowClient(env["tracking_uri"]).list_artifacts(runs[0].info.run_id)]
    assert "transfer_report.json" in artifacts  # the TransferReport, logged with the run


@pytest.mark.slow
def test_mismatched_checkpoint_fails_clearly(env: dict[str, Any], tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    from bundle.networks.segmentation import build_segmenter

    unet = tmp_path / "unet_doll.pt"
    torch.save(build_segmenter("unet", out_channels=14).state_dict(), unet)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({**{k: v for k, v in env["overrides"].items()}, "init": "doll", "init_checkpoint": str(unet),
                   "models_dir": str(tmp_path)})
    parser.parse(True)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("network")
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    message = "\n".join(chain)
    assert str(unet) in message and "0 keys match by name and shape" in message


@pytest.mark.slow
def test_evaluate_writes_per_image_csv(env: dict[str, Any], evaluated: Path) -> None:
    import pandas as pd

    from bundle.utils import load_json

    frame = pd.read_csv(evaluated / "metrics_test.csv")
    for column in ("task", "init", "train_size", "seed", "image", "structure", "dice", "iou", "hd95"):
        assert column in frame.columns
    n_test = len(load_json(env["root"] / "data" / "datalists" / "scr.json")["test"])
    assert len(frame) == 3 * n_test and frame["image"].nunique() == n_test
    assert set(frame["structure"]) == {"lungs", "heart", "clavicles"}
    assert frame["dice"].between(0, 1).all() and frame["iou"].between(0, 1).all()
    assert (frame["iou"] <= frame["dice"] + 1e-12).all()  # IoU <= Dice
    assert (frame["task"] == "scr").all() and (frame["init"] == "doll").all() and (frame["seed"] == 0).all()
    masks = sorted((evaluated / "masks_test").glob("*.png"))
    assert len(masks) == 3 * n_test
    from PIL import Image

    assert Image.open(masks[0]).size == (64, 64)  # the label's original size
    summary = load_json(evaluated / "metrics_test.json")
    assert summary["metrics"]["test_mean_dice"] == pytest.approx(frame["dice"].mean())
    runs = [r for r in _runs(env["tracking_uri"], f"{PREFIX}_finetune")
            if r.info.run_name == "scr_doll_n2_seed0_eval_test"]
    assert runs and runs[0].data.tags["stage"] == "evaluate" and "test_dice_lungs" in runs[0].data.metrics


@pytest.mark.slow
def test_sweep_skips_finished_runs(env: dict[str, Any], evaluated: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import sweep

    paths = {k: env["overrides"][k] for k in ("data_root", "output_root", "models_dir")}
    overrides = {k: v for k, v in env["overrides"].items() if k not in paths}
    overrides.update(num_iterations=1, epoch_length=1, batch_size=4)
    grid = sweep.SweepGrid(tasks=["scr"], inits=["doll", "scratch"], sizes=[2], seeds=[0], overrides=overrides)
    result = sweep.run_sweep(grid, paths)
    assert [(r.name, r.status) for r in result.runs] == [("scr_doll_n2_seed0", "skipped"),
                                                         ("scr_scratch_n2_seed0", "done")]
    import pandas as pd

    frame = pd.read_csv(result.csv_path)
    assert list(frame.columns[:9]) == ["task", "init", "train_size", "seed", "mode", "split", "n_train", "image",
                                       "structure"]
    assert set(frame["init"]) == {"doll", "scratch"} and result.num_rows == len(frame)
    assert result.mlflow_run_id is not None
    again = sweep.run_sweep(grid, paths, log_mlflow=False)
    assert [r.status for r in again.runs] == ["skipped", "skipped"] and again.num_rows == len(frame)


@pytest.mark.slow
@pytest.mark.dist
def test_multi_gpu_train_two_processes(env: dict[str, Any]) -> None:
    overrides = {**env["overrides"], "task": "scr", "init": "scratch", "train_size": 4, "seed": 5,
                 "num_iterations": 1, "epoch_length": 1, "batch_size": 2}
    out = check(bundle_run(["train.yaml", "multi_gpu_train.yaml"], overrides, torchrun=2))
    ckpt = env["root"] / "models" / "segmentation" / "scr_scratch_n4_seed5"
    assert (ckpt / "model.pt").is_file() and (ckpt / "last.pt").is_file()
    assert torch.load(ckpt / "last.pt", weights_only=True)["trainer"]["iteration"] == 1
    runs = [r for r in _runs(env["tracking_uri"], f"{PREFIX}_finetune") if r.info.run_name == "scr_scratch_n4_seed5"]
    assert len(runs) == 1, out[-3000:]  # rank 0 only
    assert runs[0].data.params["n_train"] == "4"


@pytest.mark.slow
@pytest.mark.dist
def test_multi_gpu_pretrain_two_processes(env: dict[str, Any]) -> None:
    """configs/multi_gpu_pretrain.yaml: two gloo ranks, each on half of the DoLL training set (DistributedSampler), one
    writer of the checkpoints and of MLflow."""
    n_train = len(json.loads((env["root"] / "data" / "datalists" / "doll.json").read_text())["training"])
    overrides = {**env["overrides"], "max_epochs": 1, "batch_size": 2, "pretrain_name": "segresnet_ddp"}
    out = check(bundle_run(["pretrain.yaml", "multi_gpu_pretrain.yaml"], overrides, torchrun=2))
    ckpt = env["root"] / "models" / "pretrain" / "segresnet_ddp"
    assert (ckpt / "model.pt").is_file()
    state = torch.load(ckpt / "last.pt", weights_only=True)["trainer"]
    per_rank = -(-n_train // 2)                      # the shard of each rank (even_divisible pads the last one)
    assert state["iteration"] == state["epoch_length"] == per_rank // 2, (n_train, state)   # drop_last batches of 2
    runs = [r for r in _runs(env["tracking_uri"], f"{PREFIX}_pretrain") if r.info.run_name == "segresnet_ddp"]
    assert len(runs) == 1, out[-3000:]  # rank 0 only
    assert runs[0].data.params["batch_size"] == "2"


def test_train_config_alone_passes_monai_property_checks(env: dict[str, Any]) -> None:
    """The Model Zoo's entry point: ``create_workflow`` on configs/train.yaml alone (no other config) is a valid MONAI
    "train" workflow (every required and optional property MONAI checks)."""
    from monai.bundle import create_workflow

    for name in ("train.yaml", "pretrain.yaml"):
        wf = create_workflow(config_file=str(CONFIGS / name), workflow_type="train",
                             meta_file=str(CONFIGS / "metadata.json"), init="scratch", **env["overrides"])
        assert wf.check_properties() == [], name


def test_pretraining_controls_through_the_configs(env: dict[str, Any]) -> None:
    """configs/pretrain.yaml --pretrain_labels shuffled|oracle: the labels of the control, its own checkpoint folder,
    and the matching fine-tuning init of configs/train.yaml."""
    from monai.bundle import ConfigParser

    def parsed(name: str, **overrides: Any) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / name))
        parser.update({**env["overrides"], **overrides})
        return parser

    doll = parsed("pretrain.yaml").get_parsed_content("train_items")
    for labels in ("shuffled", "oracle"):
        p = parsed("pretrain.yaml", pretrain_labels=labels)
        assert p.get_parsed_content("ckpt_dir").endswith(f"pretrain/segresnet_{labels}")
        items = p.get_parsed_content("train_items")
        assert [i["image"] for i in items] == [i["image"] for i in doll]
        if labels == "shuffled":
            assert all(a["label"] != b["label"] for a, b in zip(items, doll))
        else:
            assert [i["label"] for i in items] == [i["lesion"] for i in doll]
        t = parsed("train.yaml", init=f"doll_{labels}")
        assert t.get_parsed_content("init_checkpoint") == p.get_parsed_content("ckpt_dir") + "/model.pt"

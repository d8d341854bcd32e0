"""The fine-tuning recipe's pieces: output-bias prior, the plateau rule's completion record, the validation curve,
and the analysis tables built on them (worst seed and collapsed structures, training efficiency)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bundle.handlers.checkpoint import ResumableCheckpoint
from bundle.networks.finetune import FinetuneInit


@pytest.mark.parametrize("arch", ["segresnet", "unet"])
def test_output_bias_prior_sets_the_heads_logits(arch: str) -> None:
    from bundle.networks.segmentation import build_segmenter, head_module_names, set_output_bias

    net = build_segmenter(arch, out_channels=3)
    logits = set_output_bias(net, [0.5, 0.05, 0.01])
    assert logits == pytest.approx([0.0, math.log(0.05 / 0.95), math.log(0.01 / 0.99)])
    head = net.get_submodule(head_module_names(net)[-1])
    bias = [m for m in head.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1].bias
    assert torch.sigmoid(bias).tolist() == pytest.approx([0.5, 0.05, 0.01], rel=1e-5)
    with pytest.raises(ValueError, match="priors must lie in"):
        set_output_bias(net, 1.0)
    with pytest.raises(ValueError, match="3 channels"):
        set_output_bias(net, [0.1, 0.1])


def test_finetune_init_applies_the_prior_to_a_new_head_only(tmp_path: Path) -> None:
    from bundle.networks.segmentation import build_segmenter, head_module_names

    net = build_segmenter("segresnet", out_channels=2)
    ft = FinetuneInit(net, init="scratch", output_bias_prior=0.1)
    head = ft.network.get_submodule(head_module_names(ft.network)[-1])
    assert torch.sigmoid(head.conv.bias).tolist() == pytest.approx([0.1, 0.1], rel=1e-5)
    assert ft.tracking_params["output_bias"] == "-2.197,-2.197"
    plain = FinetuneInit(build_segmenter("segresnet", out_channels=2), init="scratch")
    assert plain.output_bias is None and "output_bias" not in plain.tracking_params
    # a command-line override "null" switches it off; a number as text is a prior
    off = FinetuneInit(build_segmenter("segresnet", out_channels=2), init="scratch", output_bias_prior="null")
    assert off.output_bias is None
    text = FinetuneInit(build_segmenter("segresnet", out_channels=2), init="scratch", output_bias_prior="0.5")
    assert text.output_bias == pytest.approx([0.0, 0.0])


def _trainer(tmp_path: Path, max_epochs: int, stop_at: int | None = None):
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 1)
    opt = torch.optim.Adam(net.parameters())
    data = [{"image": torch.zeros(2, 1, 4, 4), "label": torch.zeros(2, 1, 4, 4)}] * 3
    trainer = SupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=data, network=net,
                                optimizer=opt, loss_function=torch.nn.MSELoss(),
                                train_handlers=[ResumableCheckpoint(str(tmp_path), net, opt)])
    if stop_at is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_at), lambda e: e.terminate())
    return trainer


def test_a_run_stopped_on_a_plateau_is_complete(tmp_path: Path) -> None:
    from ignite.engine import Events

    first = _trainer(tmp_path, 10, stop_at=2)
    first.run()
    assert first.state.epoch == 2
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["stopped"] == {"epoch": 2} and saved["trainer"]["iteration"] == 6
    again = _trainer(tmp_path, 10)
    calls: list[int] = []
    again.add_event_handler(Events.ITERATION_COMPLETED, lambda e: calls.append(1))
    again.run()
    assert calls == []  # stopped early = finished: a re-run trains nothing


def test_a_killed_run_is_not_taken_for_a_stopped_one(tmp_path: Path) -> None:
    first = _trainer(tmp_path, 2)
    first.run()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["stopped"] == {"epoch": None}
    longer = _trainer(tmp_path, 4)
    longer.run()
    assert longer.state.epoch == 4  # resumed and trained epochs 3-4


def test_validation_curve_writer_rows_and_resume(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bundle.handlers.training import ValidationCurveWriter

    path = tmp_path / "curve.csv"
    writer = ValidationCurveWriter(str(path), steps_per_epoch=15, tags={"init": "doll", "seed": 1})
    for epoch, dice in ((1, 0.2), (2, 0.5), (3, 0.6)):
        writer(SimpleNamespace(state=SimpleNamespace(epoch=epoch, metrics={"val_mean_dice": dice, "x": "text"})))
    frame = pd.read_csv(path)
    assert frame["steps"].tolist() == [15, 30, 45] and frame["val_mean_dice"].tolist() == [0.2, 0.5, 0.6]
    assert set(frame.columns) == {"init", "seed", "epoch", "steps", "val_mean_dice"}
    # a resumed run re-validates epoch 3 (killed after the curve was written): its row is replaced, not repeated
    writer(SimpleNamespace(state=SimpleNamespace(epoch=3, metrics={"val_mean_dice": 0.61})))
    frame = pd.read_csv(path)
    assert frame["epoch"].tolist() == [1, 2, 3] and frame["val_mean_dice"].iloc[-1] == 0.61


def _sweep_rows() -> pd.DataFrame:
    rows = []
    for seed in (0, 1, 2):
        for image in ("a", "b"):
            rows.append({"task": "scr", "init": "scratch", "train_size": 4, "seed": seed, "image": image,
                         "structure": "clavicles", "dice": 0.0 if seed == 1 else 0.8})
            rows.append({"task": "scr", "init": "scratch", "train_size": 4, "seed": seed, "image": image,
                         "structure": "lungs", "dice": 0.9 + 0.02 * seed})
    return pd.DataFrame(rows)


def test_seed_table_gives_the_worst_seed_and_flags_a_collapse() -> None:
    from bundle.reporting.analysis import seed_table

    table = seed_table(_sweep_rows())
    clav = table[table["structure"] == "clavicles"].iloc[0]
    assert clav["mean"] == pytest.approx(1.6 / 3) and clav["worst"] == 0.0 and clav["worst_seed"] == 1
    assert bool(clav["collapsed"]) and clav["collapsed_seeds"] == "1"
    lungs = table[table["structure"] == "lungs"].iloc[0]
    assert lungs["worst"] == pytest.approx(0.9) and not bool(lungs["collapsed"])
    overall = table[table["structure"] == "all"].iloc[0]  # the per-image mean over structures, then over images
    assert overall["worst"] == pytest.approx((0.0 + 0.92) / 2) and overall["worst_seed"] == 1
    assert not bool(overall["collapsed"])


def test_efficiency_table_by_hand() -> None:
    from bundle.reporting.analysis import efficiency_table, mean_val_curves

    curves = pd.DataFrame({
        "task": "scr", "init": "doll", "train_size": "4",
        "seed": [0, 0, 0, 0, 1, 1, 1],
        "steps": [15, 30, 45, 60, 15, 30, 45],
        "val_mean_dice": [0.5, 0.9, 0.96, 1.0, 0.2, 0.8, 0.8]})
    eff = efficiency_table(curves).iloc[0]
    # seed 0: best 1.0, 95% = 0.95 first reached at 45; seed 1: best 0.8, 0.76 reached at 30
    assert eff["steps_to_95_mean"] == pytest.approx(37.5) and eff["steps_to_95_max"] == 45
    assert eff["best_mean"] == pytest.approx(0.9) and eff["best_worst"] == pytest.approx(0.8)
    assert eff["steps_run_mean"] == pytest.approx(52.5)
    mean = mean_val_curves(curves)
    last = mean[mean["steps"] == 60].iloc[0]  # seed 1 stopped at 45: its last value is carried forward
    assert last["mean"] == pytest.approx(0.9) and last["worst"] == pytest.approx(0.8) and last["n_seeds"] == 2
    assert np.all(np.diff(mean["steps"].to_numpy()) > 0)


def test_report_marks_collapsed_rows_red(tmp_path: Path) -> None:
    from bundle.reporting.report import Report, Section, Table

    frame = pd.DataFrame({"structure": ["lungs", "clavicles"], "worst": [0.95, 0.0], "collapsed": [False, True]})
    report = Report("t", [Section("s", "S", [Table("seeds", frame, highlight="collapsed")])])
    html = report.to_html()
    assert html.count('<tr class="defect">') == 1 and "tr.defect" in html
    md = report.to_markdown()
    assert "| **DEFECT** clavicles" in md and "| lungs" in md

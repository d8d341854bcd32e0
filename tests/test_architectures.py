"""A second segmenter architecture (UNet) beside SegResNet in one protocol: its runs get their own names (no
overwrite of the SegResNet run of the same cell), its DoLL pre-training is made by the sweep, and the analysis
compares its inits among themselves (task label ``<task>:unet``), checked against scipy's Wilcoxon test."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bundle.reporting.analysis import load_sweep, load_val_curves, statistics_table
from bundle.tasks import arch_task, run_name

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.sweep import SweepGrid, pretrain_steps, summarise  # noqa: E402


def test_run_names_carry_a_non_default_architecture() -> None:
    assert run_name("scr", "doll", 4, 1) == run_name("scr", "doll", 4, 1, arch="segresnet") == "scr_doll_n4_seed1"
    assert run_name("scr", "doll", 4, 1, arch="unet") == "scr_doll_n4_seed1_unet"
    assert run_name("scr", "scratch", "all", 0, "adapter", "unet") == "scr_scratch_nall_seed0_adapter_unet"
    assert [arch_task("scr", a) for a in ("segresnet", None, "", "unet")] == ["scr", "scr", "scr", "scr:unet"]


def test_a_unet_grid_names_its_runs_apart_and_pre_trains_its_doll_init(tmp_path: Path) -> None:
    grid = SweepGrid.from_mapping({"tasks": ["scr"], "inits": ["doll", "scratch"], "sizes": [4], "seeds": [0],
                                   "extra": [{"tasks": ["scr"], "inits": ["doll", "scratch", "doll_shuffled"],
                                              "sizes": [4], "seeds": [0], "overrides": {"seg_arch": "unet"}}]})
    runs = grid.runs()
    assert [r.name for r in runs] == ["scr_doll_n4_seed0", "scr_scratch_n4_seed0", "scr_doll_n4_seed0_unet",
                                      "scr_scratch_n4_seed0_unet", "scr_doll_shuffled_n4_seed0_unet"]
    assert [r.arch for r in runs] == ["segresnet"] * 2 + ["unet"] * 3
    paths = {"data_root": str(tmp_path / "data"), "output_root": str(tmp_path / "eval"),
             "models_dir": str(tmp_path / "models")}
    (tmp_path / "data" / "datalists").mkdir(parents=True)
    (tmp_path / "data" / "datalists" / "doll.json").write_text("{}")  # the pipeline's DoLL labels exist
    steps = pretrain_steps(runs, paths)
    # the SegResNet DoLL init stays the pipeline's; UNet's DoLL and its shuffled control are made, labels reused
    assert [s.name for s in steps] == ["pretrain_unet_doll", "pretrain_unet_shuffled"]
    assert [st["name"] for st in steps[0].steps] == ["pretrain_unet_doll"]
    assert steps[0].steps[0]["args"]["seg_arch"] == "unet" and steps[0].steps[0]["args"]["pretrain_labels"] == "doll"
    assert steps[0].checkpoint == tmp_path / "models" / "pretrain" / "unet_doll" / "model.pt"
    # a grid-wide architecture names every run, extra grids included
    wide = SweepGrid.from_mapping({"tasks": ["scr"], "inits": ["scratch"], "sizes": [4], "seeds": [0],
                                   "overrides": {"seg_arch": "unet"},
                                   "extra": [{"tasks": ["infection"], "inits": ["scratch"], "sizes": [4],
                                              "seeds": [0]}]})
    assert [r.name for r in wide.runs()] == ["scr_scratch_n4_seed0_unet", "infection_scratch_n4_seed0_unet"]
    # one architecture's part of a grid, its extra grids' runs included
    only_unet = SweepGrid.from_mapping({**grid.__dict__, "archs": "unet"})
    assert [r.name for r in only_unet.runs()] == ["scr_doll_n4_seed0_unet", "scr_scratch_n4_seed0_unet",
                                                  "scr_doll_shuffled_n4_seed0_unet"]
    assert SweepGrid.from_mapping({**grid.__dict__, "archs": ["segresnet"]}).runs() == runs[:2]
    with pytest.raises(ValueError, match="unknown architectures \\['vnet'\\]"):
        SweepGrid.from_mapping({**grid.__dict__, "archs": "vnet"})


def _sweep(path: Path) -> pd.DataFrame:
    """Per-image Dice of DoLL and scratch for both architectures: SegResNet DoLL = scratch + 0.02, UNet DoLL =
    scratch + 0.06 (UNet 0.1 below SegResNet overall)."""
    rng = np.random.default_rng(1)
    level = rng.uniform(0.6, 0.8, 12)
    offset = {("segresnet", "scratch"): 0.0, ("segresnet", "doll"): 0.02, ("unet", "scratch"): -0.1,
              ("unet", "doll"): -0.04}
    rows = [{"task": "scr", "init": init, "train_size": "4", "seed": seed, "mode": "full", "arch": arch,
             "split": "test", "n_train": 4, "image": f"im{i:02d}", "structure": "lungs",
             "dice": float(level[i] + off + rng.normal(0, 0.004))}
            for (arch, init), off in offset.items() for seed in (0, 1) for i in range(12)]
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False)
    return frame


def test_the_analysis_compares_each_architectures_inits_among_themselves(tmp_path: Path) -> None:
    raw = _sweep(tmp_path / "sweep.csv")
    df = load_sweep(tmp_path / "sweep.csv")
    assert sorted(df["task"].unique()) == ["scr", "scr:unet"]
    assert len(load_sweep(tmp_path / "sweep.csv", task="scr:unet")) == len(raw) // 2
    table = statistics_table(df, n_boot=200)
    rows = {r["task"]: r for r in table.to_dict("records") if r["init"] == "doll"}
    assert set(rows) == {"scr", "scr:unet"}
    for task, arch, gain in (("scr", "segresnet", 0.02), ("scr:unet", "unet", 0.06)):
        sub = raw[raw["arch"] == arch].groupby(["init", "image"])["dice"].mean()
        x, y = sub["doll"].to_numpy(), sub["scratch"].to_numpy()
        assert rows[task]["mean_diff"] == pytest.approx((x - y).mean(), abs=1e-12)
        assert rows[task]["mean_diff"] == pytest.approx(gain, abs=0.004)
        assert rows[task]["p_value"] == pytest.approx(stats.wilcoxon(x, y).pvalue, rel=1e-6)
    summary = summarise(raw)
    assert sorted(summary["task"].unique()) == ["scr", "scr:unet"] and (summary["n_seeds"] == 2).all()
    # a sweep written before the arch column existed reads as SegResNet
    raw.drop(columns="arch").to_csv(tmp_path / "old.csv", index=False)
    assert set(load_sweep(tmp_path / "old.csv")["task"]) == {"scr"}


def test_validation_curves_are_labelled_by_architecture(tmp_path: Path) -> None:
    pd.DataFrame({"task": ["scr"] * 4, "init": ["doll"] * 4, "train_size": ["4"] * 4, "seed": [0] * 4,
                  "mode": ["full"] * 4, "arch": ["segresnet", "segresnet", "unet", "unet"],
                  "steps": [10, 20, 10, 20], "val_mean_dice": [0.5, 0.8, 0.3, 0.6]}).to_csv(tmp_path / "c.csv",
                                                                                           index=False)
    curves = load_val_curves(tmp_path / "c.csv")
    assert list(curves["task"]) == ["scr", "scr", "scr:unet", "scr:unet"]

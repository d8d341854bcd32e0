"""The pre-training controls in the analysis and the report (bundle.reporting.analysis.controls_table / ControlsStep,
bundle.reporting.report.controls_conclusions) on a sweep with known effects, against scipy's Wilcoxon test and a
hand-computed Holm correction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bundle.reporting.analysis import CONTROL_INITS, AnalysisContext, ControlsStep, controls_table
from bundle.reporting.report import build_report, controls_conclusions

N_IMAGES = 16
SEEDS = (0, 1, 2)
STRUCTURES = ("lungs", "heart")
#: DoLL = scratch + 0.05; shuffled + 0.01 (the DoLL gain exceeds the generic one); oracle + 0.08 (the ceiling)
OFFSETS = {"scratch": 0.0, "doll": 0.05, "doll_shuffled": 0.01, "doll_oracle": 0.08}


def make_sweep(path: Path | None = None, inits=tuple(OFFSETS)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    level = rng.uniform(0.6, 0.8, N_IMAGES)
    rows = []
    for task in ("scr", "infection"):
        for seed in SEEDS:
            for i in range(N_IMAGES):
                for st in STRUCTURES:
                    for init in inits:
                        dice = level[i] + OFFSETS[init] + rng.normal(0, 0.005)
                        rows.append({"task": task, "init": init, "train_size": "4", "seed": seed, "mode": "full",
                                     "split": "test", "n_train": 4, "image": f"im{i:02d}", "structure": st,
                                     "dice": float(dice)})
    frame = pd.DataFrame(rows)
    if path is not None:
        frame.to_csv(path, index=False)
    return frame


def test_controls_table_against_scipy_and_hand_holm() -> None:
    df = make_sweep()
    table = controls_table(df, n_boot=500)
    assert list(table["reference"].unique()) == [c for c in CONTROL_INITS if c in OFFSETS]
    assert (table["init"] == "doll").all() and len(table) == 2 * 3
    for r in table.to_dict("records"):
        sub = df[df["task"] == r["task"]]
        per_image = sub.groupby(["init", "image"])["dice"].mean()
        x, y = per_image["doll"].to_numpy(), per_image[r["reference"]].to_numpy()
        assert r["mean_diff"] == pytest.approx((x - y).mean(), abs=1e-12)
        assert r["mean_diff"] == pytest.approx(OFFSETS["doll"] - OFFSETS[r["reference"]], abs=0.005)
        assert r["p_value"] == pytest.approx(stats.wilcoxon(x, y).pvalue, rel=1e-6)
        assert r["ci_low"] <= r["mean_diff"] <= r["ci_high"]
    # Holm over the whole table (6 comparisons), by hand
    p = table["p_value"].to_numpy()
    order = np.argsort(p)
    adjusted = np.maximum.accumulate([(len(p) - k) * p[i] for k, i in enumerate(order)]).clip(max=1.0)
    expected = np.empty_like(p)
    expected[order] = adjusted
    np.testing.assert_allclose(table["p_holm"].to_numpy(), expected, rtol=1e-9)
    assert table["significant"].all()  # 16 images, every difference >= 0.03 with noise 0.005
    sentences = controls_conclusions(table)
    assert any(s.startswith("On scr with 4 labelled images, the DoLL's gain over no pre-training (+0.05")
               and "exceeds it significantly" in s for s in sentences), sentences
    assert any("true-lesion init beats DoLL-init on infection" in s for s in sentences), sentences


def test_a_control_of_one_task_is_compared_there_only() -> None:
    """A control run on one task (or size) only gives rows where the DoLL and it both ran, none with n=0."""
    df = make_sweep()
    df = df[~((df["task"] == "infection") & (df["init"] == "doll_oracle"))]
    table = controls_table(df, n_boot=100)
    assert (table["n"] == N_IMAGES).all() and len(table) == 3 + 2
    assert set(table.loc[table["task"] == "infection", "reference"]) == {"doll_shuffled", "scratch"}


def test_controls_table_without_controls_is_empty() -> None:
    assert controls_table(make_sweep(inits=("doll", "scratch")).query("init == 'doll'"), n_boot=100).empty


def test_controls_step_and_report_section(tmp_path: Path) -> None:
    csv = tmp_path / "sweep_test.csv"
    make_sweep(csv)
    ctx = AnalysisContext(out_dir=tmp_path / "analysis")
    ControlsStep(csv, n_boot=200)(ctx)
    assert ctx.status["controls"] == "done"
    saved = pd.read_csv(tmp_path / "analysis" / "controls.csv")
    assert set(saved["reference"]) == {"doll_shuffled", "doll_oracle", "scratch"}
    per_structure = pd.read_csv(tmp_path / "analysis" / "controls_structures.csv")
    assert set(per_structure["structure"]) == set(STRUCTURES) and len(per_structure) == 2 * 3 * 2
    means = pd.read_csv(tmp_path / "analysis" / "controls_means.csv")
    row = means[(means["task"] == "scr") & (means["init"] == "doll_oracle") & (means["structure"] == "all")]
    assert row["mean"].iloc[0] == pytest.approx(
        make_sweep().query("task == 'scr' and init == 'doll_oracle'")["dice"].mean(), abs=1e-9)
    assert (tmp_path / "analysis" / "controls.png").stat().st_size > 1000
    assert ctx.metrics["control_scr_doll_shuffled_n4_mean_diff"] == pytest.approx(0.04, abs=0.005)
    import json

    (tmp_path / "analysis" / "status.json").write_text(json.dumps(ctx.status))
    report = build_report(tmp_path / "report", analysis_dir=tmp_path / "analysis", packages=("numpy",))
    assert report["status"]["controls"] == "done"
    assert any("exceeds it significantly" in c for c in report["conclusions"]), report["conclusions"]
    html = Path(report["html"]).read_text()
    assert "What pre-training buys" in html and "shuffled-DoLL init" in html
    assert "pretrain_replicates.py" in html  # the caveat: one pre-training per label kind holds its draw fixed
    assert any("for this pre-training" in c for c in report["conclusions"]), report["conclusions"]

    no_controls = tmp_path / "plain.csv"
    make_sweep(no_controls, inits=("doll", "scratch"))
    ctx2 = AnalysisContext(out_dir=tmp_path / "analysis2")
    ControlsStep(no_controls, n_boot=100)(ctx2)
    assert ctx2.status["controls"].startswith("not run: the sweep has no pre-training control")

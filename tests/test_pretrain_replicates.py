"""scripts/pretrain_replicates.py and bundle.reporting.analysis.replicate_table: the table with the pre-training
replicate as the unit, against scipy, and the folder layout it reads, without training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bundle.tasks import run_name
from bundle.reporting.analysis import replicate_table
from scripts.pretrain_replicates import replicate_grid, replicate_paths, run_replicates

IMAGES = [f"img{i}" for i in range(6)]
#: per replicate: the DoLL's gain over the shuffled control on each image (two structures, two seeds get it alike)
GAINS = {0: [0.02, 0.03, 0.01, 0.04, 0.02, 0.05], 1: [-0.01, 0.00, -0.02, 0.01, -0.03, -0.01],
         2: [0.03, 0.02, 0.04, 0.01, 0.05, 0.02]}
BASE = np.array([0.70, 0.72, 0.74, 0.76, 0.78, 0.80])


def _rows(init: str, values: np.ndarray, task: str = "infection") -> list[dict]:
    return [{"task": task, "init": init, "train_size": "4", "seed": seed, "mode": "full", "arch": "segresnet",
             "split": "test", "n_train": 4, "image": image, "structure": structure, "dice": float(v) + offset}
            for seed, offset in ((0, -0.01), (1, 0.01)) for structure in ("a", "b")
            for image, v in zip(IMAGES, values)]


def _frames() -> tuple[dict[int, pd.DataFrame], pd.DataFrame]:
    frames = {rep: pd.DataFrame(_rows("doll", BASE + np.array(g)) + _rows("doll_shuffled", BASE))
              for rep, g in GAINS.items()}
    return frames, pd.DataFrame(_rows("scratch", BASE - 0.05))


def test_replicate_table_matches_scipy_per_replicate_and_across_replicates():
    frames, scratch = _frames()
    table = replicate_table(frames, scratch)
    vs_shuffled = table[(table.a == "doll") & (table.b == "doll_shuffled")].set_index("replicate")
    for rep, gains in GAINS.items():
        row = vs_shuffled.loc[str(rep)]
        assert row.mean_diff == pytest.approx(np.mean(gains))
        assert row.p_value == pytest.approx(stats.wilcoxon(gains).pvalue)
        assert row.n == 6 and row.n_favour_a == sum(g > 0 for g in gains)
        assert row.mean_b == pytest.approx(BASE.mean())
        assert row.worst_seed_b == pytest.approx(BASE.mean() - 0.01)       # seed 0 is 0.01 below every image
    means = [np.mean(g) for g in GAINS.values()]
    across = vs_shuffled.loc["all"]
    assert across.mean_diff == pytest.approx(np.mean(means))
    assert across.p_value == pytest.approx(stats.ttest_1samp(means, 0.0).pvalue)
    assert across.n == 3 and across.n_favour_a == 2                     # replicate 1 favours the control
    # scratch is shared by every replicate: the shuffled control is 0.05 above it on every image of each
    shuffled_vs_scratch = table[(table.a == "doll_shuffled") & (table.b == "scratch")]
    assert np.allclose(shuffled_vs_scratch.mean_diff, 0.05)
    assert np.isnan(shuffled_vs_scratch.set_index("replicate").loc["all"].p_value)   # no spread: no t-test
    # Holm over the replicate-level rows with a t-test (the per-replicate rows have none), by hand: sorted
    # p-values times (m - rank), running maximum, capped at 1
    across_rows = table[table.replicate == "all"]
    tested = across_rows.p_value.notna()
    raw = across_rows.p_value[tested].to_numpy()
    order = np.argsort(raw)
    expected = np.empty_like(raw)
    expected[order] = np.minimum(1, np.maximum.accumulate(raw[order] * (len(raw) - np.arange(len(raw)))))
    assert tested.sum() == 2 and np.allclose(across_rows.p_holm[tested], expected)
    assert table[table.replicate != "all"].p_holm.isna().all() and across_rows.p_holm[~tested].isna().all()


def test_replicate_table_leaves_out_comparisons_without_both_inits():
    frames, _ = _frames()
    table = replicate_table(frames, None)
    assert set(zip(table.a, table.b)) == {("doll", "doll_shuffled")}
    assert list(table.replicate) == ["0", "1", "2", "all"]


def test_collect_only_reads_each_replicates_folder_and_the_shared_scratch_runs(tmp_path):
    """The layout the command writes (rep<s>/eval, scratch/eval) read back into the table, nothing trained."""
    frames, scratch = _frames()
    root = tmp_path / "replicates"
    parts = [(rep, frame) for rep, frame in frames.items()] + [("scratch", scratch)]
    for rep, frame in parts:
        out = replicate_paths(root, rep, tmp_path / "data")["output_root"]
        for (init, seed), cell in frame.groupby(["init", "seed"]):
            path = tmp_path / out / "segmentation" / run_name("infection", init, 4, seed) / "metrics_test.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            cell.to_csv(path, index=False)
    table = run_replicates(replicates=[0, 1, 2], tasks=["infection"], sizes=[4], seeds=[0, 1], root=str(root),
                           data_root=str(tmp_path / "data"), collect_only=True)
    expected = replicate_table(frames, scratch)
    assert len(table) == len(expected) == 3 * 4
    assert np.allclose(table.mean_diff, expected.mean_diff)
    written = pd.read_csv(root / "replicates.csv")
    assert np.allclose(written.mean_diff, expected.mean_diff)
    assert "| infection | 4 | all | doll | doll_shuffled |" in (root / "replicates.md").read_text()
    per_image = pd.read_csv(root / "replicates_per_image.csv", dtype={"replicate": str})
    assert len(per_image) == sum(len(f) for f in frames.values()) + len(scratch)
    assert set(per_image.replicate) == {"0", "1", "2", "scratch"}
    assert set(per_image.loc[per_image.replicate == "scratch", "init"]) == {"scratch"}
    assert not any(root.glob("rep*/models"))                            # no pre-training under --collect_only


def test_a_replicates_control_pretraining_gets_its_seed_and_folder(tmp_path):
    """The sweep makes replicate s's missing control pre-trainings with --seed s into rep<s>/models."""
    from scripts.sweep import pretrain_steps

    paths = replicate_paths(tmp_path, 2, tmp_path / "data")
    grid = replicate_grid({"tasks": ["scr"], "sizes": [4], "seeds": [0, 1], "jobs": 1, "overrides": {}},
                          ["doll", "doll_shuffled"], 2, {"num_iterations": 30})
    steps = pretrain_steps(grid.runs(), paths, {}, grid.generate_overrides, grid.pretrain_overrides)
    assert [s.labels for s in steps] == ["shuffled"]                      # the DoLL one is the script's own step
    args = steps[0].steps[-1]["args"]
    assert (args["seed"], args["pretrain_labels"], args["num_iterations"]) == (2, "shuffled", 30)
    assert steps[0].checkpoint == tmp_path / "rep2" / "models" / "pretrain" / "segresnet_shuffled" / "model.pt"

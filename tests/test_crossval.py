"""Cross-validation by patient: the folds (bundle.data.splits), the pooled table against scipy and a hand computation
(bundle.reporting.analysis.crossval_table) and the layout scripts/crossval.py reads and writes, without training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bundle.data.splits import crossval_datalist, patient_folds
from bundle.reporting.analysis import crossval_table
from bundle.tasks import run_name
from scripts.crossval import run_crossval


def _items(sizes: dict[str, int]) -> list[dict]:
    return [{"image": f"{p}_{i}.png", "label": f"{p}_{i}_mask.png", "patient": p}
            for p, n in sizes.items() for i in range(n)]


def test_patient_folds_balance_items_and_never_split_a_patient():
    # largest patient first, each to the emptiest fold (lowest index on a tie): A(3) -> 0, B(2) -> 1, then the three
    # one-image patients -> 1, 0, 1 whatever their shuffled order: 4 and 4 items
    items = _items({"A": 3, "B": 2, "C": 1, "D": 1, "E": 1})
    for seed in range(5):
        folds = patient_folds(items, 2, seed=seed)
        assert [len(f) for f in folds] == [4, 4]
        assert {it["patient"] for it in folds[0]} >= {"A"} and {it["patient"] for it in folds[1]} >= {"B"}
        assert sorted(it["image"] for f in folds for it in f) == sorted(it["image"] for it in items)
        patients = [{it["patient"] for it in f} for f in folds]
        assert not patients[0] & patients[1]
    # the seed decides which one-image patients go where; a seed gives the same folds every time
    assert patient_folds(items, 2, seed=3) == patient_folds(items, 2, seed=3)
    draws = {tuple(sorted(it["patient"] for it in patient_folds(items, 2, seed=s)[0])) for s in range(10)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="at least 6 patients"):
        patient_folds(items, 6)
    with pytest.raises(ValueError, match="num_folds"):
        patient_folds(items, 1)


def test_crossval_datalist_tests_every_item_once_and_keeps_patients_within_a_section():
    rng = np.random.default_rng(0)
    items = _items({f"p{k:02d}": int(rng.integers(1, 4)) for k in range(21)})
    tested: list[str] = []
    for fold in range(4):
        parts = crossval_datalist(items, fold, 4, validation_fraction=0.25, seed=0)
        sections = {k: {it["patient"] for it in v} for k, v in parts.items()}
        assert not sections["training"] & sections["validation"]
        assert not (sections["training"] | sections["validation"]) & sections["test"]
        assert sum(len(v) for v in parts.values()) == len(items)
        assert parts["validation"] and parts["training"]
        tested += [it["image"] for it in parts["test"]]
    assert sorted(tested) == sorted(it["image"] for it in items)
    with pytest.raises(ValueError, match="fold must be"):
        crossval_datalist(items, 4, 4)


def _frame() -> pd.DataFrame:
    """Two folds of two images; scratch is 0.01 below the DoLL on image a, 0.03 on b, 0.02 on c, 0.04 on d."""
    base = {"a": 0.95, "b": 0.93, "c": 0.96, "d": 0.90}
    gain = {"a": 0.01, "b": 0.03, "c": 0.02, "d": 0.04}
    fold = {"a": 0, "b": 0, "c": 1, "d": 1}
    rows = []
    for init in ("doll", "scratch"):
        for seed, offset in ((0, -0.005), (1, 0.005)):
            for image, v in base.items():
                rows.append({"task": "real_lungs", "init": init, "train_size": "all", "seed": seed, "mode": "full",
                             "image": image, "structure": "lungs", "fold": fold[image],
                             "dice": v + offset - (gain[image] if init == "scratch" else 0.0)})
    return pd.DataFrame(rows)


def test_crossval_table_pools_the_folds_by_hand_and_tests_against_scipy():
    summary, tests = crossval_table(_frame())
    doll = summary[summary.init == "doll"].iloc[0]
    assert doll.n_images == 4 and doll.n_folds == 2
    assert doll["mean"] == pytest.approx(np.mean([0.95, 0.93, 0.96, 0.90]))
    assert doll.worst_seed == pytest.approx(np.mean([0.95, 0.93, 0.96, 0.90]) - 0.005)
    assert doll.fold_min == pytest.approx((0.96 + 0.90) / 2) and doll.fold_max == pytest.approx((0.95 + 0.93) / 2)
    assert doll.lowest_image == pytest.approx(0.90)
    scratch = summary[summary.init == "scratch"].iloc[0]
    assert scratch["mean"] == pytest.approx(doll["mean"] - 0.025)
    row = tests.iloc[0]
    assert (row.init, row.reference, row.n) == ("doll", "scratch", 4)
    assert row.mean_diff == pytest.approx(0.025)
    assert row.p_value == pytest.approx(stats.wilcoxon([0.01, 0.03, 0.02, 0.04]).pvalue)


def _write_datalist(data_root: Path) -> list[dict]:
    items = _items({"P1": 2, "P2": 1, "P3": 1, "P4": 2, "P5": 1, "P6": 1})
    spec = {"name": "real_lungs", "labels": {"1": "lungs"}, "numTraining": 4, "training": items[:4],
            "validation": items[4:6], "test": items[6:]}
    path = data_root / "datalists" / "real_lungs.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(spec))
    return items


def test_run_crossval_writes_the_folds_and_pools_the_finished_runs(tmp_path):
    data_root, models, root = tmp_path / "data", tmp_path / "models", tmp_path / "cv"
    items = _write_datalist(data_root)
    # first call: the folds' datalists and links, nothing finished yet
    summary, _ = run_crossval(folds=2, seeds=[0], root=str(root), data_root=str(data_root), models_dir=str(models),
                              collect_only=True)
    assert summary.empty
    fold_items = []
    for k in range(2):
        spec = json.loads((root / f"fold{k}" / "datalist.json").read_text())
        assert spec["crossval"]["fold"] == k and spec["name"] == "real_lungs" and spec["numTest"] == len(spec["test"])
        fold_items.append(spec["test"])
        assert (root / f"fold{k}" / "models" / "pretrain").resolve() == (models / "pretrain").resolve()
    assert sorted(it["image"] for f in fold_items for it in f) == sorted(it["image"] for it in items)
    # the runs of each fold finish (their per-image CSVs appear): the tables pool every image once
    for k, tests in enumerate(fold_items):
        for init, dice in (("doll", 0.95), ("scratch", 0.94)):
            out = root / f"fold{k}" / "eval" / "segmentation" / run_name("real_lungs", init, "all", 0)
            out.mkdir(parents=True)
            pd.DataFrame([{"task": "real_lungs", "init": init, "train_size": "all", "seed": 0, "mode": "full",
                           "split": "test", "n_train": 3, "image": Path(it["image"]).stem, "structure": "lungs",
                           "dice": dice + 0.01 * k} for it in tests]).to_csv(out / "metrics_test.csv", index=False)
            reach = 15 if init == "doll" else 30        # validation curves: the DoLL reaches its best 15 steps sooner
            pd.DataFrame([{"stage": "finetune", "task": "real_lungs", "init": init, "train_size": "all", "seed": 0,
                           "mode": "full", "arch": "segresnet", "epoch": e, "steps": 15 * e,
                           "val_mean_dice": 0.9 if 15 * e >= reach else 0.3} for e in (1, 2, 3)]
                         ).to_csv(out / "val_curve.csv", index=False)
    summary, tests = run_crossval(folds=2, seeds=[0], root=str(root), data_root=str(data_root),
                                  models_dir=str(models), collect_only=True)
    doll = summary[summary.init == "doll"].iloc[0]
    assert doll.n_images == len(items) and doll.n_folds == 2
    assert doll.fold_max - doll.fold_min == pytest.approx(0.01)
    assert tests.iloc[0].mean_diff == pytest.approx(0.01)
    per_image = pd.read_csv(root / "crossval_per_image.csv")
    assert set(per_image.fold) == {0, 1} and len(per_image) == 2 * len(items)
    assert "Cross-validation by patient" in (root / "crossval.md").read_text()
    pairs = pd.read_csv(root / "crossval_efficiency_tests.csv").iloc[0]     # fold 0 and fold 1, seed 0: two pairs
    assert (pairs.n, pairs.steps_to_95_diff, pairs.n_fewer) == (2, -15.0, 2)
    # a second pre-training of the DoLL (replicate 1) runs the same folds under rep1/, against the same scratch runs
    rep_models = tmp_path / "rep1_models"
    for k, tests in enumerate(fold_items):
        out = root / "rep1" / f"fold{k}" / "eval" / "segmentation" / run_name("real_lungs", "doll", "all", 0)
        out.mkdir(parents=True)
        pd.DataFrame([{"task": "real_lungs", "init": "doll", "train_size": "all", "seed": 0, "mode": "full",
                       "split": "test", "n_train": 3, "image": Path(it["image"]).stem, "structure": "lungs",
                       "dice": 0.93 + 0.01 * k} for it in tests]).to_csv(out / "metrics_test.csv", index=False)
    run_crossval(folds=2, seeds=[0], root=str(root), data_root=str(data_root), models_dir=str(models),
                 pretrain_replicates={1: str(rep_models)}, collect_only=True)
    reps = pd.read_csv(root / "crossval_replicates.csv", dtype={"replicate": str}).set_index("replicate")
    assert reps.loc["0"].mean_diff == pytest.approx(0.01) and reps.loc["1"].mean_diff == pytest.approx(-0.01)
    assert reps.loc["all"].n == 2 and reps.loc["all"].mean_diff == pytest.approx(0.0)
    assert (root / "rep1" / "fold0" / "models" / "pretrain").resolve() == (rep_models / "pretrain").resolve()
    with pytest.raises(ValueError, match="label 0"):
        run_crossval(folds=2, root=str(root), data_root=str(data_root), pretrain_replicates={0: "x"},
                     collect_only=True)


def test_run_crossval_tests_the_doll_against_its_controls_and_the_report_says_so(tmp_path):
    """With a pre-training control in the grid (``doll_shuffled``) the cross-validation tests the DoLL against it
    over every image and pairs the training efficiency against it by fold and seed; the report's studies section shows
    the table and the controls' conclusion; a later grid without the control leaves no stale table."""
    from bundle.reporting.report import build_report

    data_root, models, root = tmp_path / "data", tmp_path / "models", tmp_path / "eval" / "crossval" / "real_lungs"
    items = _write_datalist(data_root)
    inits = ["doll", "doll_shuffled", "scratch"]
    run_crossval(folds=2, inits=inits, seeds=[0], root=str(root), data_root=str(data_root), models_dir=str(models),
                 collect_only=True)
    # per image: DoLL 0.95, shuffled 0.95 - 0.002 * i (below on every image but the first), scratch 0.90;
    # steps to the best validation Dice: DoLL 15, shuffled 45, scratch 45
    for k in range(2):
        tests = json.loads((root / f"fold{k}" / "datalist.json").read_text())["test"]
        for init in inits:
            out = root / f"fold{k}" / "eval" / "segmentation" / run_name("real_lungs", init, "all", 0)
            out.mkdir(parents=True)
            rows = []
            for it in tests:
                i = next(n for n, x in enumerate(items) if x["image"] == it["image"])
                dice = {"doll": 0.95, "doll_shuffled": 0.95 - 0.002 * i, "scratch": 0.90}[init]
                rows.append({"task": "real_lungs", "init": init, "train_size": "all", "seed": 0, "mode": "full",
                             "split": "test", "n_train": 3, "image": Path(it["image"]).stem, "structure": "lungs",
                             "dice": dice})
            pd.DataFrame(rows).to_csv(out / "metrics_test.csv", index=False)
            reach = 15 if init == "doll" else 45
            pd.DataFrame([{"stage": "finetune", "task": "real_lungs", "init": init, "train_size": "all", "seed": 0,
                           "mode": "full", "arch": "segresnet", "epoch": e, "steps": 15 * e,
                           "val_mean_dice": 0.9 if 15 * e >= reach else 0.3} for e in (1, 2, 3)]
                         ).to_csv(out / "val_curve.csv", index=False)
    run_crossval(folds=2, inits=inits, seeds=[0], root=str(root), data_root=str(data_root), models_dir=str(models),
                 collect_only=True)
    controls = pd.read_csv(root / "crossval_controls.csv").set_index("reference")
    diffs = [0.002 * i for i in range(len(items))]
    assert controls.loc["doll_shuffled", "n"] == len(items)
    assert controls.loc["doll_shuffled", "mean_diff"] == pytest.approx(np.mean(diffs))
    assert controls.loc["doll_shuffled", "p_value"] == pytest.approx(stats.wilcoxon(diffs[1:]).pvalue)
    assert controls.loc["scratch", "mean_diff"] == pytest.approx(0.05)
    pairs = pd.read_csv(root / "crossval_efficiency_tests.csv").set_index(["init", "reference"])
    assert pairs.loc[("doll", "doll_shuffled"), "steps_to_95_diff"] == -30.0
    assert pairs.loc[("doll_shuffled", "scratch"), "steps_to_95_diff"] == 0.0
    assert "pre-training control" in (root / "crossval.md").read_text()
    res = build_report(tmp_path / "report", packages=("numpy",), crossval_dirs=[root])
    text = "\n".join(res["conclusions"])
    assert "On real_lungs with all labelled images, the DoLL's gain over no pre-training (+0.0500 mean Dice)" in text
    assert "DoLL-init reaches 95% of its best validation Dice 30.0 optimizer steps sooner than shuffled-DoLL" in text
    run_crossval(folds=2, inits=["doll", "scratch"], seeds=[0], root=str(root), data_root=str(data_root),
                 models_dir=str(models), collect_only=True)
    assert not (root / "crossval_controls.csv").exists()


def test_run_crossval_names_a_missing_datalist(tmp_path):
    with pytest.raises(Exception, match="real_lungs.json.*datalist not found"):
        run_crossval(root=str(tmp_path / "cv"), data_root=str(tmp_path / "nodata"), collect_only=True)


def test_the_report_shows_the_studies_found_and_leaves_the_section_out_without_them(tmp_path):
    from bundle.reporting.analysis import replicate_table
    from bundle.reporting.report import build_report
    from tests.test_pretrain_replicates import _frames

    cv = tmp_path / "eval" / "crossval" / "real_lungs"
    cv.mkdir(parents=True)
    summary, tests = crossval_table(_frame())
    summary.to_csv(cv / "crossval.csv", index=False)
    tests.to_csv(cv / "crossval_tests.csv", index=False)
    reps = tmp_path / "eval" / "replicates"
    reps.mkdir()
    replicate_table(*_frames()).to_csv(reps / "replicates.csv", index=False)
    res = build_report(tmp_path / "report", packages=("numpy",), crossval_dirs=[cv], replicates_dirs=[reps])
    assert res["status"]["studies"] == "done"
    text = "\n".join(res["conclusions"])
    assert ("Cross-validation by patient on real_lungs (lungs) with all labelled images: each of 4 images tested "
            "once over 2 folds: DoLL-init 0.935 (worst seed 0.930, folds 0.930-0.940, lowest image 0.900)") in text
    # the DoLL is above scratch on all 4 images, but 4 pairs cannot reach p < 0.05 (exact Wilcoxon floor 2/16)
    assert "No significant difference between DoLL-init and scratch on real_lungs" in text
    assert "with n=4 the Wilcoxon test cannot reach p < 0.05" in text
    # replicate 1 of 3 favours the shuffled control (tests/test_pretrain_replicates.py)
    assert "Across 3 pre-training replicates on infection with 4 labelled images: DoLL-init - " in text
    assert "in 2 of 3 replicates" in text
    # the shuffled control is 0.05 above scratch on every image of every replicate: no spread, no t-test, no verdict
    assert ("shuffled-DoLL init - scratch +0.0500 mean Dice (0.7500 vs 0.7000), favouring shuffled-DoLL init in 3 of 3 "
            "replicates, t-test p=n/a, Holm p=n/a: no difference established across pre-trainings") in text
    # DoLL - scratch: Holm p 0.072 over the 3 replicate-level rows: a verdict at alpha 0.1, none at 0.05
    from bundle.reporting.report import replicate_conclusions

    table = replicate_table(*_frames())
    assert "Holm p=0.0719: no difference established" in "\n".join(replicate_conclusions(table))
    assert "Holm p=0.0719: DoLL-init is better, established across pre-trainings (alpha=0.1)" in \
        "\n".join(replicate_conclusions(table, alpha=0.1))
    frames, scratch = _frames()                      # a single replicate: no sentence across replicates
    assert replicate_conclusions(replicate_table({0: frames[0]}, scratch)) == []
    bare = build_report(tmp_path / "report2", packages=("numpy",))
    assert "studies" not in bare["status"]
    assert "Studies beside the pipeline" not in (tmp_path / "report2" / "report.md").read_text()


def _curves() -> pd.DataFrame:
    """Validation curves of 4 paired runs (fold:seed): the DoLL reaches 95% of its best at step 30, 30, 45, 60 and
    stops at 150, 150, 150, 180; scratch at 60, 90, 45, 90 and stops at 180 every time."""
    rows = []
    plan = {"doll": ([30, 30, 45, 60], [150, 150, 150, 180]), "scratch": ([60, 90, 45, 90], [180] * 4)}
    for init, (reach, stop) in plan.items():
        for run, (r, end) in enumerate(zip(reach, stop)):
            for steps in range(15, end + 1, 15):
                rows.append({"task": "real_lungs", "init": init, "train_size": "all", "seed": f"{run // 2}:{run % 2}",
                             "steps": steps, "val_mean_dice": 0.9 if steps >= r else 0.5})
    return pd.DataFrame(rows)


def test_efficiency_pairs_by_hand_and_against_scipy():
    from bundle.reporting.analysis import efficiency_pairs
    from bundle.reporting.report import efficiency_pair_sentences

    row = efficiency_pairs(_curves()).iloc[0]
    to_diff, run_diff = [-30, -60, 0, -30], [-30, -30, -30, 0]
    assert (row.init, row.reference, row.n, row.n_fewer) == ("doll", "scratch", 4, 3)
    assert row.steps_to_95_diff == pytest.approx(np.mean(to_diff))
    assert row.steps_run_diff == pytest.approx(np.mean(run_diff))
    assert row.p_steps_to == pytest.approx(stats.wilcoxon(to_diff).pvalue)    # the tie is dropped, as scipy does
    assert row.p_steps_run == pytest.approx(stats.wilcoxon(run_diff).pvalue)
    sentence = efficiency_pair_sentences(efficiency_pairs(_curves()))[0]
    assert sentence == ("Training efficiency on real_lungs with all labelled images: DoLL-init reaches 95% of its best "
                        "validation Dice 30.0 optimizer steps sooner than scratch (mean over 4 paired runs; sooner in "
                        "3; Wilcoxon p=0.2500, not significant), and its runs end 22.5 steps sooner than scratch's "
                        "(p=0.2500).")

"""The report (configs/report.yaml, bundle/reporting/report.py): content checks on synthetic inputs.

Reuses the analysis of ``tests/test_analysis.py`` (a known DoLL-init effect at 2 and 4 labelled images, none at 8),
adds a fake DoLL quality summary, classifier metrics, pipeline timings and a benchmark file, builds the report through
``monai.bundle.run`` and reads the HTML back: tables, numbers, embedded images, computed conclusions, MLflow.
"""

from __future__ import annotations

import base64
import html as html_lib
import importlib.metadata
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from report_parser import ReportParser, parse, table  # noqa: F401
from test_analysis import (  # noqa: F401  (session fixtures shared with the analysis tests)
    PREFIX,
    effect_env,
    expected_diff,
    make_sweep_csv,
    mlflow_uri,
    run_config,
)

OBS = ("Cardiomegaly", "Pleural Effusion", "Lung Lesion")


def write_side_inputs(eval_dir: Path) -> dict[str, Any]:
    """Fake DoLL quality summary + panel, two classifiers' metrics, pipeline timings and a benchmark JSON."""
    from PIL import Image

    rng = np.random.default_rng(3)
    rows = []
    for obs in OBS:
        for method in ("doll", "gradcam", "ig_single"):
            iou = {"doll": 0.5, "gradcam": 0.2, "ig_single": 0.3}[method] + rng.uniform(0, 0.05)
            rows.append({"observation": obs, "method": method, "n": 10, "iou": iou, "dice": 2 * iou / (1 + iou),
                         "hit": 0.8})
    summary = pd.DataFrame(rows)
    overall = summary.groupby("method", as_index=False)[["iou", "dice", "hit"]].mean().assign(observation="all", n=30)
    summary = pd.concat([summary, overall], ignore_index=True)
    (eval_dir / "doll_quality").mkdir(parents=True, exist_ok=True)
    summary.to_csv(eval_dir / "doll_quality" / "summary.csv", index=False)
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(eval_dir / "doll_quality" / "panel.png")
    classifiers = {}
    for k, name in enumerate(("densenet_small_seed0", "segresnet_encoder_seed1")):
        metrics = {"val_mean_auroc": 0.8 + 0.05 * k, **{f"auroc_{o.lower().replace(' ', '_')}": 0.7 + 0.1 * j + 0.01 * k
                                                       for j, o in enumerate(OBS)}}
        path = eval_dir / "classifiers" / name / "metrics_test.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"classifier": name, "split": "test", "metrics": metrics}))
        classifiers[name] = metrics
    timing = {"data": 12.5, "classifier_densenet_small_seed0": 80.0, "analysis": 20.0, "total": 112.5}
    (eval_dir / "pipeline_timing.json").write_text(json.dumps(timing))
    (eval_dir / "bench").mkdir(exist_ok=True)
    (eval_dir / "bench" / "ig.json").write_text(json.dumps({"images_per_s": 3.25, "speedup": {"batched": 4.5}}))
    # the data stage's summary (data/datalists/summary.json beside eval/): real SCR from a data file, phantom rest
    data_summary = {
        "chexpert": {"status": "written", "path": "x", "training": 9, "validation": 1, "test": 3, "source": "phantom",
                     "dataset": "CheXpert", "root": "/p", "given_as": None},
        "scr": {"status": "written", "path": "y", "training": 148, "validation": 50, "test": 49, "source": "real",
                "dataset": "JSRT/SCR", "root": "/data/All247images", "given_as": "jsrt_scr",
                "patient_grouping": "JSRT case names carry no patient id"},
        "real_lungs": {"status": "absent", "root": None, "source": None}}
    (eval_dir.parent / "data" / "datalists").mkdir(parents=True, exist_ok=True)
    (eval_dir.parent / "data" / "datalists" / "summary.json").write_text(json.dumps(data_summary))
    return {"doll": summary, "classifiers": classifiers, "timing": timing}


@pytest.fixture(scope="module")
def report_env(effect_env, mlflow_uri) -> dict[str, Any]:  # noqa: F811
    eval_dir = effect_env["root"] / "eval"
    side = write_side_inputs(eval_dir)
    run_config("report.yaml", effect_env["root"], mlflow_uri)
    out = eval_dir / "report"
    return {**effect_env, **side, "report": out, "html": parse(out / "report.html")}


@pytest.fixture(scope="module")
def null_env(tmp_path_factory) -> dict[str, Any]:
    """A sweep without any effect, analysed without models (no Grad-CAM, no ensembles), reported without MLflow."""
    from bundle.reporting.analysis import AnalysisContext, StatisticsStep, run_analysis
    from bundle.reporting.report import build_report

    root = tmp_path_factory.mktemp("null")
    sweep = make_sweep_csv(root / "sweep.csv", {2: 0.0, 4: 0.0, 8: 0.0}, seed=5)
    run_analysis(AnalysisContext(root / "analysis"), [StatisticsStep(root / "sweep.csv", n_boot=500)])
    res = build_report(root / "report", analysis_dir=root / "analysis", doll_quality_dir=root / "none",
                       montage=root / "none.png", timing_json=root / "none.json")
    return {"root": root, "sweep": sweep, "result": res, "html": parse(Path(res["html"]))}


# --------------------------------------------------------------------------------------------------------------------
def test_statistics_table_equals_the_sweep(report_env):
    stats = table(report_env["html"], "statistics")
    assert list(stats["train_size"]) == ["2", "4", "8"]
    for r in stats.to_dict("records"):
        assert float(r["mean_diff"]) == pytest.approx(expected_diff(report_env["sweep"], int(r["train_size"])),
                                                      abs=5e-5)
        assert float(r["ci_low"]) <= float(r["mean_diff"]) <= float(r["ci_high"])
        assert r["significant"] == ("yes" if r["train_size"] in ("2", "4") else "no")
    # the CSV copy of the table has the analysis' full-precision numbers
    csv = pd.read_csv(report_env["report"] / "tables" / "statistics.csv", dtype={"train_size": str})
    analysis = pd.read_csv(report_env["out"] / "statistics.csv", dtype={"train_size": str})
    np.testing.assert_allclose(csv["p_holm"], analysis["p_holm"])


def test_conclusions_reflect_the_known_effect(report_env):
    conclusions = report_env["html"].conclusions
    stats = pd.read_csv(report_env["out"] / "statistics.csv", dtype={"train_size": str}).set_index("train_size")
    for size in ("2", "4"):
        diff = expected_diff(report_env["sweep"], int(size))
        line = next(c for c in conclusions if f"at {size} labelled images" in c and c.startswith("DoLL-init"))
        assert line.startswith(f"DoLL-init beats scratch on scr at {size} labelled images: {diff:+.4f} mean Dice")
        assert f"CI [{stats.loc[size, 'ci_low']:+.4f}, {stats.loc[size, 'ci_high']:+.4f}]" in line
        assert f"n={20} test images" in line
    line8 = next(c for c in conclusions if "at 8 labelled images" in c)
    assert line8.startswith("No significant difference between DoLL-init and scratch on scr at 8 labelled images")
    assert any("significantly better at 2 sizes (2, 4 labelled images), significantly worse at no size, not "
               "significantly different at 1 size (8 labelled images)" in c for c in conclusions)
    # the Markdown and conclusions.csv carry the same statements
    md = (report_env["report"] / "report.md").read_text()
    assert line8 in md
    assert line8 in set(pd.read_csv(report_env["report"] / "conclusions.csv")["statement"])


def test_side_tables_equal_their_inputs(report_env):
    html = report_env["html"]
    doll = table(html, "doll_quality").set_index("observation")
    for r in report_env["doll"].to_dict("records"):
        assert float(doll.loc[r["observation"], f"iou_{r['method']}"]) == pytest.approx(r["iou"], abs=5e-5)
    auroc = table(html, "classifier_auroc").set_index("classifier")
    for name, metrics in report_env["classifiers"].items():
        assert float(auroc.loc[name, "mean_auroc"]) == pytest.approx(metrics["val_mean_auroc"], abs=5e-4)
        assert float(auroc.loc[name, "Cardiomegaly"]) == pytest.approx(metrics["auroc_cardiomegaly"], abs=5e-4)
    assert "Best mean AUROC: segresnet_encoder_seed1 (0.850)" in " ".join(html.conclusions)
    assert any(c.startswith("Mean IoU over observations") and "the best method is doll" in c
               for c in html.conclusions)
    timing = table(html, "timing").set_index("stage")
    assert float(timing.loc["total", "seconds"]) == 112.5
    assert "slowest stage was classifier_densenet_small_seed0 (80 s, 71%)" in " ".join(html.conclusions)
    bench = table(html, "bench_ig").set_index("key")
    assert float(bench.loc["speedup.batched", "value"]) == 4.5
    curves = table(html, "learning_curves")
    expected = pd.read_csv(report_env["out"] / "learning_curves.csv", dtype={"train_size": str})
    expected = expected[expected["structure"] == "all"]
    assert len(curves) == len(expected) == 6
    for r in curves.to_dict("records"):
        e = expected[(expected["init"] == r["init"]) & (expected["train_size"] == r["train_size"])]["mean"].iloc[0]
        assert float(r["mean"]) == pytest.approx(e, abs=5e-5)
    ens = table(html, "ensembles")
    assert {"union", "intersection", "majority", "staple"} <= set(ens["name"])
    assert "synergy" in {k[len("table-"):] for k in html.tables}


def test_images_are_embedded_and_decodable(report_env):
    from PIL import Image

    html = report_env["html"]
    expected = {"phantom_montage", "doll_panel", "classifier_auroc", "learning_curves", "dice_distributions",
                "gradcam_panel", "ensemble_panel", "timing", "training_efficiency"}
    assert len(html.images) == len(expected)
    for src in html.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.verify()
    assert {p.stem for p in (report_env["report"] / "figures").glob("*.png")} == expected
    text = (report_env["report"] / "report.html").read_text()
    assert "src=\"http" not in text and "src='http" not in text  # nothing outside the file


def test_report_states_which_data_were_real(report_env):
    html = report_env["html"]
    sources = table(html, "data_sources").set_index("datalist")
    assert sources.loc["scr", "source"] == "real" and sources.loc["chexpert", "source"] == "phantom"
    assert sources.loc["real_lungs", "source"] == "absent" and sources.loc["scr", "given as"] == "jsrt_scr"
    text = (report_env["report"] / "report.md").read_text()
    assert "real data: scr = JSRT/SCR (/data/All247images). phantom data: chexpert." in text
    assert "replaced their phantoms: scr." in text


def test_configs_and_versions_included(report_env):
    html = report_env["html"]
    versions = table(html, "packages").set_index("package")
    assert versions.loc["torch", "version"] == importlib.metadata.version("torch")
    assert versions.loc["monai", "version"] == importlib.metadata.version("monai")
    text = (report_env["report"] / "report.html").read_text()
    analysis_yaml = (Path(__file__).resolve().parent.parent / "configs" / "analysis.yaml").read_text()
    assert html_lib.escape(analysis_yaml) in text
    sections = dict(html.sections)
    assert sections.pop("controls").startswith("not run: the sweep has no pre-training control")  # no control init
    assert all(v == "done" for v in sections.values()), html.sections


def test_report_mlflow_run_has_the_figures(report_env, mlflow_uri):  # noqa: F811
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(f"{PREFIX}_report")
    run = next(r for r in client.search_runs([exp.experiment_id])
               if r.data.params.get("out_dir") == str(report_env["report"]))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "report.md", "learning_curves.png", "gradcam_panel.png", "ensemble_panel.png",
            "timing.png", "statistics.csv"} <= artifacts
    assert run.data.metrics["n_figures"] == 9


def test_null_dataset_says_no_significant_difference(null_env):
    conclusions = null_env["html"].conclusions
    per_size = [c for c in conclusions if "labelled images:" in c or "labelled images (alpha" in c]
    assert len(per_size) == 3
    assert all(c.startswith("No significant difference between DoLL-init and scratch") for c in per_size)
    assert not any("beats" in c for c in conclusions)
    for size in (2, 4, 8):
        assert any(f"{expected_diff(null_env['sweep'], size):+.4f} mean Dice" in c for c in per_size)
    status = null_env["html"].sections
    assert status["statistics"] == "done"
    assert status["gradcam"].startswith("not run") and status["ensembles"].startswith("not run")
    assert status["doll"].startswith("not run") and status["phantom"].startswith("not run")


def test_report_without_any_input(tmp_path):
    from bundle.reporting.report import build_report

    res = build_report(tmp_path / "report", analysis_dir=tmp_path / "analysis", doll_quality_dir=tmp_path / "dq")
    html = parse(Path(res["html"]))
    assert {k for k, v in html.sections.items() if v.startswith("not run")} == {
        "phantom", "doll", "classifiers", "learning_curves", "efficiency", "statistics", "controls", "gradcam",
        "ensembles", "throughput"}
    assert html.sections["reproducibility"] == "done"
    assert "analysis stage not run" in html.sections["statistics"]
    assert html.images == []
    assert (tmp_path / "report" / "report.md").read_text().count("*not run") == 10


def test_sentence_when_the_reference_wins():
    from bundle.reporting.report import comparison_sentence

    row = {"task": "scr", "init": "doll", "reference": "scratch", "train_size": "all", "n": 12, "mean_init": 0.7,
           "mean_reference": 0.75, "mean_diff": -0.05, "ci_low": -0.07, "ci_high": -0.03, "p_holm": 0.01,
           "confidence": 0.95}
    assert comparison_sentence(row, {"doll": "DoLL-init"}) == (
        "scratch beats DoLL-init on scr at all labelled images: -0.0500 mean Dice (0.7000 vs 0.7500), 95% CI "
        "[-0.0700, -0.0300], Holm p=0.0100 (Wilcoxon signed-rank, n=12 test images).")
    assert comparison_sentence({**row, "p_holm": 0.2}).startswith("No significant difference between DoLL-init and")

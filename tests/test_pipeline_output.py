"""Checks of a finished pipeline run (CI: after `bash scripts/main.sh --quick`, with CXR_DOLL_PIPELINE_ROOT=quick).

The report must hold real content: tables whose numbers parse, embedded images that decode, conclusions computed
from the statistics table, MLflow runs of every stage. Skipped when no pipeline output is there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from report_parser import parse

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_ROOT = Path(os.environ.get("CXR_DOLL_PIPELINE_ROOT", ROOT / "quick"))
if not PIPELINE_ROOT.is_absolute():
    PIPELINE_ROOT = ROOT / PIPELINE_ROOT
REPORT = PIPELINE_ROOT / "eval" / "report" / "report.html"

pytestmark = pytest.mark.skipif(not REPORT.exists(), reason=f"no pipeline output at {PIPELINE_ROOT} "
                                "(run `bash scripts/main.sh --quick` first)")


def test_report_embeds_decodable_images():
    from PIL import Image

    html = REPORT.read_text()
    sources = parse(REPORT).images
    assert len(sources) >= 5
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:80]  # embedded, nothing fetched
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.size[0] > 10 and im.size[1] > 10
    # self-contained: no external stylesheet, script or image (config text may mention URLs)
    assert not re.search(r'<(link|script)[^>]+(href|src)="https?://', html)


def test_report_tables_parse_and_match_the_stage_outputs():
    html = REPORT.read_text()
    tables = parse(REPORT).tables
    assert len(tables) >= 4
    for name, rows in tables.items():  # every table has a header and rows of the header's width
        assert len(rows) >= 2 and all(len(r) == len(rows[0]) for r in rows), name
    # classifier AUROC in the report equals the classifier stage's metrics file
    for path in (PIPELINE_ROOT / "eval" / "classifiers").glob("*/metrics_test.json"):
        value = json.loads(path.read_text())["metrics"]["val_mean_auroc"]
        assert f"{value:.3f}" in html
    # the statistics table in the report: numbers parse, one row per init x size compared with scratch
    stats = pd.read_csv(PIPELINE_ROOT / "eval" / "analysis" / "statistics.csv")
    assert len(stats) >= 1 and stats["mean_diff"].notna().all()
    for diff in stats["mean_diff"]:
        assert f"{diff:+.4f}" in html
    conclusions = pd.read_csv(PIPELINE_ROOT / "eval" / "report" / "conclusions.csv")
    statements = conclusions["statement"].astype(str).tolist()
    significant = stats["significant"].astype(bool)
    # the conclusions follow the statistics: one claim of a difference per significant comparison at least, and a
    # "no significant difference" statement when some comparison is not significant
    assert sum(("beats" in s or "worse" in s) for s in statements) >= int(significant.sum())
    if (~significant).any():
        assert any("no significant difference" in s.lower() for s in statements)


def test_every_stage_logged_to_mlflow():
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{PIPELINE_ROOT / 'eval' / 'mlruns.db'}")
    names = {e.name for e in client.search_experiments()}
    for stage in ("classifiers", "doll", "pretrain", "finetune", "analysis", "report"):
        assert any(n.endswith(stage) for n in names), (stage, names)
    report_exp = next(e for e in client.search_experiments() if e.name.endswith("report"))
    run = client.search_runs([report_exp.experiment_id])[0]
    assert any(a.path.endswith(".html") or a.is_dir for a in client.list_artifacts(run.info.run_id))


def test_timings_cover_every_stage_and_the_real_data_check_ran():
    from scripts.run_pipeline import STAGES

    timing = json.loads((PIPELINE_ROOT / "eval" / "pipeline_timing.json").read_text())
    stages = [k for k in timing if k not in ("total", "steps")]
    assert stages == list(STAGES)                     # every stage ran, in order
    assert timing["total"] == pytest.approx(sum(timing[s] for s in STAGES), abs=0.5)
    sweep = pd.read_csv(PIPELINE_ROOT / "eval" / "segmentation" / "sweep_test.csv", dtype={"train_size": str})
    assert {"doll", "scratch"} <= set(sweep["init"]) and sweep["dice"].between(0, 1).all()
    # the quick schedule is meant to learn the large structures in its few steps (configs/sweep.yaml): the lungs
    # above 0.5 in every run, so that an override lost on its way to the config (a run at the wrong schedule) fails
    # here with or without the real radiographs
    scr_lungs = sweep[(sweep["task"] == "scr") & (sweep["structure"] == "lungs")]
    by_run = scr_lungs.groupby(["init", "train_size", "seed"])["dice"].mean()
    assert len(by_run) and by_run.min() > 0.5, by_run
    if (PIPELINE_ROOT / "data" / "datalists" / "real_lungs.json").is_file():  # ../shared present: real radiographs
        real = sweep[sweep["task"] == "real_lungs"]
        assert set(real["init"]) == {"doll", "scratch"}
        assert real.groupby("init")["dice"].mean().min() > 0.5, real.groupby("init")["dice"].mean()

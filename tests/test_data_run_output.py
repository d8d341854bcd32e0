"""Checks of a finished ``--data`` pipeline run (CI: after ``python tests/data_formats.py quick/real-formats`` and
``bash scripts/main.sh --quick --data quick/real-formats/data.yaml``, with CXR_DOLL_PIPELINE_ROOT=quick): the run on
the tests' trees in the real formats (JSRT ``.IMG`` + SCR GIF at half size, QaTa-COV19-v2, CheXpert-v1.0-small with
CheXlocalize's segmentations) reached the report, the DoLL was scored against CheXlocalize, the report and MLflow say
the data were real, no phantom was drawn; and a malformed or missing file stops the data stage with the file named
and no datalist written. Skipped when no such run is there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from data_formats import make_all
from report_parser import parse, table

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_ROOT = Path(os.environ.get("CXR_DOLL_PIPELINE_ROOT", ROOT / "quick"))
if not PIPELINE_ROOT.is_absolute():
    PIPELINE_ROOT = ROOT / PIPELINE_ROOT
RUN = PIPELINE_ROOT / "real"  # where `--quick --data` writes
REPORT = RUN / "eval" / "report" / "report.html"

pytestmark = pytest.mark.skipif(not REPORT.exists(), reason=f"no --data pipeline output at {RUN} (run `python "
                                "tests/data_formats.py quick/real-formats && bash scripts/main.sh --quick --data "
                                "quick/real-formats/data.yaml` first)")


def test_report_states_which_data_were_real():
    html = REPORT.read_text()
    assert "Data sources" in html and "real data: chexpert = CheXpert (" in html
    assert "scr = JSRT/SCR (" in html and "qata = QaTa-COV19 (" in html and "phantom data: none" in html
    assert "The datasets of the data file (--data) replaced their phantoms: chexpert, scr, qata" in html


def test_datalists_are_the_real_files_and_no_phantom_was_drawn():
    datalists = RUN / "data" / "datalists"
    summary = json.loads((datalists / "summary.json").read_text())
    for name, key in (("chexpert", "chexpert"), ("scr", "jsrt_scr"), ("qata", "qata")):
        assert summary[name]["source"] == "real" and summary[name]["given_as"] == key
    scr = json.loads((datalists / "scr.json").read_text())
    items = scr["training"] + scr["validation"] + scr["test"]
    assert items and all(it["image"].endswith(".IMG") for it in items)
    assert all(p.endswith(".gif") and "/scratch/fold" in p for it in items for p in it["label"])
    assert "no patient id" in summary["scr"]["patient_grouping"]
    assert not (RUN / "data" / "phantom").exists()


def test_every_real_task_was_trained_and_evaluated():
    sweep = pd.read_csv(RUN / "eval" / "segmentation" / "sweep_test.csv")
    assert {"scr", "infection"} <= set(sweep["task"])
    scr = sweep[sweep["task"] == "scr"]
    assert set(scr["structure"]) == {"lungs", "heart", "clavicles"} and scr["dice"].notna().all()


def test_the_doll_was_scored_against_chexlocalize():
    """The CheXlocalize release folder (the data file's chexpert.localize) made the DoLL quality stage run on real
    CheXpert, judged on the test set the release holds: every scored image is a CheXpert test radiograph (valid.csv,
    whose masks are for tuning, became the validation split), the summary names the judge, the report says so."""
    quality = RUN / "eval" / "doll_quality"
    rows = pd.read_csv(quality / "rows.csv")
    summary = pd.read_csv(quality / "summary.csv")
    assert len(rows) and rows["image"].str.contains("/chexlocalize/CheXpert/test/").all()
    datalists = json.loads((RUN / "data" / "datalists" / "summary.json").read_text())
    assert datalists["chexpert"]["splits"] == "CheXpert" and set(datalists["chexpert"]["with_lesion"]) == {
        "validation", "test"}
    sources = table(parse(REPORT), "data_sources").set_index("datalist")
    assert sources.loc["chexpert", "splits"] == "CheXpert" and str(sources.loc["chexpert", "test"]) == "6"
    assert set(summary["judge"]) == {"CheXlocalize"}
    assert set(rows["observation"]) <= {"Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                                        "Edema", "Consolidation", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                                        "Support Devices"}
    assert "segmentations of real CheXpert radiographs" in REPORT.read_text()
    # scored as CheXlocalize's evaluation does: at each mask's own size (here 2x the small images), no tolerance
    from bundle.data.io import load_bitmask

    lesions = {it["image"]: it["lesion"] for it in json.loads((RUN / "data" / "datalists" / "chexpert.json")
                                                                .read_text())["test"] if it.get("lesion")}
    for image, size in rows.groupby("image")["scored_at"].first().items():
        assert size == "x".join(map(str, load_bitmask(lesions[image], 14).shape[-2:])) != "128x128"
    assert set(summary["scoring"]) == {"label, tolerance 0 px"}
    assert "scored at each mask&#x27;s own size with no pointing-game tolerance" in REPORT.read_text()


def test_tune_doll_tunes_on_the_validation_masks_apart_from_the_judged_test_set(tmp_path):
    """scripts/tune_doll.py on the run: CheXlocalize's validation masks (valid.csv) are the tuning split, the quality
    stage's test set is named as the judged one, and the tables go under the run's root, not into the docs."""
    import shutil

    root = tmp_path / "run"
    root.mkdir()
    for sub in ("data", "models"):  # the run's data and classifiers, through links (nothing in RUN is written)
        (root / sub).symlink_to(RUN / sub)
    docs = (ROOT / "docs" / "doll_tuning.md").read_text()
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_doll.py"), "--root", str(root), "--skip-grid",
                          "--max-images", "4"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning" not in res.stdout
    text = (root / "doll_tuning.md").read_text()
    assert text.startswith("# DoLL post-processing tuned on CheXlocalize")
    assert "4 validation images with lesion masks (the quality stage scores the test split)" in text
    assert (ROOT / "docs" / "doll_tuning.md").read_text() == docs
    # the documented next step: the quality stage with the tuning's overlay, judged on the test set
    overlay = root / "doll_thresholds.yaml"
    import yaml

    values = yaml.safe_load(overlay.read_text())["doll#post#class_threshold_values"]
    assert all(80 <= v <= 99.75 for v in values.values())
    configured = yaml.safe_load((ROOT / "configs" / "generate_doll.yaml").read_text())["doll"]["post"][
        "class_threshold_values"]
    assert set(values) == set(configured)  # every observation: tuned, or kept where CheXlocalize has no mask
    assert "Kept from the config (no lesion mask to tune them on): Pneumonia, Pleural Other, Fracture" in \
        overlay.read_text()
    # each tuned observation's smoothing too (the untuned keep smooth_sigma), from the default candidates
    sigmas = yaml.safe_load(overlay.read_text())["doll#post#class_smooth_sigma"]
    assert set(sigmas) == set(values) - {"Pneumonia", "Pleural Other", "Fracture"}
    assert set(sigmas.values()) <= {1.0, 2.0, 4.0, 8.0}
    configs = [str(ROOT / "configs" / c) for c in ("generate_doll.yaml", "evaluate_doll.yaml")] + [str(overlay)]
    res = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs), "--data_root",
                          str(root / "data"), "--models_dir", str(root / "models"), "--output_root",
                          str(root / "eval")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = pd.read_csv(root / "eval" / "doll_quality" / "summary.csv")
    assert set(summary["split"]) == {"test"} and set(summary["judge"]) == {"CheXlocalize"}
    shutil.rmtree(root)


def test_mlflow_records_the_sources():
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{RUN / 'eval' / 'mlruns.db'}")
    runs = mlflow.search_runs(experiment_names=["cxr_doll_data"])
    assert len(runs) >= 1
    last = runs.iloc[0]
    assert last["params.source_scr"].startswith("real: JSRT/SCR") and last["tags.real_data"] == "True"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run_pipeline.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_malformed_or_missing_files_stop_with_the_file_named(tmp_path):
    data_file = make_all(tmp_path / "user", chexpert=False)
    bad = sorted((tmp_path / "user" / "jsrt_scr" / "All247images").glob("*.IMG"))[3]
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated .IMG
    res = _run(["--quick", "--data", str(data_file), "--root", str(tmp_path / "run"), "--stages", "data"], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and f"{bad}: not a JSRT .IMG file: 1000 bytes" in out
    assert not list((tmp_path / "run" / "data").rglob("*.json"))  # no datalist, no summary
    # a data file naming a folder that is not there: stops before any stage, nothing created
    (tmp_path / "bad.yaml").write_text("jsrt_scr: {images: /nonexistent/All247images, masks: /nonexistent}\n")
    res = _run(["--quick", "--data", str(tmp_path / "bad.yaml"), "--root", str(tmp_path / "run2")], tmp_path)
    assert res.returncode != 0 and "/nonexistent/All247images: folder not found (given as jsrt_scr.images" in res.stderr
    assert not (tmp_path / "run2").exists()

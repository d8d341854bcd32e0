"""The analysis stage (configs/analysis.yaml, bundle/reporting/analysis.py) on synthetic inputs with a known effect.

The session fixture :func:`effect_env` builds, in a temporary folder: a sweep CSV in which DoLL-init beats scratch by
0.05 Dice at 2 and 4 labelled images and equals it (up to noise) at 8; a tiny SCR-style test set (48 x 48 images,
five SCR masks each); two random SegResNet checkpoints (``out_channels=3``) and two folders of saved predictions at
training size 4. It runs the analysis through ``monai.bundle.run`` with the bundle's configs (in-process), with an
MLflow SQLite store. ``tests/test_report.py`` reuses it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs"
PREFIX = "testanalysis"
STRUCTURES = ("lungs", "heart", "clavicles")
SIZES = (2, 4, 8)
SEEDS = (0, 1, 2)
N_IMAGES = 20
EFFECT = {2: 0.05, 4: 0.05, 8: 0.0}
IMAGE = 48
NET_SIZE = 32


# --------------------------------------------------------------------------------------------------------------------
# synthetic inputs
# --------------------------------------------------------------------------------------------------------------------
def make_sweep_csv(path: Path, effect: dict[int, float], seed: int = 0) -> pd.DataFrame:
    """A tidy sweep CSV: scratch Dice per image/structure/seed, DoLL = scratch + effect[size] + small noise."""
    rng = np.random.default_rng(seed)
    image_level = rng.uniform(0.55, 0.75, N_IMAGES)
    offsets = {"lungs": 0.1, "heart": 0.05, "clavicles": -0.05}
    rows = []
    for size in SIZES:
        for s in SEEDS:
            for i in range(N_IMAGES):
                for st in STRUCTURES:
                    base = image_level[i] + offsets[st] + 0.02 * np.log2(size) + rng.normal(0, 0.01)
                    for init, value in (("scratch", base), ("doll", base + effect[size] + rng.normal(0, 0.01))):
                        rows.append({"task": "scr", "init": init, "train_size": str(size), "seed": s, "mode": "full",
                                     "split": "test", "n_train": size, "image": f"img{i:03d}", "structure": st,
                                     "dice": float(value), "iou": float(value) / (2 - float(value)), "hd95": 3.0,
                                     "pred_area": 100, "ref_area": 100})
    frame = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return frame


def make_val_curves_csv(path: Path) -> pd.DataFrame:
    """Validation curves with a known efficiency: DoLL reaches its plateau (0.9) in 45 steps, scratch in 90."""
    rows = []
    for size in SIZES:
        for s in SEEDS:
            for init, rate in (("doll", 0.3), ("scratch", 0.15)):
                for epoch in range(1, 11):
                    rows.append({"task": "scr", "init": init, "train_size": str(size), "seed": s, "mode": "full",
                                 "epoch": epoch, "steps": 15 * epoch, "val_mean_dice": min(0.9, rate * epoch)})
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False)
    return frame


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def make_test_set(data_root: Path, n: int = 4) -> list[dict[str, Any]]:
    """SCR layout: ``JSRT/images/<case>.png`` and ``SCR/masks/<structure>/<case>.png``; datalist ``scr.json``."""
    from PIL import Image

    rng = np.random.default_rng(7)
    items = []
    names = ("left lung", "right lung", "heart", "left clavicle", "right clavicle")
    for k in range(n):
        case = f"JPCLN{k + 1:03d}"
        masks = [_disc(IMAGE, IMAGE, 24 + k, 14, 9), _disc(IMAGE, IMAGE, 24, 34 - k, 9), _disc(IMAGE, IMAGE, 32, 28, 6),
                 _disc(IMAGE, IMAGE, 8, 12, 3), _disc(IMAGE, IMAGE, 8, 36, 3)]
        img = 0.3 + 0.4 * np.maximum.reduce(masks[:2]) + 0.2 * masks[2] + rng.normal(0, 0.05, (IMAGE, IMAGE))
        img_path = data_root / "JSRT" / "images" / f"{case}.png"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(img_path)
        labels = []
        for name, m in zip(names, masks):
            p = data_root / "SCR" / "masks" / name / f"{case}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m * 255).save(p)
            labels.append(str(p))
        items.append({"image": str(img_path), "label": labels, "patient": case})
    datalists = data_root / "datalists"
    datalists.mkdir(parents=True, exist_ok=True)
    (datalists / "scr.json").write_text(json.dumps({"training": [], "validation": [], "test": items}))
    return items


def reference_masks(item: dict[str, Any]) -> np.ndarray:
    """Lungs, heart, clavicles (unions of the SCR masks) as bool ``(3, H, W)``, read with PIL."""
    from PIL import Image

    m = [np.asarray(Image.open(p)) > 0 for p in item["label"]]
    return np.stack([m[0] | m[1], m[2], m[3] | m[4]])


def make_checkpoint(path: Path, seed: int) -> Path:
    from bundle.networks.segmentation import build_segmenter

    torch.manual_seed(seed)
    net = build_segmenter("segresnet", out_channels=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def make_mask_dir(folder: Path, items: list[dict[str, Any]], shift: int) -> dict[str, np.ndarray]:
    """Saved predictions (the evaluation's layout): the reference shifted by ``shift`` columns."""
    from PIL import Image

    out = {}
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        case = Path(item["image"]).stem
        pred = np.roll(reference_masks(item), shift, axis=-1)
        for c, st in enumerate(STRUCTURES):
            Image.fromarray(pred[c].astype(np.uint8) * 255).save(folder / f"{case}_{st}.png")
        out[case] = pred
    return out


def run_config(config: str, root: Path, tracking_uri: str | None, **overrides: Any) -> None:
    """``monai.bundle.run`` of ``configs/<config>`` (standalone) in-process."""
    from monai.bundle import run

    args = {"data_root": str(root / "data"), "output_root": str(root / "eval"), "models_dir": str(root / "models"),
            "device": "$torch.device('cpu')", "mlflow_experiment_prefix": PREFIX,
            "tracking_uri": tracking_uri or "", **overrides}
    run(config_file=str(CONFIGS / config),
        meta_file=str(CONFIGS / "metadata.json"), **args)


def manual_predict(ckpt: Path, item: dict[str, Any]) -> np.ndarray:
    """Independent inference: PIL -> [0, 1] -> area resize -> percentile scaling -> net -> bilinear -> sigmoid > .5."""
    from PIL import Image

    from bundle.networks.segmentation import build_segmenter

    net = build_segmenter("segresnet", out_channels=3)
    net.load_state_dict(torch.load(ckpt, map_location="cpu"))
    net.eval()
    img = np.asarray(Image.open(item["image"]), dtype=np.float32) / 255.0
    x = torch.nn.functional.interpolate(torch.as_tensor(img)[None, None], size=(NET_SIZE, NET_SIZE), mode="area")
    lo, hi = np.percentile(x.numpy(), [0.5, 99.5])
    x = torch.clamp((x - float(lo)) / (float(hi) - float(lo)), 0, 1)
    with torch.no_grad():
        logits = net(x)
    logits = torch.nn.functional.interpolate(logits, size=img.shape, mode="bilinear", align_corners=False)
    return (torch.sigmoid(logits)[0] > 0.5).numpy()


def np_dice(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    inter = (p & r).sum(axis=(-2, -1))
    total = p.sum(axis=(-2, -1)) + r.sum(axis=(-2, -1))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def expected_diff(sweep: pd.DataFrame, size: int) -> float:
    """Mean over test images of (DoLL - scratch), each image averaged over seeds and structures."""
    sub = sweep[sweep["train_size"].astype(str) == str(size)]
    per_image = sub.groupby(["init", "image"])["dice"].mean().unstack("init")
    return float((per_image["doll"] - per_image["scratch"]).mean())


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread (tiny networks: faster, and robust on a busy machine), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One MLflow SQLite store for the analysis and report tests (creating one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture(scope="session")
def effect_env(tmp_path_factory, mlflow_uri) -> dict[str, Any]:
    """Synthetic inputs with a known effect, and the analysis run on them through configs/analysis.yaml."""
    root = tmp_path_factory.mktemp("effect")
    sweep = make_sweep_csv(root / "eval" / "segmentation" / "sweep_test.csv", EFFECT)
    make_val_curves_csv(root / "eval" / "segmentation" / "sweep_val_curves.csv")
    items = make_test_set(root / "data")
    ckpts = {"doll_seed0": make_checkpoint(root / "models" / "segmentation" / "scr_doll_n4_seed0" / "model.pt", 1),
             "scratch_seed0": make_checkpoint(root / "models" / "segmentation" / "scr_scratch_n4_seed0" / "model.pt",
                                              2)}
    seg = root / "eval" / "segmentation"
    saved = {"doll_seed1": make_mask_dir(seg / "scr_doll_n4_seed1" / "masks_test", items, 1),
             "scratch_seed1": make_mask_dir(seg / "scr_scratch_n4_seed1" / "masks_test", items, 3)}
    with one_thread():
        run_config("analysis.yaml", root, mlflow_uri, image_size=[NET_SIZE, NET_SIZE], n_boot=2000, gradcam_images=2)
    out = root / "eval" / "analysis"
    return {"root": root, "sweep": sweep, "items": items, "ckpts": ckpts, "saved": saved, "out": out,
            "status": json.loads((out / "status.json").read_text())}


# --------------------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------------------
def test_every_section_ran(effect_env):
    status = dict(effect_env["status"])
    assert status.pop("controls").startswith("not run: the sweep has no pre-training control")  # doll vs scratch only
    assert status == {"statistics": "done", "learning_curves": "done", "efficiency": "done", "gradcam": "done",
                      "ensembles": "done"}


def test_training_efficiency_and_seed_tables(effect_env):
    eff = pd.read_csv(effect_env["out"] / "efficiency.csv").set_index(["init", "train_size"])
    # doll: 0.3/epoch reaches 0.855 (95% of 0.9) at epoch 3 = 45 steps; scratch: 0.15/epoch at epoch 6 = 90 steps
    assert (eff.xs("doll")["steps_to_95_mean"] == 45).all() and (eff.xs("scratch")["steps_to_95_mean"] == 90).all()
    assert eff["best_mean"].tolist() == pytest.approx([0.9] * len(eff))
    seeds = pd.read_csv(effect_env["out"] / "seeds.csv")
    assert not seeds["collapsed"].any()  # every synthetic Dice is far above 0.05
    worst = seeds[(seeds["structure"] == "clavicles") & (seeds["init"] == "scratch") & (seeds["train_size"] == 2)]
    frame = effect_env["sweep"]
    by_seed = frame[(frame["structure"] == "clavicles") & (frame["init"] == "scratch") & (frame["train_size"] == "2")]
    assert worst["worst"].iloc[0] == pytest.approx(by_seed.groupby("seed")["dice"].mean().min())


def test_statistics_match_the_known_effect(effect_env):
    stats = pd.read_csv(effect_env["out"] / "statistics.csv", dtype={"train_size": str})
    assert list(stats["train_size"]) == ["2", "4", "8"]
    assert set(stats["init"]) == {"doll"} and set(stats["reference"]) == {"scratch"}
    for r in stats.to_dict("records"):
        size = int(r["train_size"])
        assert r["n"] == N_IMAGES  # the test images are the paired units
        assert r["mean_diff"] == pytest.approx(expected_diff(effect_env["sweep"], size), abs=1e-12)
        assert r["ci_low"] <= r["mean_diff"] <= r["ci_high"]
        assert r["p_holm"] >= r["p_value"]
        assert bool(r["significant"]) == (EFFECT[size] > 0), r
    # Holm over the table of three tests: the smallest p-value is multiplied by 3
    assert stats["p_holm"].min() == pytest.approx(min(1.0, 3 * stats["p_value"].min()))
    per_structure = pd.read_csv(effect_env["out"] / "statistics_structures.csv", dtype={"train_size": str})
    assert len(per_structure) == len(SIZES) * len(STRUCTURES)
    assert set(per_structure["structure"]) == set(STRUCTURES)


def test_replicability_and_learning_curves(effect_env):
    sweep = effect_env["sweep"]
    rep = pd.read_csv(effect_env["out"] / "replicability.csv", dtype={"train_size": str})
    row = rep[(rep["init"] == "doll") & (rep["train_size"] == "4")].iloc[0]
    per_seed = sweep[(sweep["init"] == "doll") & (sweep["train_size"] == "4")].groupby("seed")["dice"].mean()
    assert row["n_seeds"] == len(SEEDS)
    assert row["mean"] == pytest.approx(per_seed.mean(), abs=1e-12)
    assert row["sd"] == pytest.approx(per_seed.std(ddof=1), abs=1e-12)

    curves = pd.read_csv(effect_env["out"] / "learning_curves.csv", dtype={"train_size": str})
    overall = curves[curves["structure"] == "all"]
    assert set(curves["structure"]) == {"all", *STRUCTURES}
    for (init, size), g in overall.groupby(["init", "train_size"]):
        sub = sweep[(sweep["init"] == init) & (sweep["train_size"] == size)]
        assert g["mean"].iloc[0] == pytest.approx(sub["dice"].mean(), abs=1e-12)
        assert g["ci_low"].iloc[0] < g["mean"].iloc[0] < g["ci_high"].iloc[0]
        assert g["n_images"].iloc[0] == N_IMAGES and g["n_seeds"].iloc[0] == len(SEEDS)
    assert list(overall[overall["init"] == "doll"]["train_size"]) == ["2", "4", "8"]


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_gradcam_views(effect_env):
    rows = pd.read_csv(effect_env["out"] / "gradcam.csv")
    assert set(rows["model"]) == {"doll", "scratch"}
    assert len(rows) == 2 * 2 * len(STRUCTURES)  # models x images x structures
    assert set(rows["mode"]) == {"hirescam"}
    finite = rows["inside_fraction"].dropna()
    assert len(finite) > 0 and ((finite >= 0) & (finite <= 1)).all()
    # the reference areas are those of the 32 x 32 reference masks of the first two images
    first = reference_masks(effect_env["items"][0])
    lungs = torch.nn.functional.interpolate(torch.as_tensor(first[None].astype(np.float32)), size=(NET_SIZE, NET_SIZE),
                                            mode="nearest")[0, 0].numpy() > 0.5
    row = rows[(rows["model"] == "doll") & (rows["image"] == "JPCLN001") & (rows["structure"] == "lungs")].iloc[0]
    assert row["ref_area"] == int(lungs.sum())
    # the panel: 2 images x 2 models rows, 1 + 3 tiles of 128 px (+16 px titles) each
    assert _png_size(effect_env["out"] / "gradcam_panel.png") == (4 * 128, 4 * (128 + 16))


def test_ensembles_against_independent_computation(effect_env):
    items, ckpts, saved = effect_env["items"], effect_env["ckpts"], effect_env["saved"]
    rows = pd.read_csv(effect_env["out"] / "ensembles_rows.csv")
    assert set(rows[rows["method"] == "single"]["models"]) == {"doll_seed0", "doll_seed1", "scratch_seed0",
                                                               "scratch_seed1"}
    assert set(rows["method"]) == {"single", "union", "intersection", "majority", "staple"}
    for item in items:
        case = Path(item["image"]).stem
        ref = reference_masks(item)
        with one_thread():
            preds = {"doll_seed0": manual_predict(ckpts["doll_seed0"], item), "doll_seed1": saved["doll_seed1"][case],
                     "scratch_seed0": manual_predict(ckpts["scratch_seed0"], item),
                     "scratch_seed1": saved["scratch_seed1"][case]}
        stack = np.stack([preds[k] for k in sorted(preds)])
        expected = {"union": np_dice(stack.any(0), ref), "intersection": np_dice(stack.all(0), ref),
                    "majority": np_dice(stack.sum(0) * 2 > len(stack), ref)}
        expected.update({k: np_dice(v, ref) for k, v in preds.items()})
        got = rows[rows["image"] == case]
        for name, dsc in expected.items():
            sel = got[(got["method"] == "single") & (got["models"] == name)] if name in preds else \
                got[got["method"] == name]
            sel = sel.set_index("structure").loc[list(STRUCTURES), "dice"].to_numpy()
            np.testing.assert_allclose(sel, dsc, atol=1e-9, err_msg=f"{case} {name}")
    summary = pd.read_csv(effect_env["out"] / "ensembles.csv")
    union_all = summary[(summary["method"] == "union") & (summary["structure"] == "all")]["dice"].iloc[0]
    union_rows = rows[rows["method"] == "union"].groupby("image")["dice"].mean().mean()
    assert union_all == pytest.approx(union_rows, abs=1e-12)
    synergy = pd.read_csv(effect_env["out"] / "synergy.csv")
    assert len(synergy[synergy["structure"] == "all"]) == 6  # 4 models: 6 pairs
    assert ((synergy["union_wins"] >= 0) & (synergy["union_wins"] <= 1)).all()
    assert _png_size(effect_env["out"] / "ensemble_panel.png")[0] == 5 * 128  # 1 + 4 models + 4 ensembles, 5 a row


def test_mlflow_run_reads_back(effect_env, mlflow_uri):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(f"{PREFIX}_analysis")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'analysis'")
    run = next(r for r in runs if r.data.params.get("sweep_csv", "").startswith(str(effect_env["root"])))
    assert run.info.status == "FINISHED"
    stats = pd.read_csv(effect_env["out"] / "statistics.csv", dtype={"train_size": str})
    assert run.data.metrics["stat_scr_doll_n4_mean_diff"] == pytest.approx(
        float(stats[stats["train_size"] == "4"]["mean_diff"].iloc[0]))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"statistics.csv", "learning_curves.png", "dice_distributions.png", "gradcam_panel.png",
            "ensemble_panel.png", "status.json"} <= artifacts


def test_missing_inputs_are_not_run(tmp_path):
    from bundle.reporting.analysis import (AnalysisContext, EfficiencyStep, EnsembleStep, GradCAMStep,
                                           StatisticsStep, run_analysis)

    steps = [StatisticsStep(tmp_path / "none.csv"), EfficiencyStep(None),
             GradCAMStep({"doll": tmp_path / "x.pt", "scratch": tmp_path / "y.pt"}),
             EnsembleStep({"a": tmp_path / "a.pt"})]
    res = run_analysis(AnalysisContext(tmp_path / "analysis", datalist=tmp_path / "none.json"), steps)
    assert all(v.startswith("not run") for v in res["status"].values()), res["status"]
    assert "x.pt" in res["status"]["gradcam"] and "at least two" in res["status"]["ensembles"]
    assert json.loads((tmp_path / "analysis" / "status.json").read_text()) == res["status"]


def test_bad_sweep_csv_names_the_file(tmp_path):
    from bundle.reporting.analysis import load_sweep
    from bundle.utils import BundleInputError

    bad = tmp_path / "sweep.csv"
    bad.write_text("task,init,seed\nscr,doll,0\n")
    with pytest.raises(BundleInputError, match=str(bad)):
        load_sweep(bad)

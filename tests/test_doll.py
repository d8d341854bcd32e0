"""The IG-to-DoLL recipe: post-processing steps against references, the generator on a known-answer classifier,
the transforms, and resumable / sharded generation through the bundle config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from bundle.data.io import load_bitmask
from bundle.doll import postprocess as pp
from bundle.doll.generator import DoLLGenerator, IGToDoLL, IGToDoLLd

ROOT = Path(__file__).resolve().parent.parent


# ---- post-processing ------------------------------------------------------------------------------------------
def test_gaussian_smooth_matches_scipy():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 20, 24)).astype(np.float64)
    ours = pp.gaussian_smooth(torch.as_tensor(maps), sigma=1.5).numpy()
    ref = np.stack([ndimage.gaussian_filter(m, 1.5, mode="mirror", truncate=3.0) for m in maps])
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_gaussian_smooth_per_map_sigma_matches_scipy():
    """One sigma per map (the per-observation smoothing): each map smoothed with its own sigma, as scipy's filter;
    sigma 0 leaves its map unchanged; a sigma count that is neither 1 nor one per map is refused."""
    rng = np.random.default_rng(1)
    maps = rng.random((3, 20, 24)).astype(np.float64)
    sigmas = [1.0, 0.0, 2.5]
    ours = pp.gaussian_smooth(torch.as_tensor(maps), torch.tensor(sigmas)).numpy()
    for m, sigma, out in zip(maps, sigmas, ours):
        ref = ndimage.gaussian_filter(m, sigma, mode="mirror", truncate=3.0) if sigma else m
        np.testing.assert_allclose(out, ref, atol=1e-10)
    with pytest.raises(ValueError, match="one per map"):
        pp.gaussian_smooth(torch.as_tensor(maps), torch.tensor([1.0, 2.0]))


def test_otsu_threshold_separates_two_modes():
    values = np.concatenate([np.full(500, 0.2), np.full(300, 0.7)])
    t = pp.otsu_threshold(values)
    assert 0.2 < t <= 0.7
    masks = pp.threshold_maps(torch.as_tensor(values.reshape(1, 20, 40)), "otsu", 0.0)
    assert int(masks.sum()) == 300


def test_threshold_methods_and_empty_maps():
    m = torch.linspace(0, 1, 100).view(1, 10, 10)
    assert int(pp.threshold_maps(m, "fixed", 0.5).sum()) == 50
    assert int(pp.threshold_maps(m, "percentile", 90).sum()) == 10
    assert not pp.threshold_maps(torch.zeros(1, 5, 5), "otsu").any()
    with pytest.raises(ValueError, match="unknown threshold"):
        pp.threshold_maps(m, "magic")


def test_per_map_and_per_observation_thresholds():
    """One threshold value per map (hand-computed counts on a 0..1 ramp of 100 pixels), and the generator's
    per-observation values: a Fracture map at the 99th percentile keeps 1 pixel where the default 90th keeps 10."""
    from bundle.constants import OBSERVATIONS
    from bundle.doll.generator import PostprocessSettings

    ramp = torch.linspace(0, 1, 100).view(1, 10, 10)
    maps = ramp.repeat(3, 1, 1)
    counts = pp.threshold_maps(maps, "percentile", torch.tensor([90.0, 50.0, 90.0])).flatten(1).sum(1)
    assert counts.tolist() == [10, 50, 10]
    assert pp.threshold_maps(maps, "fixed", torch.tensor([0.5, 0.8, 0.95])).flatten(1).sum(1).tolist() == [50, 20, 5]
    with pytest.raises(ValueError, match="one per map"):
        pp.threshold_maps(maps, "fixed", torch.tensor([0.5, 0.5]))
    gen = DoLLGenerator(_tiny_classifiers(1), post={"threshold": "percentile", "threshold_value": 90.0,
                                                     "min_component_size": 1,
                                                     "class_threshold_values": {"Fracture": 99.0}})
    fracture, edema = OBSERVATIONS.index("Fracture"), OBSERVATIONS.index("Edema")
    masks = gen.binarize(maps[:2], [fracture, edema])
    assert masks.flatten(1).sum(1).tolist() == [1, 10]
    assert gen.binarize(maps[:1]).sum() == 10  # no classes given: the common value
    with pytest.raises(ValueError, match="unknown observation"):
        PostprocessSettings(class_threshold_values={"Fractures": 99.0})


def test_remove_small_components_keeps_large_ones():
    mask = np.zeros((1, 20, 20), dtype=bool)
    mask[0, 2:8, 2:8] = True       # 36 px
    mask[0, 15:17, 15:17] = True   # 4 px speck
    out = pp.remove_small_components(torch.as_tensor(mask), min_size=10).numpy()
    assert out[0, 2:8, 2:8].all() and not out[0, 15:17, 15:17].any()


def test_normalize_maps_per_map():
    maps = torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    out = pp.normalize_maps(maps, "max")
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]])) and out[1].abs().sum() == 0


def test_percentile_normalisation_without_the_clip_keeps_the_maps_order():
    """A 10 x 10 ramp 0..99 (plus one negative value): normalised by its 90th percentile (89.1, numpy's linear
    interpolation) and clipped, its top 10 values tie at 1, so the maximum is a 10-pixel plateau whose first pixel in
    raster order is not the peak, and a 95th-percentile threshold keeps nothing; without the clip the values are
    ramp / 89.1 (the negative one 0), the maximum is the peak and the threshold keeps the top 5 pixels."""
    from bundle.doll.generator import PostprocessSettings

    ramp = torch.arange(100, dtype=torch.float32).view(1, 10, 10)
    ramp[0, 0, 0] = -3.0
    scale = float(np.percentile(ramp.numpy(), 90))
    clipped = pp.normalize_maps(ramp, "percentile", 90.0)
    kept = pp.normalize_maps(ramp, "percentile", 90.0, clip=False)
    assert int((clipped[0] == clipped.max()).sum()) == 10 and int(np.argmax(clipped[0].numpy())) != 99
    assert torch.allclose(kept, (ramp / scale).clamp_min(0)) and int(np.argmax(kept[0].numpy())) == 99
    assert not pp.threshold_maps(clipped, "percentile", 95.0).any()
    assert torch.equal(pp.threshold_maps(kept, "percentile", 95.0)[0].flatten().nonzero().view(-1),
                       torch.arange(95, 100))
    assert PostprocessSettings(norm_clip="false", threshold="percentile").norm_clip is False
    with pytest.raises(ValueError, match="norm_clip"):
        PostprocessSettings(norm_clip=False, threshold="otsu")


# ---- the generator on a classifier with a known answer ---------------------------------------------------------
class RegionClassifier(torch.nn.Module):
    """Logit of class c = mean intensity inside region R_c (a linear model: IG with a zero baseline = x * w)."""

    def __init__(self, regions: torch.Tensor, bias: float = -0.1):
        super().__init__()
        self.register_buffer("w", regions.float() / regions.flatten(1).sum(1).clamp_min(1).view(-1, 1, 1))
        self.bias = bias

    def forward(self, x):
        return torch.einsum("bhw,khw->bk", x[:, 0], self.w) * 10 + self.bias


def _regions(size=32, k=14):
    regions = torch.zeros(k, size, size)
    for c in range(k):
        r, col = divmod(c, 4)
        regions[c, r * 8: r * 8 + 8, col * 8: col * 8 + 8] = 1
    return regions


def test_generator_localises_the_evidence_of_a_known_classifier():
    regions = _regions()
    net = RegionClassifier(regions)
    gen = DoLLGenerator([net], smooth_sigma=0.5, min_component_size=4, n_steps=8)
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 9:15, 9:15] = 1.0            # a bright patch inside region 5 (rows 8-15, cols 8-15)
    label = torch.full((1, 14), float("nan"))
    label[0, 5] = 1.0
    label[0, 0] = 1.0                    # No Finding labelled positive: never a target
    out = gen(x, label)
    assert 5 in out.targets[0] and 0 not in out.targets[0]
    mask = out.masks[0, 5].numpy().astype(bool)
    patch = x[0, 0].numpy() > 0
    inter, union = (mask & patch).sum(), (mask | patch).sum()
    assert inter / union > 0.6
    assert not (mask & ~regions[5].numpy().astype(bool)).any()  # evidence only where the classifier looks
    # channels that are not targets stay empty
    others = [c for c in range(14) if c not in out.targets[0]]
    assert out.masks[0, others].sum() == 0 and out.soft[0, others].abs().sum() == 0
    # completeness of IG: the attributions sum to f(x) - f(0) for the linear model
    assert out.deltas[0].abs().max() < 1e-4


def test_predicted_targets_and_probability_weighted_boost():
    regions = _regions()
    strong, weak = RegionClassifier(regions, bias=0.0), RegionClassifier(regions, bias=-5.0)
    gen = DoLLGenerator([strong, weak], target_source="predicted", prob_threshold=0.5, n_steps=4)
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 1:7, 17:23] = 1.0            # region 2 (rows 0-7, cols 16-23)
    probs = gen.probabilities(x)
    assert probs.shape == (2, 1, 14)
    targets = gen.select_targets(probs.mean(0))
    assert targets == [[2]]
    # boosting: weights are the probabilities of each classifier
    maps = torch.rand(2, 1, 14, 4, 4)
    boosted = gen.boost_maps(maps, probs)
    w = probs[:, 0, 2]
    expected = (maps[0, 0, 2] * w[0] + maps[1, 0, 2] * w[1]) / (w[0] + w[1])
    assert torch.allclose(boosted[0, 2], expected, atol=1e-6)


def test_array_and_dictionary_transforms_agree():
    net = RegionClassifier(_regions())
    x = torch.zeros(1, 32, 32)
    x[0, 9:15, 9:15] = 1.0
    label = [float("nan")] * 14
    label[5] = 1.0
    arr = IGToDoLL(classifiers=[net], n_steps=4)(x, label)
    d = IGToDoLLd(keys="image", classifiers=[net], n_steps=4)({"image": x, "label": torch.tensor(label)})
    assert arr.shape == (14, 32, 32) and arr.dtype == torch.uint8
    assert torch.equal(arr, d["doll"]) and d["doll_targets"] == [5]
    assert d["doll_soft"].shape == (14, 32, 32) and d["doll_probs"].shape == (1, 14)


# ---- settings groups -------------------------------------------------------------------------------------------
def test_settings_groups_nested_dicts_and_flat_overrides():
    from bundle.doll.generator import IGSettings, PostprocessSettings

    net = RegionClassifier(_regions())
    nested = DoLLGenerator([net], targets={"source": "labels", "prob_threshold": 0.7},
                           ig={"n_steps": 5, "output": "sigmoid", "amp_dtype": "bfloat16"},
                           post={"smooth_sigma": 1.0, "threshold": "percentile", "threshold_value": 90.0})
    flat = DoLLGenerator([net], target_source="labels", prob_threshold=0.7, n_steps=5, ig_output="sigmoid",
                         amp_dtype=torch.bfloat16, smooth_sigma=1.0, threshold="percentile", threshold_value=90.0)
    typed = DoLLGenerator([net], targets=nested.targets, ig=IGSettings(n_steps=5, output="sigmoid",
                                                                         amp_dtype=torch.bfloat16),
                          post=PostprocessSettings(smooth_sigma=1.0, threshold="percentile", threshold_value=90.0))
    assert nested.settings() == flat.settings() == typed.settings()
    assert nested.ig.amp_dtype is torch.bfloat16 and nested.engines[0].output == "sigmoid"
    assert nested.ig_kwargs["n_steps"] == 5 and float(nested.prob_threshold[3]) == pytest.approx(0.7)
    # a flat name overrides its group (a command-line --doll#n_steps on the grouped config block)
    over = DoLLGenerator([net], ig={"n_steps": 8, "method": "riemann_middle"}, n_steps=4)
    assert over.ig.n_steps == 4 and over.ig.method == "riemann_middle"
    with pytest.raises(TypeError, match="unknown setting"):
        DoLLGenerator([net], smoothing=3)
    with pytest.raises(ValueError, match="unknown boost"):
        DoLLGenerator([net], post={"boost": "vote"})
    with pytest.raises(ValueError, match="unknown target source"):
        DoLLGenerator([net], targets={"source": "guess"})


# ---- the batched path (DoLLInferer in the evaluator) against the per-image path --------------------------------
def _tiny_classifiers(n: int = 2) -> list[torch.nn.Module]:
    from bundle.networks.classifiers import build_classifier

    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        nets.append(build_classifier("densenet_small", init_features=8, growth_rate=4, block_config=(1, 1)).eval())
    return nets


@pytest.mark.parametrize("threshold", [("percentile", 95.0), ("otsu", 0.0)])
def test_batched_inferer_equals_per_image_path(threshold):
    """DoLLInferer on a batch (IG across images and targets, chunks straddling images) against IGToDoLLd image by
    image: soft maps within 1e-5 relative, masks differing on < 0.1 % of the pixels, same targets, probabilities
    and deltas; and the evaluator's decollate + DoLLPredd give the writer the per-image path's keys."""
    from monai.data import decollate_batch

    from bundle.doll.generator import ClassifierEnsemble
    from bundle.doll.inferer import DoLLInferer, DoLLPredd

    nets = _tiny_classifiers()
    settings = {"targets": {"source": "labels_or_predicted", "prob_threshold": 0.5},
                "ig": {"n_steps": 4, "internal_batch_size": 10},   # 10 rows per chunk: chunks straddle images
                "post": {"smooth_sigma": 2.0, "normalize": "percentile", "threshold": threshold[0],
                         "threshold_value": threshold[1], "min_component_size": 4}}
    gen = DoLLGenerator(nets, **settings)
    rng = np.random.default_rng(0)
    b, size = 6, 48
    images = torch.as_tensor(rng.random((b, 1, size, size)), dtype=torch.float32)
    labels = torch.full((b, 14), float("nan"))
    for i, row in enumerate([[1, 5], [], [2, 3, 7, 9], [13], [0], [4, 6]]):  # image 4: No Finding only
        labels[i, :] = 0.0
        labels[i, row] = 1.0
    # predictions near 0.5 of random nets would make most classes targets: a per-class threshold keeps a few
    probs = ClassifierEnsemble(nets)(images).mean(1)
    gen.prob_threshold = torch.quantile(probs, 0.85, dim=0)
    inferer = DoLLInferer(gen)
    pred = inferer(images, ClassifierEnsemble(nets), labels=labels)
    batched = inferer.last
    assert batched is not None and len({len(t) for t in batched.targets}) >= 3  # images with different targets

    per_image = IGToDoLLd(keys="image", generator=gen)
    post = DoLLPredd(keys="pred")
    items = decollate_batch({"image": images, "label": labels, "pred": pred})
    worst_soft, disagree, n_pix = 0.0, 0, 0
    for i, item in enumerate(items):
        ref = per_image({"image": images[i], "label": labels[i]})
        got = post(item)
        assert "pred" not in got and got["doll_targets"] == ref["doll_targets"] == batched.targets[i]
        scale = float(ref["doll_soft"].abs().max().clamp_min(1e-12))
        worst_soft = max(worst_soft, float((got["doll_soft"] - ref["doll_soft"]).abs().max()) / scale)
        assert got["doll"].dtype == torch.uint8 and got["doll"].shape == (14, size, size)
        disagree += int((got["doll"] != ref["doll"]).sum())
        n_pix += got["doll"].numel()
        torch.testing.assert_close(got["doll_probs"], ref["doll_probs"].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["doll_delta"], ref["doll_delta"].float(), rtol=1e-4, atol=1e-5)
    print(f"batched vs per-image ({threshold[0]}): max relative soft-map diff {worst_soft:.2e}, "
          f"mask disagreement {disagree}/{n_pix} px = {disagree / n_pix:.2e}")
    assert worst_soft <= 1e-5
    assert disagree / n_pix < 1e-3
    assert sum(len(t) for t in batched.targets) >= 8 and int(batched.masks.sum()) > 0  # not a comparison of blanks


def test_inferer_checks_the_network_output_and_predd_fallback():
    from bundle.doll.generator import ClassifierEnsemble
    from bundle.doll.inferer import DoLLInferer, DoLLPredd

    net = RegionClassifier(_regions())
    gen = DoLLGenerator([net], ig={"n_steps": 4})
    x = torch.zeros(2, 1, 32, 32)
    with pytest.raises(ValueError, match="ClassifierEnsemble"):
        DoLLInferer(gen)(x, lambda t: torch.zeros(2, 14))         # (B, K) logits, not (B, M, K) probabilities
    pred = DoLLInferer(gen, soft=False)(x, ClassifierEnsemble([net]))
    assert "soft" not in pred and pred["doll"].shape == (2, 14, 32, 32)
    # an item without the inferer's output: the per-image fallback when a generator is given, else an error
    label = torch.full((14,), float("nan"))
    label[5] = 1.0
    item = {"image": x[0], "label": label, "pred": torch.zeros(1, 14)}
    with pytest.raises(ValueError, match="holds no DoLL"):
        DoLLPredd(keys="pred")(item)
    d = DoLLPredd(keys="pred", generator=gen)(item)
    assert d["doll_targets"] == [5] and d["doll"].shape == (14, 32, 32)


# ---- generation through the bundle config: resume after a kill, shards -----------------------------------------
def _make_dataset(root: Path, n: int = 24, size: int = 32) -> Path:
    from PIL import Image

    from bundle.networks.classifiers import build_classifier, save_spec

    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        img = (rng.random((size, size)) * 255).astype(np.uint8)
        path = root / "images" / f"p{i:03d}" / "view1_frontal.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        label = [0.0] * 14
        label[1 + i % 13] = 1.0
        items.append({"image": str(path), "label": label, "label_mask": [1.0] * 14, "patient": f"p{i:03d}"})
    dl = root / "chexpert.json"
    dl.write_text(json.dumps({"training": items[: n - 6], "validation": items[n - 6:]}))
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        net = build_classifier("densenet_small", init_features=8, growth_rate=4, block_config=(1, 1))
        folder = root / "models" / "classifiers" / name
        save_spec(str(folder), "densenet_small", 14, init_features=8, growth_rate=4, block_config=[1, 1])
        torch.save(net.state_dict(), folder / "model.pt")
    return dl


def _doll_cmd(root: Path, launcher: list[str] | None = None, extra: list[str] | None = None) -> list[str]:
    configs = str(ROOT / "configs" / "generate_doll.yaml")
    return [*(launcher or [sys.executable]), "-m", "monai.bundle", "run", "--config_file", configs,
            "--datalist", str(root / "chexpert.json"), "--models_dir", str(root / "models"),
            "--classifier_names", "['a','b']", "--image_root", str(root / "images"),
            "--data_root", str(root / "out"), "--datalist_dir", str(root / "out"), "--output_root", str(root / "eval"),
            "--image_size", "[32,32]", "--doll#n_steps", "4", "--batch_size", "2", "--device", "$torch.device('cpu')",
            *(extra or [])]


def _check_outputs(root: Path, n: int) -> dict:
    out = root / "out"
    datalist = json.loads((out / "doll.json").read_text())
    entries = datalist["training"] + datalist["validation"]
    assert len(entries) == n and len({e["image"] for e in entries}) == n
    pngs = [p for p in (out / "doll").rglob("*.png")]
    assert len(pngs) == n                                      # exactly one DoLL per image
    assert not list((out / "doll").rglob("*.part*"))           # no temporary file left behind
    for e in entries:
        masks = load_bitmask(e["label"], 14)                   # every file is a valid 14-channel bit mask
        assert masks.shape == (14, 32, 32)
        assert all(not masks[c].any() for c in range(14) if c not in e["targets"])
    return datalist


def _finished_records(doll_dir: Path) -> int:
    """Finished DoLL records (a killed writer may leave a temporary ``.<name>.<random>.part.json`` beside them)."""
    return sum(1 for p in doll_dir.rglob("*.json") if ".part" not in p.name)


@pytest.mark.slow
def test_generation_resumes_after_kill(tmp_path):
    _make_dataset(tmp_path, n=60)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_doll_cmd(tmp_path), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and _finished_records(tmp_path / "out" / "doll") < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _finished_records(tmp_path / "out" / "doll")
    assert 0 < done_before < 60, "the kill should land mid-generation"
    assert not (tmp_path / "out" / "doll.json").exists()
    res = subprocess.run(_doll_cmd(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"{done_before} of 60 images already done" in res.stdout + res.stderr
    _check_outputs(tmp_path, 60)


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_sharding_gives_the_single_process_datalist(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    for root in (single, double):
        root.mkdir()
        _make_dataset(root)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(_doll_cmd(single), cwd=single, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = subprocess.run(_doll_cmd(double, torchrun, ["--distributed", "true"]), cwd=double, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = _check_outputs(single, 24), _check_outputs(double, 24)
    rel = lambda dl, root: [(os.path.relpath(e["image"], root), os.path.relpath(e["label"], root), e["targets"])
                            for s in ("training", "validation") for e in dl[s]]
    assert rel(a, single) == rel(b, double)
    for ea, eb in zip(a["training"], b["training"]):            # same masks, bit for bit
        assert np.array_equal(load_bitmask(ea["label"], 14), load_bitmask(eb["label"], 14))


# ---- quality against true lesions (configs/evaluate_doll.yaml) --------------------------------------------------
def test_quality_scores_hand_computed_case():
    from bundle.data.io import resize_mask
    from bundle.doll.quality import _scores

    truth = np.zeros((10, 10), bool)
    truth[2:6, 2:6] = True                      # 16 px
    pred = np.zeros((10, 10), bool)
    pred[4:8, 4:8] = True                       # 16 px, 4 px overlap
    soft = np.zeros((10, 10))
    soft[9, 9] = 1.0                            # peak 3 px (diagonally) from the lesion: misses at tolerance 0 and 1
    iou, dice, hit = _scores(pred, soft, truth, tolerance=0)
    assert iou == pytest.approx(4 / 28) and dice == pytest.approx(8 / 32) and hit == 0.0
    soft[:] = 0
    soft[6, 6] = 1.0                            # one pixel diagonally outside: a hit only with a tolerance
    assert _scores(pred, soft, truth, tolerance=0)[2] == 0.0
    assert _scores(pred, soft, truth, tolerance=1)[2] == 0.0  # 4-connected dilation does not reach the diagonal
    assert _scores(pred, soft, truth, tolerance=2)[2] == 1.0
    assert _scores(pred, np.zeros((10, 10)), truth, tolerance=5)[2] == 0.0  # an empty map points nowhere
    big = resize_mask(np.kron(truth, np.ones((2, 2), bool)), (10, 10))  # a 20 x 20 mask back to 10 x 10
    assert big.shape == (10, 10) and np.array_equal(big, truth)


def test_quality_summary_by_hand_with_the_true_positive_slice():
    """summarize: every true lesion counts (a lesion left empty scores 0) and, apart, the true-positive slice
    (CheXlocalize's true_pos_only); the `all` row averages observations, an observation without any true positive
    is left out of the slice's mean."""
    from bundle.doll.quality import summarize

    rows = [{"observation": "Edema", "method": "doll", "iou": 0.5, "dice": 0.6, "hit": 1.0, "predicted": 1},
            {"observation": "Edema", "method": "doll", "iou": 0.0, "dice": 0.0, "hit": 0.0, "predicted": 0},
            {"observation": "Edema", "method": "doll", "iou": 0.3, "dice": 0.4, "hit": 0.0, "predicted": 1},
            {"observation": "Cardiomegaly", "method": "doll", "iou": 0.0, "dice": 0.0, "hit": 1.0, "predicted": 0}]
    table = {r["observation"]: r for r in summarize(rows)}
    assert list(table) == ["Cardiomegaly", "Edema", "all"]           # observation order, then the overall row
    edema, cardio, overall = table["Edema"], table["Cardiomegaly"], table["all"]
    assert edema["n"] == 3 and edema["iou"] == pytest.approx(0.8 / 3) and edema["hit"] == pytest.approx(1 / 3)
    assert edema["n_tp"] == 2 and edema["iou_tp"] == pytest.approx(0.4) and edema["hit_tp"] == pytest.approx(0.5)
    assert cardio["n_tp"] == 0 and cardio["iou_tp"] is None and cardio["hit_tp"] is None
    assert overall["n"] == 4 and overall["iou"] == pytest.approx((0.8 / 3 + 0.0) / 2)
    assert overall["n_tp"] == 2 and overall["iou_tp"] == pytest.approx(0.4) and overall["hit"] == pytest.approx(2 / 3)


def test_quality_of_a_known_classifier(tmp_path):
    """Single classifier: DoLL equals single-classifier IG, and both find the bright patch (its true lesion)."""
    from bundle.data.io import encode_bitmask, save_png
    from bundle.doll.quality import evaluate_quality, summarize

    net = RegionClassifier(_regions())
    gen = DoLLGenerator([net], smooth_sigma=0.5, min_component_size=4, n_steps=8)
    items, images = [], {}
    for i, (r, c, cls) in enumerate([(9, 9, 5), (1, 17, 2), (17, 1, 8)]):
        x = np.zeros((32, 32), np.float32)
        x[r: r + 6, c: c + 6] = 1.0
        lesion = np.zeros((14, 32, 32), np.uint8)
        lesion[cls] = x > 0
        save_png(tmp_path / f"lesion{i}.png", encode_bitmask(lesion))
        label = [float("nan")] * 14
        label[cls] = 1.0
        images[str(i)] = (x, label)
        items.append({"image": str(i), "lesion": str(tmp_path / f"lesion{i}.png")})

    def preprocess(item):
        x, label = images[item["image"]]
        return {"image": torch.as_tensor(x)[None], "label": torch.tensor(label)}

    rows, examples = evaluate_quality(items, gen, preprocess, gradcam_layer=None, tolerance=0, batch_size=2)
    assert len(rows) == 3 * 2 and {r["method"] for r in rows} == {"doll", "ig_single"}
    for r in rows:
        assert r["target"] == 1 and r["iou"] > 0.6 and r["hit"] == 1.0
    by = {(r["image"], r["method"]): r["iou"] for r in rows}
    for i in "012":
        assert by[(i, "doll")] == pytest.approx(by[(i, "ig_single")])
    table = summarize(rows)
    overall = {r["method"]: r for r in table if r["observation"] == "all"}
    assert overall["doll"]["n"] == 3 and overall["doll"]["iou"] == pytest.approx(np.mean([by[(i, "doll")] for i in "012"]))
    assert [e["observation"] for e in examples] == ["Cardiomegaly", "Edema", "Atelectasis"]


def test_quality_scores_chexlocalize_masks_at_their_own_size(tmp_path):
    """CheXlocalize's masks are scored at their own size (its evaluation's protocol: maps resized bilinearly, no
    pointing tolerance), the phantom's on the grid; a one-pixel speck of the truth that the grid loses counts at the
    label's size. Expected figures from the generator's own grid masks, upsampled by hand (a bilinear 2x upsampling
    of a binary mask thresholded at 0.5 is its 2 x 2 block copy)."""
    from bundle.data.io import encode_bitmask, save_png
    from bundle.doll.quality import evaluate_quality, scoring_description

    net = RegionClassifier(_regions())
    gen = DoLLGenerator([net], smooth_sigma=0.5, min_component_size=4, n_steps=8)
    x = np.zeros((32, 32), np.float32)
    x[9:15, 9:15] = 1.0
    label = [float("nan")] * 14
    label[5] = 1.0
    lesion = np.zeros((14, 64, 64), np.uint8)
    lesion[5] = np.kron(x > 0, np.ones((2, 2), bool))
    lesion[5, 60, 3] = 1                                     # a speck: a quarter of a grid pixel's coverage
    save_png(tmp_path / "lesion.png", encode_bitmask(lesion))

    def preprocess(item):
        return {"image": torch.as_tensor(x)[None], "label": torch.tensor(label)}

    out = gen(torch.as_tensor(x)[None, None], torch.tensor(label)[None])
    pred = np.kron(out.masks[0, 5].numpy() > 0, np.ones((2, 2), bool))
    truth = lesion[5] > 0
    expected = np.logical_and(pred, truth).sum() / np.logical_or(pred, truth).sum()
    assert 0.5 < expected < 1
    real = {"image": "0", "lesion": str(tmp_path / "lesion.png"), "lesion_source": "CheXlocalize"}
    phantom = {k: v for k, v in real.items() if k != "lesion_source"}
    rows_real, _ = evaluate_quality([real], gen, preprocess, gradcam_layer=None)
    rows_phantom, _ = evaluate_quality([phantom], gen, preprocess, gradcam_layer=None)
    forced, _ = evaluate_quality([phantom], gen, preprocess, gradcam_layer=None, score_at="label")
    doll = {name: next(r for r in rows if r["method"] == "doll")
            for name, rows in (("real", rows_real), ("phantom", rows_phantom), ("forced", forced))}
    assert doll["real"]["scored_at"] == "64x64" and doll["phantom"]["scored_at"] == "32x32"
    assert doll["real"]["iou"] == pytest.approx(expected) and doll["forced"]["iou"] == pytest.approx(expected)
    grid_truth = x > 0                                       # the speck does not survive the grid
    grid_pred = out.masks[0, 5].numpy() > 0
    grid = np.logical_and(grid_pred, grid_truth).sum() / np.logical_or(grid_pred, grid_truth).sum()
    assert doll["phantom"]["iou"] == pytest.approx(grid) and grid > expected
    assert doll["real"]["hit"] == 1.0                        # the map's maximum is inside the patch
    assert scoring_description([real, phantom]) == "grid, tolerance 3 px+label, tolerance 0 px"
    with pytest.raises(ValueError, match="score_at"):
        evaluate_quality([phantom], gen, preprocess, gradcam_layer=None, score_at="full")


def test_gradcam_maps_match_captum_layer_gradcam():
    """The quality stage's Grad-CAM equals captum's LayerGradCam (ReLU, bilinear upsampling), not MONAI's flipped
    display normalisation."""
    from captum.attr import LayerAttribution, LayerGradCam

    from bundle.explain.gradcam import gradcam_maps
    from bundle.networks.classifiers import build_classifier

    torch.manual_seed(0)
    net = build_classifier("densenet_small", init_features=8, growth_rate=4, block_config=(2, 2)).eval()
    x = torch.rand(2, 1, 32, 32)
    targets = [[1, 3, 7, 9, 11], [0, 2, 5, 8, 13]]
    maps = gradcam_maps(net, "class_layers.relu", x, targets, 14)
    layer = LayerGradCam(net, net.class_layers.relu)
    nonzero = 0
    for i, row in enumerate(targets):
        for c in row:
            ref = layer.attribute(x[i: i + 1], target=c, relu_attributions=True)
            ref = LayerAttribution.interpolate(ref, (32, 32), interpolate_mode="bilinear")[0, 0].detach()
            nonzero += int(ref.abs().max() > 0)
            torch.testing.assert_close(maps[i, c], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()) + 1e-12)
    assert nonzero >= 3                      # the comparison is not between empty maps
    assert maps[0, [c for c in range(14) if c not in targets[0]]].abs().sum() == 0


def test_gradcam_explainer_gives_the_postprocessed_gradcam_masks():
    """explainer='gradcam' (the Grad-CAM label control): the soft maps and masks are the DoLL post-processing of
    gradcam_maps for the same targets (one classifier: no boosting), and they differ from the IG path's."""
    from bundle.explain.gradcam import gradcam_maps

    net = _tiny_classifiers(1)
    post = {"smooth_sigma": 1.0, "normalize": "percentile", "threshold": "percentile", "threshold_value": 90.0,
            "min_component_size": 1}
    gen = DoLLGenerator(net, targets={"source": "labels"}, post=post,
                        ig={"n_steps": 4, "explainer": "gradcam", "gradcam_layer": "class_layers.relu"})
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2, 14)
    labels[0, [2, 5]] = 1
    labels[1, 8] = 1
    out = gen(x, labels)
    cams = gradcam_maps(net[0], "class_layers.relu", x, out.targets, 14)
    assert out.targets == [[2, 5], [8]]
    for i, row in enumerate(out.targets):
        soft = gen.postprocess_soft(cams[i, row])
        torch.testing.assert_close(out.soft[i, row], soft)
        assert torch.equal(out.masks[i, row].bool(), gen.binarize(soft, row))
    ig = DoLLGenerator(net, targets={"source": "labels"}, post=post, ig={"n_steps": 4})(x, labels)
    assert not torch.allclose(ig.soft, out.soft)
    with pytest.raises(ValueError, match="gradcam_layer"):
        DoLLGenerator(net, ig={"explainer": "gradcam"})
    with pytest.raises(ValueError, match="unknown explainer"):
        DoLLGenerator(net, ig={"explainer": "lime"})


def test_ig_gradcam_explainer_is_the_geometric_mean_of_both_soft_maps():
    """explainer='ig_gradcam' (IG and Grad-CAM consensus): each soft map is sqrt(IG soft x Grad-CAM soft), both
    post-processed alone as by explainer 'ig' and 'gradcam' (one classifier: no boosting), so it is zero wherever
    either is, and the masks are its binarisation."""
    net = _tiny_classifiers(1)
    post = {"smooth_sigma": 1.0, "normalize": "percentile", "threshold": "percentile", "threshold_value": 90.0,
            "min_component_size": 1}
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(2, 14)
    labels[0, [1, 4]] = 1
    labels[1, 9] = 1
    outs = {e: DoLLGenerator(net, targets={"source": "labels"}, post=post,
                             ig={"n_steps": 4, "explainer": e, "gradcam_layer": "class_layers.relu"})(x, labels)
            for e in ("ig", "gradcam", "ig_gradcam")}
    torch.testing.assert_close(outs["ig_gradcam"].soft, (outs["ig"].soft * outs["gradcam"].soft).sqrt())
    gen = DoLLGenerator(net, post=post, ig={"explainer": "ig_gradcam", "gradcam_layer": "class_layers.relu"})
    for i, row in enumerate(outs["ig"].targets):
        assert torch.equal(outs["ig_gradcam"].masks[i, row].bool(), gen.binarize(outs["ig_gradcam"].soft[i, row], row))
    assert ((outs["gradcam"].soft == 0) <= (outs["ig_gradcam"].soft == 0)).all()
    with pytest.raises(ValueError, match="gradcam_layer"):
        DoLLGenerator(net, ig={"explainer": "ig_gradcam"})


def test_class_explainers_keep_each_observations_own_map():
    """ig#class_explainers with the consensus: an observation set to 'ig' gets exactly the IG run's soft map, one set
    to 'gradcam' the Grad-CAM run's, the others the consensus sqrt(IG x Grad-CAM); the masks binarise those maps.
    Needs explainer 'ig_gradcam' and known names and explainers; the flat keyword works."""
    net = _tiny_classifiers(1)
    post = {"smooth_sigma": 1.0, "normalize": "percentile", "threshold": "percentile", "threshold_value": 90.0,
            "min_component_size": 1}
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(2, 14)
    labels[0, [2, 5]] = 1          # Cardiomegaly -> ig, Edema -> gradcam
    labels[1, [5, 10]] = 1         # Edema -> gradcam, Pleural Effusion -> the consensus
    layer = "class_layers.relu"
    outs = {e: DoLLGenerator(net, targets={"source": "labels"}, post=post,
                             ig={"n_steps": 4, "explainer": e, "gradcam_layer": layer})(x, labels)
            for e in ("ig", "gradcam", "ig_gradcam")}
    chosen = {"Cardiomegaly": "ig", "Edema": "gradcam"}
    gen = DoLLGenerator(net, targets={"source": "labels"}, post=post, n_steps=4, class_explainers=chosen,
                        ig={"explainer": "ig_gradcam", "gradcam_layer": layer})
    assert gen.ig.class_explainers == chosen
    out = gen(x, labels)
    assert out.targets == [[2, 5], [5, 10]]
    for i, c, source in ((0, 2, "ig"), (0, 5, "gradcam"), (1, 5, "gradcam"), (1, 10, "ig_gradcam")):
        torch.testing.assert_close(out.soft[i, c], outs[source].soft[i, c])
        for other in {"ig", "gradcam", "ig_gradcam"} - {source}:   # the three maps differ here
            assert not torch.allclose(out.soft[i, c], outs[other].soft[i, c])
    for i, row in enumerate(out.targets):
        assert torch.equal(out.masks[i, row].bool(), gen.binarize(out.soft[i, row], row))
    with pytest.raises(ValueError, match="needs explainer 'ig_gradcam'"):
        DoLLGenerator(net, ig={"class_explainers": {"Cardiomegaly": "ig"}})
    with pytest.raises(ValueError, match="unknown observation"):
        DoLLGenerator(net, ig={"explainer": "ig_gradcam", "gradcam_layer": layer, "class_explainers": {"Heart": "ig"}})
    with pytest.raises(ValueError, match="unknown explainer"):
        DoLLGenerator(net, ig={"explainer": "ig_gradcam", "gradcam_layer": layer,
                               "class_explainers": {"Cardiomegaly": "lime"}})


def test_tune_doll_chooses_each_observations_map_and_percentile():
    """scripts/tune_doll.py with the consensus: each observation's map (ig, gradcam or the consensus) and percentile
    are chosen on the cached maps by IoU with the true lesions. Hand-made case on a 20 x 20 grid: for Cardiomegaly IG
    covers the 20-pixel lesion exactly and Grad-CAM a disjoint square; for Edema the reverse. The consensus of two
    disjoint maps is empty (IoU 0), so IG must win the first and Grad-CAM the second, each with IoU 1 at every
    percentile <= 95 (a 5% lesion) and the lowest of them, 80, chosen first; the rows hold every candidate."""
    from bundle.constants import OBSERVATIONS
    from scripts.tune_doll import CLASS_PERCENTILES, tune_class_thresholds

    gen = DoLLGenerator(_tiny_classifiers(1), post={"smooth_sigma": 0.0, "normalize": "max", "min_component_size": 1},
                        ig={"explainer": "ig_gradcam", "gradcam_layer": "class_layers.relu"})
    lesion, other = torch.zeros(20, 20), torch.zeros(20, 20)
    lesion[2:6, 3:8] = 1.0
    other[12:16, 10:15] = 1.0
    targets = [2, 5]                                           # Cardiomegaly, Edema
    cache = [{"targets": targets, "probs": torch.full((1, 14), 0.9),
              "raw": [torch.stack([lesion, other])], "cams": [torch.stack([other, lesion])],
              "truth": {2: lesion.numpy() > 0, 5: lesion.numpy() > 0}}]
    rows = tune_class_thresholds(gen, cache, OBSERVATIONS)
    assert len(rows) == 2 * 3 * len(CLASS_PERCENTILES)
    assert set(rows.explainer) == {"ig", "gradcam", "ig_gradcam"}
    assert (rows[rows.explainer == "ig_gradcam"].iou == 0).all()
    chosen = rows.loc[rows.groupby("observation")["iou"].idxmax()].set_index("observation")
    assert chosen.loc["Cardiomegaly", "explainer"] == "ig" and chosen.loc["Edema", "explainer"] == "gradcam"
    assert (chosen.iou == 1.0).all() and (chosen.percentile == 80.0).all()
    assert gen.ig.class_explainers == {}                       # restored


def test_class_smooth_sigma_smooths_each_observation_with_its_own_sigma():
    """post#class_smooth_sigma: an observation listed gets exactly the soft map a generator with that smoothing for
    every observation makes, the others the common smooth_sigma's; names and values are checked."""
    net = _tiny_classifiers(1)
    post = {"smooth_sigma": 2.0, "normalize": "percentile", "threshold": "percentile", "threshold_value": 90.0,
            "min_component_size": 1}
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.zeros(1, 14)
    labels[0, [2, 13]] = 1          # Cardiomegaly (common smoothing), Support Devices (its own: none)
    common = DoLLGenerator(net, targets={"source": "labels"}, post=post, n_steps=4)(x, labels)
    none = DoLLGenerator(net, targets={"source": "labels"}, post={**post, "smooth_sigma": 0.0}, n_steps=4)(x, labels)
    gen = DoLLGenerator(net, targets={"source": "labels"}, post=post, n_steps=4,
                        class_smooth_sigma={"Support Devices": 0})
    assert gen.post.class_smooth_sigma == {"Support Devices": 0.0}
    out = gen(x, labels)
    torch.testing.assert_close(out.soft[0, 13], none.soft[0, 13])
    torch.testing.assert_close(out.soft[0, 2], common.soft[0, 2])
    assert not torch.allclose(none.soft[0, 13], common.soft[0, 13])
    assert torch.equal(out.masks[0, [2, 13]].bool(), gen.binarize(out.soft[0, [2, 13]], [2, 13]))
    with pytest.raises(ValueError, match="unknown observation"):
        DoLLGenerator(net, post={"class_smooth_sigma": {"Tube": 1.0}})
    with pytest.raises(ValueError, match="negative"):
        DoLLGenerator(net, post={"class_smooth_sigma": {"Support Devices": -1.0}})


def test_tune_doll_chooses_each_observations_smoothing():
    """scripts/tune_doll.py's per-observation smoothing, hand-made case: a thin tube (a 28-pixel line, 1.75% of a 40
    x 40 map) whose IG map is the line itself. Unsmoothed, every percentile <= 98 keeps exactly the line (IoU 1); the
    configured 8 px smoothing turns it into a blob across rows, so no percentile recovers it. The candidate 0 px must
    win."""
    from bundle.constants import OBSERVATIONS
    from scripts.tune_doll import CLASS_PERCENTILES, tune_class_thresholds

    gen = DoLLGenerator(_tiny_classifiers(1), post={"smooth_sigma": 8.0, "normalize": "max",
                                                    "min_component_size": 1})
    line = torch.zeros(40, 40)
    line[20, 6:34] = 1.0
    cache = [{"targets": [13], "probs": torch.full((1, 14), 0.9), "raw": [line[None]], "cams": [None],
              "truth": {13: line.numpy() > 0}}]
    rows = tune_class_thresholds(gen, cache, OBSERVATIONS, sigmas=[0.0])
    assert len(rows) == 2 * len(CLASS_PERCENTILES) and set(rows.explainer) == {"ig"}
    best = rows.groupby("smooth_sigma").iou.max()
    assert best[0.0] == 1.0 and best[8.0] < 0.9
    assert rows.loc[rows.iou.idxmax(), "smooth_sigma"] == 0.0
    assert gen.post.smooth_sigma == 8.0 and gen.post.class_smooth_sigma == {}     # restored


def test_generation_on_error_skip_lists_bad_images_and_a_rerun_retries_them(tmp_path):
    """``--on_error skip``: unreadable images are listed in failures.csv and left out of the datalist; the others get
    their DoLL. Once the files are repaired, a re-run does only those and the list empties."""
    _make_dataset(tmp_path, n=8)
    bad = [tmp_path / "images" / "p002" / "view1_frontal.png", tmp_path / "images" / "p007" / "view1_frontal.png"]
    originals = [p.read_bytes() for p in bad]
    bad[0].write_bytes(originals[0][:40])                     # truncated
    bad[1].write_bytes(b"")                                   # zero bytes
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(_doll_cmd(tmp_path, extra=["--on_error", "skip"]), cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import csv

    with open(tmp_path / "out" / "doll" / "failures.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["input"] for r in rows) == sorted(str(p) for p in bad)
    assert all(r["stage"] == "doll" and r["reason"].startswith("BundleInputError: " + r["input"]) for r in rows)
    datalist = json.loads((tmp_path / "out" / "doll.json").read_text())
    listed = {e["image"] for v in datalist.values() for e in v}
    assert len(listed) == 6 and not listed & {str(p) for p in bad}
    for p, data in zip(bad, originals):                       # repaired: the re-run does those two only
        p.write_bytes(data)
    res = subprocess.run(_doll_cmd(tmp_path, extra=["--on_error", "skip"]), cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "6 of 8 images already done" in res.stdout + res.stderr
    assert (tmp_path / "out" / "doll" / "failures.csv").read_text() == "input,stage,reason\n"
    _check_outputs(tmp_path, 8)


def test_pending_items_remove_a_killed_writers_temporary_files(tmp_path):
    from pathlib import Path

    from bundle.doll.handler import pending_items, record_path

    root, doll_dir = tmp_path / "img", tmp_path / "doll"
    items = [{"image": str(root / "a" / "x.png")}, {"image": str(root / "b" / "y.png")}]
    done = Path(record_path(str(doll_dir), items[0]["image"], str(root)))
    done.parent.mkdir(parents=True)
    (done.parent / "x.png").write_bytes(b"png")
    done.write_text(json.dumps({"label": str(done.parent / "x.png")}))
    todo = Path(record_path(str(doll_dir), items[1]["image"], str(root)))
    todo.parent.mkdir(parents=True)
    stale = [todo.parent / ".y.json.k3j2.part.json", todo.parent / ".y.png.ab12.part.png"]
    for p in stale:
        p.write_text("half")
    other = todo.parent / ".z.json.k3j2.part.json"  # another image's writer: not this item's
    other.write_text("half")
    assert [it["image"] for it in pending_items(items, str(doll_dir), str(root), shard_by_rank=False)] == \
        [items[1]["image"]]
    assert not any(p.exists() for p in stale) and other.exists() and done.exists()

"""DoLL quality on the phantom: DoLL against the true lesion masks, beside Grad-CAM and single-classifier IG.

For every image of the evaluated split and every observation whose true lesion is present, three methods are scored
with the same post-processing (smoothing, per-map normalisation, threshold, small components) and the same targets:

- ``doll``: boosted IG of all classifiers (the DoLL recipe);
- ``ig_single``: IG of the first classifier alone (no boosting);
- ``gradcam``: MONAI's :class:`~monai.visualize.GradCAM` of the first classifier.

Measures per observation: IoU and Dice of the mask against the true lesion (0 when the observation was not a
target: a missed finding counts), and the pointing game (the soft map's maximum falls inside the lesion, dilated by
``tolerance`` pixels). Outputs: tidy rows, a per-observation table, an overlay panel PNG.

Where the scores are computed depends on the judge (:data:`SCORING`): the phantom's lesions on the network's input
grid (the truth resized to it), CheXlocalize's radiologist masks at their own size, the full radiograph's (the maps
resized to it bilinearly, as CheXlocalize's evaluation code does, with a pointing game without tolerance), so that
its figures compare with the published ones.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..constants import OBSERVATIONS, slug
from ..data.chexlocalize import LESION_SOURCE
from ..data.io import load_bitmask, resample_image, resize_mask
from ..explain.gradcam import gradcam_maps
from .generator import DoLLGenerator

logger = logging.getLogger(__name__)

METHODS = ("doll", "ig_single", "gradcam")

#: Where each lesion source's masks are scored and the pointing game's tolerance there, in that geometry's pixels.
#: ``"grid"``: the network's input grid, the truth resized to it (:func:`bundle.data.io.resize_mask`); the phantom's
#: lesions, with 3 px at 128 px. ``"label"``: the truth's own size, each method's soft map resized to it
#: (:func:`bundle.data.io.resample_image`: bilinear, ``align_corners=False`` when growing, as CheXlocalize's
#: ``eval.py`` resizes a saliency map to the radiograph's size) and its mask as a coverage map
#: (:func:`bundle.data.io.resize_mask`); CheXlocalize's radiologist masks, whose published IoU and hit rates are
#: computed so, the hit rate with no tolerance. The per-observation thresholds are the grid's in both (the DoLL a
#: pre-training run learns from is the grid's).
SCORING: dict[str, dict[str, Any]] = {"phantom": {"score_at": "grid", "tolerance": 3},
                                      LESION_SOURCE: {"score_at": "label", "tolerance": 0}}


#: The splits searched for lesion masks when none is named, in order, per lesion source. The phantom's true lesions
#: are scored on the held-apart validation split (the recipe is tuned on training). CheXlocalize's radiologist masks
#: are scored on ``test``: CheXpert's ``valid.csv`` (the whole of CheXlocalize when the test set is not given) or,
#: with the test set, its 668 radiographs, held apart from the validation masks the recipe is tuned on.
LESION_SPLITS: dict[str, tuple[str, ...]] = {"phantom": ("validation", "test"), LESION_SOURCE: ("test", "validation")}


#: The split the DoLL recipe's thresholds are tuned on (``scripts/tune_doll.py``), per lesion source: never one that
#: :data:`LESION_SPLITS` scores. CheXlocalize's validation masks are on ``validation`` only when CheXpert's test set
#: is given (``valid.csv`` is then the validation split).
TUNING_SPLITS: dict[str, str] = {"phantom": "training", LESION_SOURCE: "validation"}


def lesion_source(data: dict) -> str:
    """``"CheXlocalize"`` when any item of the datalist has CheXlocalize's lesion masks, else ``"phantom"``."""
    real = any(isinstance(it, dict) and it.get("lesion_source") == LESION_SOURCE
               for items in data.values() if isinstance(items, list) for it in items)
    return LESION_SOURCE if real else "phantom"


def tuning_items(datalist_path: str, split: str | None = None) -> tuple[str, list[dict]]:
    """``(split, items with a lesion mask)`` to tune the DoLL recipe on: ``split``, or by default the one of
    :data:`TUNING_SPLITS` for the datalist's lesion source.

    Raises:
        BundleInputError: when that split has no lesion masks (for CheXlocalize: CheXpert's test set was not given,
            so every lesion mask is on the split the quality stage scores).
    """
    from ..utils import BundleInputError, load_json

    data = load_json(datalist_path)
    source = lesion_source(data)
    name = split or TUNING_SPLITS[source]
    items = [it for it in data.get(name, []) if it.get("lesion")]
    if not items:
        hint = (" CheXlocalize's masks are all on the split the quality stage scores: give CheXpert's test set "
                "(chexpert.test in the data file, or the CheXlocalize release folder as chexpert.localize) so that "
                "valid.csv becomes the validation split, or tune on the judged radiographs with --split test"
                if source == LESION_SOURCE and not split else "")
        raise BundleInputError(datalist_path, f"no item with a lesion mask in the {name!r} split to tune on.{hint}")
    return name, items


def lesion_items(datalist_path: str, split: str | None = None) -> list[dict]:
    """The items of a classification datalist that have a ``lesion`` mask, from ``split`` or, when ``None``, from the
    first split of :data:`LESION_SPLITS` (by the items' ``lesion_source``) that has any (each item with its split
    name in ``"split"``).

    Raises:
        BundleInputError: when the split (or every split searched) has no item with a lesion mask.
    """
    from ..utils import BundleInputError, load_json

    data = load_json(datalist_path)
    source = lesion_source(data)
    order = LESION_SPLITS[source]
    for name in ([split] if split else order):
        if name not in data:
            raise BundleInputError(datalist_path, f"no split {name!r} (has {sorted(data)})")
        items = [{**it, "split": name} for it in data[name] if it.get("lesion")]
        if items:
            if not split and name == TUNING_SPLITS[source]:
                logger.warning("DoLL quality: scoring the %s split, the one scripts/tune_doll.py tunes on (no lesion "
                               "masks on %s): not held apart; give the test set's ground truth (CheXlocalize's "
                               "gt_segmentations_test.json)", name, order[0])
            return items
    raise BundleInputError(datalist_path, f"no item with a lesion mask in {split or ' or '.join(order)}: the "
                                          "DoLL quality needs the phantom's true lesions or CheXlocalize's masks "
                                          "(chexpert.localize in the data file)")


def _scoring(item: dict, score_at: str | None, tolerance: int | None) -> tuple[str, int]:
    """``(score_at, tolerance)`` for ``item``: the values given, else its lesion source's in :data:`SCORING`."""
    default = SCORING[LESION_SOURCE if item.get("lesion_source") == LESION_SOURCE else "phantom"]
    at = default["score_at"] if score_at is None else str(score_at)
    if at not in ("grid", "label"):
        raise ValueError(f"score_at {at!r}: use 'grid', 'label' or None (by lesion source)")
    return at, int(default["tolerance"] if tolerance is None else tolerance)


def _scores(pred: np.ndarray, soft: np.ndarray, truth: np.ndarray, tolerance: int) -> tuple[float, float, float]:
    from scipy import ndimage

    inter = np.logical_and(pred, truth).sum()
    union = np.logical_or(pred, truth).sum()
    iou = float(inter / union) if union else 1.0
    dice = float(2 * inter / (pred.sum() + truth.sum())) if (pred.sum() + truth.sum()) else 1.0
    if soft.max() <= 0:
        hit = 0.0
    else:
        region = ndimage.binary_dilation(truth, iterations=tolerance) if tolerance > 0 else truth
        y, x = np.unravel_index(int(np.argmax(soft)), soft.shape)
        hit = float(region[y, x])
    return iou, dice, hit


def evaluate_quality(items: Sequence[dict], generator: DoLLGenerator, preprocess: Callable[[dict], dict],
                     gradcam_layer: str | None, tolerance: int | None = None, max_images: int | None = None,
                     batch_size: int = 4, names: Sequence[str] = OBSERVATIONS,
                     score_at: str | None = None) -> tuple[list[dict], list[dict]]:
    """Score DoLL, single-classifier IG and Grad-CAM on ``items`` that have a ``lesion`` bit mask.

    Args:
        items: classification datalist items (``image``, ``label``, ``label_mask``, ``lesion``).
        generator: the DoLL generator (its first classifier gives ``ig_single`` and ``gradcam``).
        preprocess: the stage's pre-processing of one item (gives ``image`` ``(1, H, W)`` and ``label`` with NaN).
        gradcam_layer: Grad-CAM layer name of the first classifier (``None`` skips Grad-CAM).
        tolerance: pointing-game tolerance in pixels of the scoring geometry; ``None``: the item's lesion source's
            (:data:`SCORING`).
        score_at: ``"grid"`` (the network's input grid) or ``"label"`` (each lesion mask's own size); ``None``: the
            item's lesion source's (:data:`SCORING`).

    Returns:
        ``(rows, examples)``: tidy rows ``{image, observation, method, iou, dice, hit, target, predicted,
        scored_at}`` for every (image, observation with a true lesion, method), ``scored_at`` the scoring size
        ``"HxW"``; and per observation one example ``{observation, image, truth, doll, gradcam, ig_single}`` arrays
        (on the grid) for the overlay panel.
    """
    items = [it for it in items if it.get("lesion")]
    if max_images:
        items = items[:max_images]
    rows: list[dict] = []
    examples: dict[int, dict] = {}
    k = generator.num_classes
    for start in range(0, len(items), batch_size):
        batch = [preprocess(dict(it)) for it in items[start: start + batch_size]]
        images = torch.stack([torch.as_tensor(b["image"]) for b in batch]).float()
        labels = torch.stack([torch.as_tensor(b["label"]).float() for b in batch])
        out = generator(images, labels)
        # the IG baseline is plain IG of the first classifier, also when the DoLL's explainer is the consensus
        single = out.per_classifier[0] if generator.ig.explainer == "ig" else \
            generator.ig_soft_maps(0, images, out.targets)[0]
        maps = {"doll": out.soft, "ig_single": single}
        if gradcam_layer:
            maps["gradcam"] = generator.postprocess_soft(
                gradcam_maps(generator.classifiers[0], gradcam_layer, images, out.targets, k)
                .flatten(0, 1).unsqueeze(1), torch.arange(k).repeat(len(batch))).view(len(batch), k, *images.shape[-2:])
        grid = tuple(images.shape[-2:])
        for i, it in enumerate(items[start: start + len(batch)]):
            truth_all = load_bitmask(it["lesion"], k)
            at, tol = _scoring(it, score_at, tolerance)
            row_targets = set(out.targets[i])
            for c in range(k):
                if not truth_all[c].any():
                    continue
                truth = resize_mask(truth_all[c], grid)
                scored = truth if at == "grid" else truth_all[c].astype(bool)
                preds = {}
                for method, m in maps.items():
                    soft = m[i, c].detach().cpu().numpy() if c in row_targets else np.zeros(grid, np.float32)
                    if method == "doll":
                        pred = out.masks[i, c].cpu().numpy() > 0
                    elif c in row_targets:
                        pred = generator.binarize(m[i, c][None].detach(), [c])[0].cpu().numpy()
                    else:
                        pred = np.zeros(grid, dtype=bool)
                    if at == "label":
                        iou, dice, hit = _scores(resize_mask(pred, scored.shape), resample_image(soft, scored.shape),
                                                 scored, tol)
                    else:
                        iou, dice, hit = _scores(pred, soft, scored, tol)
                    rows.append({"image": it["image"], "observation": names[c], "method": method, "iou": iou,
                                 "dice": dice, "hit": hit, "target": int(c in row_targets),
                                 "predicted": int(pred.any()), "scored_at": "x".join(map(str, scored.shape))})
                    preds[method] = pred
                if c in row_targets and (c not in examples or truth.sum() > examples[c]["truth"].sum()):
                    examples[c] = {"observation": names[c], "image": images[i, 0].numpy(), "truth": truth, **preds}
        logger.info(f"DoLL quality: {min(start + batch_size, len(items))}/{len(items)} images")
    return rows, [examples[c] for c in sorted(examples)]


def summarize(rows: Sequence[dict], names: Sequence[str] = OBSERVATIONS) -> list[dict]:
    """Per observation and method: n, mean IoU, mean Dice, pointing-game hit rate over every true lesion (a finding
    the method left empty scores 0), and the same on the true-positive slice (``n_tp``, ``iou_tp``, ``hit_tp``: the
    lesions the method drew a mask for, CheXlocalize's default ``true_pos_only`` evaluation, the one its published
    Grad-CAM and radiologist figures use); plus an ``all`` row per method (mean over observations, each weighted
    equally)."""
    import pandas as pd

    if not rows:
        return []
    df = pd.DataFrame(rows)
    if "predicted" not in df.columns:
        df["predicted"] = 1
    tp = df[df["predicted"] > 0]
    table = df.groupby(["observation", "method"]).agg(n=("iou", "size"), iou=("iou", "mean"), dice=("dice", "mean"),
                                                      hit=("hit", "mean")).reset_index()
    sliced = tp.groupby(["observation", "method"]).agg(n_tp=("iou", "size"), iou_tp=("iou", "mean"),
                                                       hit_tp=("hit", "mean")).reset_index()
    table = table.merge(sliced, on=["observation", "method"], how="left")
    table["n_tp"] = table["n_tp"].fillna(0).astype(int)
    order = {n: i for i, n in enumerate(names)}
    table["order"] = table["observation"].map(order)
    table = table.sort_values(["order", "method"]).drop(columns="order")
    overall = table.groupby("method").agg(n=("n", "sum"), iou=("iou", "mean"), dice=("dice", "mean"),
                                          hit=("hit", "mean"), n_tp=("n_tp", "sum"), iou_tp=("iou_tp", "mean"),
                                          hit_tp=("hit_tp", "mean")).reset_index()
    overall.insert(0, "observation", "all")
    out = pd.concat([table, overall], ignore_index=True)
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
            for r in out.to_dict(orient="records")]


def save_panel(examples: Sequence[dict], path: str, methods: Sequence[str] = ("doll", "gradcam", "ig_single")) -> str:
    """PNG panel: one row per observation: image, true lesion, then each method's mask (red) over the image."""
    from ..visualize import overlay_rgb, save_grid

    tiles, titles = [], []
    for ex in examples:
        img = ex["image"]
        tiles.append(overlay_rgb(img))
        titles.append(ex["observation"])
        tiles.append(overlay_rgb(img, ex["truth"], color=(0, 255, 0)))
        titles.append("true lesion")
        for m in methods:
            if m in ex:
                tiles.append(overlay_rgb(img, ex[m], color=(255, 40, 40)))
                titles.append(m)
    ncol = 2 + sum(1 for m in methods if examples and m in examples[0])
    return save_grid(tiles, titles, ncol, path)


def lesion_judge(items: Sequence[dict]) -> str:
    """Whose lesion masks the items carry: ``"phantom"`` (the generator's true lesions), ``"CheXlocalize"`` (the
    radiologists' segmentations), or both names joined by ``+``."""
    return "+".join(sorted({str(it.get("lesion_source") or "phantom") for it in items if it.get("lesion")})) or "none"


def scoring_description(items: Sequence[dict], score_at: str | None = None, tolerance: int | None = None) -> str:
    """How the items' lesions are scored (:func:`_scoring`), e.g. ``"grid, tolerance 3 px"`` or, for
    CheXlocalize's, ``"label, tolerance 0 px"``; several joined by ``+``."""
    return "+".join(sorted({"{}, tolerance {} px".format(*_scoring(it, score_at, tolerance))
                            for it in items if it.get("lesion")})) or "none"


def run_quality(items: Sequence[dict], generator: DoLLGenerator, preprocess: Callable[[dict], dict],
                gradcam_layer: str | None, out_dir: str, tolerance: int | None = None, max_images: int | None = 200,
                tracking_uri: str | None = None, experiment: str = "cxr_doll_doll",
                score_at: str | None = None) -> dict[str, Any]:
    """Score, write ``rows.csv``, ``summary.csv``/``summary.json`` and ``panel.png`` into ``out_dir``, log to MLflow.
    Returns the overall mean IoU / Dice / hit rate per method (and on the true-positive slice: :func:`summarize`).
    ``tolerance`` and ``score_at`` as :func:`evaluate_quality` (``None``: by lesion source, :data:`SCORING`); the
    summary's ``scoring`` column says which were used."""
    import pandas as pd

    from ..utils import atomic_save, atomic_write_json

    items = [it for it in items if it.get("lesion")][:max_images or None]  # the scored items, named in the summary
    rows, examples = evaluate_quality(items, generator, preprocess, gradcam_layer, tolerance, score_at=score_at)
    table = summarize(rows)
    judge = lesion_judge(items)
    split = "+".join(sorted({str(it["split"]) for it in items if it.get("split")})) or None
    scoring = scoring_description(items, score_at, tolerance)
    for row in table:
        row["judge"] = judge
        row["split"] = split
        row["scoring"] = scoring
    os.makedirs(out_dir, exist_ok=True)
    atomic_save(os.path.join(out_dir, "rows.csv"), lambda t: pd.DataFrame(rows).to_csv(t, index=False))
    atomic_save(os.path.join(out_dir, "summary.csv"), lambda t: pd.DataFrame(table).to_csv(t, index=False))
    atomic_write_json(os.path.join(out_dir, "summary.json"), table)
    panel = save_panel(examples, os.path.join(out_dir, "panel.png")) if examples else None
    overall = {f"{r['method']}_{m}": r[m] for r in table if r["observation"] == "all"
               for m in ("iou", "dice", "hit", "iou_tp", "hit_tp") if r.get(m) is not None}
    per_obs = {f"{r['method']}_iou_{slug(r['observation'])}": r["iou"] for r in table if r["observation"] != "all"}
    if tracking_uri:
        from ..tracking import log_run

        log_run(tracking_uri, experiment, "quality", params={"n_images": len({r['image'] for r in rows}),
                                                            "scoring": scoring, "judge": judge,
                                                            "split": split},
                metrics={**overall, **per_obs},
                artifacts=[p for p in (os.path.join(out_dir, "summary.csv"), panel) if p], tags={"stage": "doll"})
    logger.info("DoLL quality: " + ", ".join(f"{k}={v:.3f}" for k, v in overall.items()))
    return overall

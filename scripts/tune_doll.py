#!/usr/bin/env python
"""Tune the DoLL post-processing on the phantom against the true lesion masks (IG is computed once).

For the validation split of the classification datalist, the IG maps of every classifier are computed once for the
targets the DoLL recipe selects; then every combination of smoothing, normalisation, boosting, threshold and
minimum component size is scored (mean IoU over observations, each observation weighted equally, misses count 0).
Then, with the settings of configs/generate_doll.yaml, each observation's threshold value (`doll#post#threshold`
percentile) is chosen alone (`class_threshold_values`): lesions differ in size by 40x, so one percentile gives every
DoLL mask the same area whatever the finding. With it, the observation's smoothing (`class_smooth_sigma`, from
`--sigmas`) and, with the IG x Grad-CAM consensus, its map (`doll#ig#class_explainers`: IG, Grad-CAM or the
consensus). Writes a CSV and a Markdown report (default: docs/doll_tuning.md), a config overlay with the chosen
values and the maps' settings, and prints the best settings and the per-observation values.

    python scripts/tune_doll.py                  # after the pipeline's data, classifier stages
    python scripts/tune_doll.py --max-images 60 --root quick
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from bundle.constants import OBSERVATIONS  # noqa: E402
from bundle.data.io import load_bitmask, resize_mask  # noqa: E402
from bundle.doll.generator import EXPLAINERS  # noqa: E402
from bundle.doll.quality import lesion_items, lesion_judge, tuning_items  # noqa: E402
from bundle.explain.gradcam import gradcam_maps  # noqa: E402
from bundle.utils import atomic_save, atomic_write_text  # noqa: E402

GRID = {
    "smooth_sigma": [0.0, 1.0, 2.0, 4.0],
    "normalize": ["max", "percentile"],
    "boost": ["prob_weighted", "mean", "max", "single"],
    "threshold": [("otsu", 0.0), ("fixed", 0.3), ("fixed", 0.5), ("percentile", 95.0)],
    "min_component_size": [1, 16],
}
#: the generated part of the report ends here; what follows it in an existing report is kept
KEEP_MARKER = "<!-- scripts/tune_doll.py writes the sections above; the sections below are kept -->"
#: The config overlay written beside ``--out``: the chosen percentiles and the maps' settings.
OVERLAY_NAME = "doll_thresholds.yaml"
#: candidate per-observation percentiles (the mask covers 100 - value % of the image)
CLASS_PERCENTILES = [80.0, 85.0, 90.0, 92.5, 95.0, 96.0, 97.0, 98.0, 98.5, 99.0, 99.25, 99.5, 99.75]
#: candidate per-observation smoothings, pixels of the network grid (small lesions and tubes want little, large
#: regions much)
CLASS_SIGMAS = [1.0, 2.0, 4.0, 8.0]


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def soft_maps(gen, raw: torch.Tensor, cams: torch.Tensor | None, classes: list[int]) -> torch.Tensor:
    """One classifier's normalised soft maps of the targets ``classes``, as ``DoLLGenerator._explain`` makes them:
    the post-processed IG, or with explainer ``ig_gradcam`` each observation's ``class_explainers`` map (by default
    the geometric mean of the post-processed IG and Grad-CAM)."""
    soft = gen.postprocess_soft(raw, classes)
    if cams is not None:
        soft = gen.ig.combine(soft, gen.postprocess_soft(cams, classes), classes)
    return soft


def tune_class_thresholds(gen, cache: list[dict], names, sigmas: list[float] | None = None) -> "pd.DataFrame":
    """Per observation, candidate map, smoothing and percentile: the mean IoU over the cached images that have its
    lesion (misses count 0), with every other setting as ``gen.post`` has it (each observation's choice is
    independent: its masks depend only on its own map, smoothing and threshold). The candidate maps are the
    configured one, and with explainer ``ig_gradcam`` each of :data:`bundle.doll.generator.EXPLAINERS`
    (``class_explainers``); the candidate smoothings ``sigmas`` (``class_smooth_sigma``; default: the configured
    ``smooth_sigma`` alone)."""
    # the configured map and smoothing first: a tie keeps them
    kinds = [gen.ig.explainer] + ([k for k in EXPLAINERS if k != "ig_gradcam"]
                                  if gen.ig.explainer == "ig_gradcam" else [])
    sigmas = [gen.post.smooth_sigma] + [float(v) for v in sigmas or [] if float(v) != gen.post.smooth_sigma]
    saved = (gen.post.threshold, gen.post.class_threshold_values, gen.ig.class_explainers, gen.post.class_smooth_sigma)
    gen.post.threshold, gen.post.class_threshold_values = "percentile", {}
    rows = []
    for sigma in sigmas:
        gen.post.class_smooth_sigma = {name: sigma for name in names}
        # each classifier's post-processed IG and Grad-CAM maps once per smoothing; the candidate maps combine them
        processed = [[(gen.postprocess_soft(r, e["targets"]),
                       None if c is None else gen.postprocess_soft(c, e["targets"]))
                      for r, c in zip(e["raw"], e["cams"])] if e["targets"] else None for e in cache]
        for kind in kinds:
            if gen.ig.explainer == "ig_gradcam":
                gen.ig.class_explainers = {name: kind for name in names}
            rows += _score_percentiles(gen, cache, processed, names, {"explainer": kind, "smooth_sigma": sigma})
    (gen.post.threshold, gen.post.class_threshold_values, gen.ig.class_explainers,
     gen.post.class_smooth_sigma) = saved
    return pd.DataFrame(rows)


def _score_percentiles(gen, cache: list[dict], processed: list, names, labels: dict) -> list[dict]:
    """Rows of :func:`tune_class_thresholds` for one candidate map and smoothing (``labels``): the post-processed
    maps ``processed`` (per image, per classifier ``(IG, Grad-CAM or None)``) combined as ``gen.ig`` says, boosted,
    and scored at each of :data:`CLASS_PERCENTILES`."""
    fused_all = []
    for entry, maps in zip(cache, processed):
        if maps is None:
            fused_all.append(None)
            continue
        t = entry["targets"]
        soft = torch.stack([ig if cam is None else gen.ig.combine(ig, cam, t) for ig, cam in maps])
        fused_all.append(gen.boost_maps(soft.unsqueeze(1), entry["probs"][: soft.shape[0], t].unsqueeze(1))[0])
    rows = []
    for q in CLASS_PERCENTILES:
        gen.post.threshold_value = q
        per_obs: dict[int, list[float]] = {}
        for entry, fused in zip(cache, fused_all):
            binary = gen.binarize(fused, entry["targets"]) if fused is not None else None
            masks = {c: binary[i].numpy() for i, c in enumerate(entry["targets"])} if binary is not None else {}
            for c, truth in entry["truth"].items():
                per_obs.setdefault(c, []).append(_iou(masks.get(c, np.zeros_like(truth)), truth))
        rows += [{"observation": names[c], **labels, "percentile": q, "n": len(v), "iou": float(np.mean(v))}
                 for c, v in sorted(per_obs.items())]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT), help="folder holding data/, models/ (the pipeline's --root)")
    ap.add_argument("--max-images", type=int, default=100)
    ap.add_argument("--split", default=None,
                    help="split tuned on (default: training on the phantom, validation with CheXlocalize and "
                         "CheXpert's test set; never the split the quality stage scores)")
    ap.add_argument("--out", default=None,
                    help="the tables' markdown file (default: docs/doll_tuning.md for the bundle's own run, "
                         "<root>/doll_tuning.md for another --root, so a run on real data never rewrites the docs)")
    ap.add_argument("--skip-grid", action="store_true", help="only the per-observation thresholds")
    ap.add_argument("--explainer", default=None, choices=["ig", "ig_gradcam"],
                    help="doll#ig#explainer (default: the config's); ig_gradcam tunes the consensus maps' thresholds "
                         "(and the global grid scores them)")
    ap.add_argument("--sigmas", default=str(CLASS_SIGMAS), type=yaml.safe_load,
                    help="candidate per-observation smoothings, pixels (doll#post#class_smooth_sigma; YAML list, "
                         "default %(default)s; '[]' keeps the configured smooth_sigma for every observation)")
    ap.add_argument("--ig", action="append", default=[], metavar="KEY=VALUE",
                    help="an IG setting of doll#ig (bundle.doll.generator.IGSettings), repeatable, e.g. --ig "
                         "output=sigmoid --ig baselines=blur: the thresholds are tuned for those maps")
    ap.add_argument("--set", action="append", default=[], metavar="ID=VALUE", dest="overrides",
                    help="any id of configs/generate_doll.yaml (YAML value), repeatable, e.g. --set "
                         "'image_size=[256,256]' --set doll#post#smooth_sigma=8 (the classifiers under --root must "
                         "have been trained at that size)")
    args = ap.parse_args()
    if args.out is None:
        own = Path(args.root).resolve() == ROOT.resolve()
        args.out = str(ROOT / "docs" / "doll_tuning.md" if own else Path(args.root) / "doll_tuning.md")
    torch.set_num_threads(2)
    root = Path(args.root)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "generate_doll.yaml"))
    pipeline = ConfigParser.load_config_file(str(ROOT / "configs" / "pipeline.yaml"))["default"]
    parser.update({"data_root": str(root / "data"), "models_dir": str(root / "models"),
                   "classifier_names": [f"{c['classifier_arch']}_seed{c['seed']}" for c in pipeline["classifiers"]]})
    # the maps' settings (config ids -> values), also written into the overlay: --explainer is doll#ig#explainer,
    # --ig KEY=VALUE is --set doll#ig#KEY=VALUE; the --set ids win (applied last)
    settings: dict = {"doll#ig#explainer": args.explainer} if args.explainer else {}
    for flag, form, prefix, given in (("--ig", "KEY=VALUE", "doll#ig#", args.ig),
                                      ("--set", "ID=VALUE", "", args.overrides)):
        for setting in given:
            key, sep, value = setting.partition("=")
            if not sep or not key:
                ap.error(f"{flag} expects {form}, got {setting!r}")
            settings[prefix + key] = yaml.safe_load(value)
    for key, value in settings.items():
        parser[key] = value
    gen = parser.get_parsed_content("doll_generator")
    preprocess = parser.get_parsed_content("preprocessing")
    split, items = tuning_items(parser.get_parsed_content("datalist"), args.split)
    items = items[: args.max_images]
    judged = lesion_items(parser.get_parsed_content("datalist"))[0]["split"]
    judge = lesion_judge(items)
    if split == judged:
        print(f"warning: tuning on the {split} split, which the quality stage scores: its figures will not be "
              "held apart", flush=True)
    k = gen.num_classes

    # IG once: raw positive-evidence maps per classifier, targets, probabilities, truths
    cache = []
    for it in items:
        d = preprocess(dict(it))
        x = torch.as_tensor(d["image"]).unsqueeze(0).float()
        probs = gen.probabilities(x)
        targets = gen.select_targets(probs.mean(0), torch.as_tensor(d["label"]).view(1, -1))[0]
        truth = load_bitmask(it["lesion"], k)
        raw, cams = [], []
        for m, engine in enumerate(gen.engines):
            with torch.enable_grad():
                res = engine.attribute(x, [targets], return_convergence_delta=False, **gen.ig_kwargs)
            raw.append(res.attributions[0, : len(targets)].detach())
            cams.append(gradcam_maps(gen.classifiers[m], gen.ig.gradcam_layer, x, [targets], k)[0, targets]
                        if gen.ig.explainer == "ig_gradcam" and targets else None)
        cache.append({"targets": targets, "probs": probs[:, 0], "raw": raw, "cams": cams,
                      "truth": {c: resize_mask(truth[c], x.shape[-2:]) for c in range(k) if truth[c].any()}})
        if len(cache) % 20 == 0 or len(cache) == len(items):
            print(f"IG {len(cache)}/{len(items)}", flush=True)

    configured = dict(vars(gen.post))
    lines = [f"# DoLL post-processing tuned on {'the phantom' if judge == 'phantom' else judge}", "",
             f"{len(cache)} {split} images with lesion masks (the quality stage scores the {judged} split), "
             f"classifiers {parser['classifier_names']}, IG {gen.ig_kwargs['n_steps']} steps, explainer "
             f"{gen.ig.explainer}" + (f" ({', '.join(args.ig)})" if args.ig else "")
             + (f", overrides {', '.join(args.overrides)}" if args.overrides else "") + ". Mean IoU over "
             "observations (each weighted equally; a missed observation counts 0). Generated by "
             "`scripts/tune_doll.py`.", ""]
    best = None
    if not args.skip_grid:
        df, best, grid_lines = _global_grid(gen, cache, args)
        lines += grid_lines
    per_class = tune_class_thresholds(gen, cache, OBSERVATIONS, args.sigmas)
    chosen = per_class.loc[per_class.groupby("observation")["iou"].idxmax()].set_index("observation")
    default_q = configured["threshold_value"] if configured["threshold"] == "percentile" else 95.0
    at_default = per_class[(per_class.percentile == default_q) & (per_class.explainer == gen.ig.explainer)
                           & (per_class.smooth_sigma == configured["smooth_sigma"])].set_index("observation")
    by_class = len(set(per_class.explainer)) > 1
    by_sigma = len(set(per_class.smooth_sigma)) > 1
    lines += ["", "## Per-observation thresholds", "",
              f"With the settings of `configs/generate_doll.yaml` (smoothing {configured['smooth_sigma']}, "
              f"{configured['normalize']} normalisation, {configured['boost']} boosting, components < "
              f"{configured['min_component_size']} px removed), each observation's percentile is chosen alone from "
              f"{CLASS_PERCENTILES} (`doll#post#class_threshold_values`)"
              + (f", with its map among {sorted(set(per_class.explainer))} (`doll#ig#class_explainers`)"
                 if by_class else "")
              + (f", with its smoothing among {sorted(set(per_class.smooth_sigma))} px (`doll#post#class_smooth_sigma`)"
                 if by_sigma else "") + ":", "",
              f"| observation | images | IoU at the {default_q:g}th percentile | chosen "
              + ("map, " if by_class else "") + ("smoothing, " if by_sigma else "") + "percentile | IoU |",
              "|---|---|---|---|---|"]
    for name in OBSERVATIONS:
        if name in chosen.index:
            r = chosen.loc[name]
            choice = ((f"{r['explainer']}, " if by_class else "") + (f"{r['smooth_sigma']:g} px, " if by_sigma else "")
                      + f"{r['percentile']:g}")
            lines.append(f"| {name} | {int(r['n'])} | {at_default.loc[name, 'iou']:.3f} | {choice} | "
                         f"{r['iou']:.3f} |")
    lines.append(f"| mean | | {at_default['iou'].mean():.3f} | | {chosen['iou'].mean():.3f} |")
    atomic_save(Path(args.out).with_name("doll_class_thresholds.csv"), lambda tmp: per_class.to_csv(tmp, index=False))
    kept = ""  # hand-written sections after the marker survive a re-run
    if Path(args.out).is_file() and KEEP_MARKER in Path(args.out).read_text():
        kept = Path(args.out).read_text().split(KEEP_MARKER, 1)[1]
    atomic_write_text(args.out, "\n".join(lines) + "\n\n" + KEEP_MARKER + kept)
    print("\nclass_threshold_values:")
    for name in OBSERVATIONS:
        if name in chosen.index:
            print(f"  {name}: {chosen.loc[name, 'percentile']:g}"
                  + (f" ({chosen.loc[name, 'explainer']})" if by_class else "")
                  + (f" (smoothing {chosen.loc[name, 'smooth_sigma']:g} px)" if by_sigma else ""))
    overlay = write_overlay(Path(args.out).with_name(OVERLAY_NAME), chosen, settings, split, len(cache),
                            configured.get("class_threshold_values"), by_class, by_sigma)
    print(f"config overlay with these percentiles and the maps' settings: {overlay}")
    print(f"mean IoU {at_default['iou'].mean():.4f} (one percentile) -> {chosen['iou'].mean():.4f} (per observation)")
    if best is not None:
        print("\nbest global setting:", best)


def write_overlay(path: Path, chosen: "pd.DataFrame", settings: dict, split: str, n_images: int,
                  configured: dict | None = None, by_class: bool = False, by_sigma: bool = False) -> Path:
    """A config overlay for ``configs/generate_doll.yaml`` (``--config_file "[..., '<path>']"``) holding the chosen
    per-observation percentiles and every setting the maps were tuned with (``settings``: ``--explainer``, ``--ig``,
    ``--set`` as config ids), so the DoLL and its quality are made with exactly the tuned recipe. Observations
    without a lesion mask to tune on (CheXlocalize has none for Pneumonia, Pleural Other and Fracture) keep their
    ``configured`` percentile. ``by_class``: each observation's map was chosen too (``chosen["explainer"]``, with
    explainer ``ig_gradcam``), written as ``doll#ig#class_explainers``; the untuned keep the consensus.
    ``by_sigma``: each observation's smoothing was chosen too (``chosen["smooth_sigma"]``), written as
    ``doll#post#class_smooth_sigma``; the untuned keep ``smooth_sigma``."""
    tuned = {name: float(chosen.loc[name, "percentile"]) for name in OBSERVATIONS if name in chosen.index}
    kept = {name: float(v) for name, v in (configured or {}).items() if name not in tuned}
    values = {name: tuned.get(name, kept.get(name)) for name in OBSERVATIONS if name in tuned or name in kept}
    content: dict = {"doll#post#threshold": "percentile", "doll#post#class_threshold_values": values, **settings}
    if by_class:
        content["doll#ig#class_explainers"] = {name: str(chosen.loc[name, "explainer"]) for name in tuned}
    if by_sigma:
        content["doll#post#class_smooth_sigma"] = {name: float(chosen.loc[name, "smooth_sigma"]) for name in tuned}
    head = (f"# DoLL per-observation percentiles{' and smoothing' if by_sigma else ''}"
            f"{' and maps' if by_class else ''} chosen by scripts/tune_doll.py on {n_images} {split} images, with the "
            "settings their maps were made with:\n# an overlay read after configs/generate_doll.yaml (and "
            "configs/evaluate_doll.yaml for the quality stage).\n"
            + (f"# Kept from the config (no lesion mask to tune them on): {', '.join(kept)}.\n" if kept else ""))
    atomic_write_text(path, head + yaml.safe_dump(content, sort_keys=False))
    return path


def _global_grid(gen, cache: list[dict], args) -> tuple["pd.DataFrame", dict, list[str]]:
    """Every combination of :data:`GRID` scored on the cache: the table, the best row and the report's lines."""
    configured = dict(vars(gen.post))
    rows = []
    for sigma, norm, boost, (thr, val), min_size in itertools.product(*GRID.values()):
        gen.post.smooth_sigma, gen.post.normalize, gen.post.threshold, gen.post.threshold_value = sigma, norm, thr, val
        gen.post.min_component_size = min_size
        gen.post.class_smooth_sigma = {}  # one setting for every observation
        gen.post.boost = boost if boost != "single" else "mean"
        per_obs: dict[int, list[float]] = {}
        for entry in cache:
            t = entry["targets"]
            masks = {}
            if t:
                # (M, T, H, W)
                soft = torch.stack([soft_maps(gen, r, c, t) for r, c in zip(entry["raw"], entry["cams"])])
                if boost == "single":
                    soft = soft[:1]
                fused = gen.boost_maps(soft.unsqueeze(1), entry["probs"][: soft.shape[0], t].unsqueeze(1))[0]
                binary = gen.binarize(fused)
                masks = {c: binary[i].numpy() for i, c in enumerate(t)}
            for c, truth in entry["truth"].items():
                per_obs.setdefault(c, []).append(_iou(masks.get(c, np.zeros_like(truth)), truth))
        mean_iou = float(np.mean([np.mean(v) for v in per_obs.values()]))
        rows.append({"smooth_sigma": sigma, "normalize": norm, "boost": boost, "threshold": thr,
                     "threshold_value": val, "min_component_size": min_size, "mean_iou": round(mean_iou, 4)})
    df = pd.DataFrame(rows).sort_values("mean_iou", ascending=False)
    csv = Path(args.out).with_suffix(".csv")
    atomic_save(csv, lambda tmp: df.to_csv(tmp, index=False))
    best = df.iloc[0].to_dict()
    lines = ["## One setting for every observation", "", f"The top 15 of {len(df)} settings:", "",
             "| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.head(15).itertuples(index=False)]
    lines += ["", "Measured effect of each step: the best mean IoU with the step's setting fixed (the others free)", "",
              "| step | setting | best mean IoU |", "|---|---|---|"]
    for key in ("smooth_sigma", "normalize", "boost", "threshold", "min_component_size"):
        for value, sub in df.groupby(key, sort=False):
            label = "single classifier" if value == "single" else value
            lines.append(f"| {key} | {label} | {sub.mean_iou.max():.4f} |")
    for key in ("smooth_sigma", "min_component_size"):
        if best[key] in (min(GRID[key]), max(GRID[key])) and len(GRID[key]) > 1:
            lines.append(f"\nNote: the best {key} ({best[key]}) is at the edge of the grid {GRID[key]}; "
                         "a wider grid may do better.")
    lines.append("\nThe common settings of `configs/generate_doll.yaml` (smoothing 4, percentile normalisation, "
                 "probability-weighted boosting: the paper's, percentile thresholds) are kept where they score within "
                 "0.01 of the best single setting; the per-observation thresholds below are the larger step.")
    for key, value in configured.items():
        setattr(gen.post, key, value)
    return df, best, lines



if __name__ == "__main__":
    main()

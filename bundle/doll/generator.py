"""Integrated Gradients of several classifiers to diagnosis-oriented localization labels (DoLL).

The recipe (MISSION.md, stage 3), every step a parameter of :class:`DoLLGenerator`:

1. **targets** per image: the observations labelled positive and/or predicted above a per-class probability threshold
   (mean over the classifiers); "No Finding" never.
2. **IG** of each classifier for those targets only (:class:`bundle.explain.ig.MultiTargetIntegratedGradients`: one
   forward pass per interpolation step shared by all targets).
3. **positive evidence**, Gaussian **smoothing**, **per-map normalisation** to ``[0, 1]``.
4. **boosting** across classifiers: probability-weighted mean (classifier ``m``'s map of class ``c`` weighs
   ``p_m(c)``), plain mean, or max; optional test-time horizontal flip (maps of the flipped image flipped back).
5. **threshold** (fixed, percentile or Otsu) and removal of components smaller than ``min_component_size`` pixels.

Output per image: a ``(14, H, W)`` binary DoLL (empty channels for observations that are not targets) and the
``(14, H, W)`` soft maps. :class:`IGToDoLL` / :class:`IGToDoLLd` are the MONAI array / dictionary transforms.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from torch import nn

from ..constants import NO_FINDING, NUM_OBSERVATIONS
from ..explain.ig import MultiTargetIntegratedGradients
from . import postprocess as pp


@dataclass
class DoLLOutput:
    """Result of :meth:`DoLLGenerator.__call__` for a batch of ``B`` images and ``M`` classifiers.

    Attributes:
        masks: ``(B, K, H, W)`` uint8 DoLL.
        soft: ``(B, K, H, W)`` boosted soft maps in ``[0, 1]`` (zero for non-targets).
        per_classifier: ``(M, B, K, H, W)`` normalised soft maps of each classifier before boosting.
        targets: per image, the explained observations.
        probs: ``(M, B, K)`` sigmoid probabilities of each classifier.
        deltas: per image, ``(M, T_b)`` completeness deltas of the IG maps.
    """

    masks: torch.Tensor
    soft: torch.Tensor
    per_classifier: torch.Tensor
    targets: list[list[int]]
    probs: torch.Tensor
    deltas: list[torch.Tensor] = field(default_factory=list)


class DoLLGenerator:
    """Distil and boost the IG explanations of ``classifiers`` into DoLL (see the module docstring).

    Args:
        classifiers: networks mapping ``(B, 1, H, W)`` images to ``(B, K)`` logits (put in eval mode).
        num_classes: ``K`` (14 CheXpert observations).
        exclude: classes never explained (default: No Finding).
        target_source: ``"labels_or_predicted"`` (default), ``"labels"`` or ``"predicted"``.
        prob_threshold: per-class probability threshold(s) above which a prediction makes a target.
        n_steps, method, baselines, blur_sigma, n_baseline_draws, internal_batch_size: IG settings
            (:meth:`MultiTargetIntegratedGradients.attribute`).
        ig_output: what IG explains: ``"logits"`` (default) or ``"sigmoid"``.
        smooth_sigma: Gaussian smoothing of the positive evidence, pixels.
        normalize: ``"max"`` or ``"percentile"`` (with ``norm_percentile``).
        boost: ``"prob_weighted"`` (default), ``"mean"`` or ``"max"``.
        tta_flip: also explain the horizontally flipped image and average (off by default: anatomy is asymmetric).
        threshold: ``"otsu"`` (default), ``"fixed"`` or ``"percentile"``; ``threshold_value`` is the fixed value,
            the percentile (0-100), or Otsu's floor.
        min_component_size: connected components below this many pixels are removed.
        amp_dtype: optional autocast dtype for IG on CUDA.
    """

    def __init__(self, classifiers: Sequence[nn.Module], num_classes: int = NUM_OBSERVATIONS,
                 exclude: Sequence[int] = (NO_FINDING,), target_source: str = "labels_or_predicted",
                 prob_threshold: float | Sequence[float] = 0.5, n_steps: int = 16, method: str = "gausslegendre",
                 baselines: str | float = "zeros", blur_sigma: float = 10.0, n_baseline_draws: int = 1,
                 internal_batch_size: int | None = 64, ig_output: str = "logits", smooth_sigma: float = 2.0,
                 normalize: str = "max", norm_percentile: float = 99.0, boost: str = "prob_weighted",
                 tta_flip: bool = False, threshold: str = "otsu", threshold_value: float = 0.0,
                 min_component_size: int = 16, amp_dtype: torch.dtype | None = None):
        if not classifiers:
            raise ValueError("DoLLGenerator needs at least one classifier")
        if target_source not in ("labels_or_predicted", "labels", "predicted"):
            raise ValueError(f"unknown target_source {target_source!r}")
        if boost not in ("prob_weighted", "mean", "max"):
            raise ValueError(f"unknown boost {boost!r}: use 'prob_weighted', 'mean' or 'max'")
        self.classifiers = list(classifiers)
        for net in self.classifiers:
            net.eval()
        self.num_classes = num_classes
        self.exclude = set(int(c) for c in exclude)
        self.target_source = target_source
        thr = torch.as_tensor(prob_threshold, dtype=torch.float32)
        self.prob_threshold = thr.expand(num_classes).clone() if thr.dim() == 0 else thr
        self.ig_kwargs = {"n_steps": n_steps, "method": method, "baselines": baselines, "blur_sigma": blur_sigma,
                          "n_baseline_draws": n_baseline_draws, "internal_batch_size": internal_batch_size}
        self.engines = [MultiTargetIntegratedGradients(net, output=ig_output, amp_dtype=amp_dtype)
                        for net in self.classifiers]
        self.smooth_sigma = smooth_sigma
        self.normalize = normalize
        self.norm_percentile = norm_percentile
        self.boost = boost
        self.tta_flip = tta_flip
        self.threshold = threshold
        self.threshold_value = threshold_value
        self.min_component_size = min_component_size

    # -- steps ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """``(M, B, K)`` sigmoid outputs of every classifier."""
        return torch.stack([torch.sigmoid(net(images).float()) for net in self.classifiers])

    def select_targets(self, probs: torch.Tensor, labels: torch.Tensor | None = None) -> list[list[int]]:
        """Targets per image from ``(B, K)`` mean probabilities and optional ``(B, K)`` labels (NaN = unknown)."""
        predicted = probs > self.prob_threshold.to(probs.device)
        if labels is None or self.target_source == "predicted":
            chosen = predicted if self.target_source != "labels" else torch.zeros_like(predicted)
        else:
            positive = torch.nan_to_num(labels.float(), nan=0.0) > 0.5
            chosen = positive if self.target_source == "labels" else positive | predicted
        return [[c for c in range(self.num_classes) if bool(row[c]) and c not in self.exclude] for row in chosen]

    def postprocess_soft(self, attributions: torch.Tensor) -> torch.Tensor:
        """Raw IG maps ``(N, C, H, W)`` to normalised soft maps ``(N, H, W)``: positive, smoothed, normalised."""
        maps = pp.positive_evidence(attributions)
        maps = pp.gaussian_smooth(maps, self.smooth_sigma)
        return pp.normalize_maps(maps, self.normalize, self.norm_percentile)

    def binarize(self, soft: torch.Tensor) -> torch.Tensor:
        """Soft maps ``(N, H, W)`` to boolean masks: threshold, then removal of small components."""
        masks = pp.threshold_maps(soft, self.threshold, self.threshold_value)
        return pp.remove_small_components(masks, self.min_component_size)

    def boost_maps(self, per_classifier: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Combine ``(M, B, K, H, W)`` maps into ``(B, K, H, W)`` with ``(M, B, K)`` probabilities as weights."""
        if self.boost == "max":
            return per_classifier.max(0).values
        if self.boost == "mean" or per_classifier.shape[0] == 1:
            return per_classifier.mean(0)
        w = probs.unsqueeze(-1).unsqueeze(-1)
        total = w.sum(0)
        weighted = (per_classifier * w).sum(0) / total.clamp_min(1e-8)
        return torch.where(total > 1e-8, weighted, per_classifier.mean(0))

    def _explain(self, m: int, images: torch.Tensor, targets: list[list[int]]) -> tuple[torch.Tensor, list]:
        """Normalised soft maps ``(B, K, H, W)`` of classifier ``m`` for the targets, plus the deltas."""
        b, _, h, w = images.shape
        out = images.new_zeros((b, self.num_classes, h, w))
        if not any(targets):
            return out, [torch.zeros(0)] * b
        with torch.enable_grad():
            res = self.engines[m].attribute(images, targets, return_convergence_delta=True, **self.ig_kwargs)
            if self.tta_flip:
                res_f = self.engines[m].attribute(images.flip(-1), targets, return_convergence_delta=False,
                                                  **self.ig_kwargs)
        attr = res.attributions.detach()
        if self.tta_flip:
            attr = 0.5 * (attr + res_f.attributions.detach().flip(-1))
        deltas = []
        for i, (row, maps, delta) in enumerate(res.per_image()):
            if row:
                idx = torch.tensor(row, device=out.device)
                out[i, idx] = self.postprocess_soft(attr[i, : len(row)]).to(out.dtype)
            deltas.append(torch.zeros(0) if delta is None else delta.detach().cpu())
        return out, deltas

    # -- all together --------------------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 probs: torch.Tensor | None = None) -> DoLLOutput:
        """DoLL of a batch ``(B, 1, H, W)``; ``labels`` ``(B, K)`` with NaN for unknown; ``probs`` ``(M, B, K)``
        when the classifiers' outputs are already known (else computed)."""
        images = images.float()
        for net in self.classifiers:  # an evaluator may have put them back in training mode
            net.eval()
        if probs is None:
            probs = self.probabilities(images)
        targets = self.select_targets(probs.mean(0), labels)
        per_clf, deltas = [], []
        for m in range(len(self.classifiers)):
            maps, d = self._explain(m, images, targets)
            per_clf.append(maps)
            deltas.append(d)
        per_classifier = torch.stack(per_clf)
        soft = self.boost_maps(per_classifier, probs.to(per_classifier.device))
        masks = torch.zeros_like(soft, dtype=torch.uint8)
        for i, row in enumerate(targets):
            if row:
                idx = torch.tensor(row, device=soft.device)
                masks[i, idx] = self.binarize(soft[i, idx]).to(torch.uint8)
        keep = torch.zeros_like(soft)
        for i, row in enumerate(targets):
            keep[i, row] = 1.0
        per_image_deltas = [torch.stack([d[i] for d in deltas]) if len(deltas[0][i]) else torch.zeros(len(deltas), 0)
                            for i in range(images.shape[0])]
        return DoLLOutput(masks=masks, soft=soft * keep, per_classifier=per_classifier, targets=targets,
                          probs=probs, deltas=per_image_deltas)


class IGToDoLL(Transform):
    """Array transform: one image ``(1, H, W)`` (and optional ``(K,)`` labels, NaN = unknown) to its ``(K, H, W)``
    uint8 DoLL. The last call's :class:`DoLLOutput` stays in ``self.last`` (soft maps, targets, probabilities).

    Args:
        generator: a :class:`DoLLGenerator`, or the keyword arguments to build one.
    """

    def __init__(self, generator: DoLLGenerator | None = None, **kwargs: Any):
        self.generator = generator if generator is not None else DoLLGenerator(**kwargs)
        self.last: DoLLOutput | None = None

    def __call__(self, image: torch.Tensor, label: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
        x = torch.as_tensor(image).unsqueeze(0)
        lab = None if label is None else torch.as_tensor(np.asarray(label, dtype=np.float32)).view(1, -1)
        self.last = self.generator(x, lab)
        return self.last.masks[0]


class IGToDoLLd(MapTransform):
    """Dictionary transform: ``image`` (+ ``label``) to ``doll`` (``(K, H, W)`` uint8), ``doll_soft`` (soft maps,
    optional), ``doll_targets`` (list of explained observations), ``doll_probs`` (``(M, K)`` probabilities) and
    ``doll_delta`` (``(M, T)`` completeness deltas).

    Args:
        keys: the image key (one).
        label_key: key of the ``(K,)`` labels (NaN = unknown); ``None`` or missing = targets from predictions only.
        doll_key, soft_key: output keys (``soft_key=None`` drops the soft maps).
        generator / kwargs: as :class:`IGToDoLL`.
    """

    def __init__(self, keys: KeysCollection = "image", label_key: str | None = "label", doll_key: str = "doll",
                 soft_key: str | None = "doll_soft", generator: DoLLGenerator | None = None,
                 allow_missing_keys: bool = False, **kwargs: Any):
        super().__init__(keys, allow_missing_keys)
        self.transform = IGToDoLL(generator, **kwargs)
        self.label_key = label_key
        self.doll_key = doll_key
        self.soft_key = soft_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d.get(self.label_key) if self.label_key else None
            d[self.doll_key] = self.transform(d[key], label)
            out = self.transform.last
            assert out is not None
            if self.soft_key:
                d[self.soft_key] = out.soft[0]
            d["doll_targets"] = out.targets[0]
            d["doll_probs"] = out.probs[:, 0]
            d["doll_delta"] = out.deltas[0]
        return d


# -- classifiers on disk ---------------------------------------------------------------------------------------
def load_classifiers(ckpt_root: str, names: Sequence[str], device: str | torch.device = "cpu") -> list[nn.Module]:
    """Load the best checkpoints ``<ckpt_root>/<name>/model.pt`` of trained classifiers (architecture from the
    ``classifier.json`` written beside them by the classifier stage), in eval mode on ``device``."""
    from ..networks.classifiers import build_classifier
    from ..utils import BundleInputError, load_json
    from ..workflows.checkpoint import read_state_dict

    nets = []
    for name in names:
        folder = os.path.join(ckpt_root, name)
        spec = load_json(os.path.join(folder, "classifier.json"))
        weights = os.path.join(folder, "model.pt")
        if not os.path.exists(weights):
            raise BundleInputError(weights, f"classifier {name!r} has no trained weights (run the classifier stage)")
        net = build_classifier(spec["arch"], in_channels=spec.get("in_channels", 1),
                               num_classes=spec.get("num_classes", NUM_OBSERVATIONS), **spec.get("kwargs", {}))
        net.load_state_dict(read_state_dict(weights))
        nets.append(net.to(device).eval())
    return nets


class ClassifierEnsemble(nn.Module):
    """Stack the sigmoid probabilities of several classifiers: ``(B, M, K)``. The evaluator of the DoLL stage runs it
    so that :class:`IGToDoLLd` finds every classifier's prediction in ``pred``."""

    def __init__(self, classifiers: Sequence[nn.Module]):
        super().__init__()
        self.classifiers = nn.ModuleList(classifiers)
        self.eval()

    def train(self, mode: bool = True) -> "ClassifierEnsemble":
        """Always in eval mode: the ensemble only predicts (MONAI's evaluator restores the previous mode)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sigmoid(net(x).float()) for net in self.classifiers], dim=1)

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

The settings come in three groups, :class:`TargetSettings` (1), :class:`IGSettings` (2) and
:class:`PostprocessSettings` (3-5), each a dataclass or a dict (the ``doll:`` block of ``configs/generate_doll.yaml``).

Output per image: a ``(14, H, W)`` binary DoLL (empty channels for observations that are not targets) and the
``(14, H, W)`` soft maps. :class:`DoLLGenerator` takes a batch: IG runs on all its images at once and the
post-processing on all its (image, target) maps at once; the result is the per-image one up to float rounding.
The DoLL stage runs it through :class:`bundle.doll.inferer.DoLLInferer` (a MONAI ``Inferer``, the whole batch);
:class:`IGToDoLL` / :class:`IGToDoLLd` are the per-image MONAI array / dictionary transforms.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from torch import nn

from ..constants import NO_FINDING, NUM_OBSERVATIONS, OBSERVATIONS
from ..explain.gradcam import gradcam_maps
from ..explain.ig import MultiTargetIntegratedGradients
from ..utils import as_bool
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


# -- settings ---------------------------------------------------------------------------------------------------
@dataclass
class TargetSettings:
    """Which observations of an image are explained.

    Attributes:
        source: ``"labels_or_predicted"`` (default: labelled positive or predicted), ``"labels"`` or ``"predicted"``.
        prob_threshold: per-class probability threshold(s) (on the mean over classifiers) above which a prediction
            makes a target.
        exclude: classes never explained (default: No Finding).
    """

    source: str = "labels_or_predicted"
    prob_threshold: float | Sequence[float] = 0.5
    exclude: Sequence[int] = (NO_FINDING,)

    def __post_init__(self) -> None:
        if self.source not in ("labels_or_predicted", "labels", "predicted"):
            raise ValueError(f"unknown target source {self.source!r}")


#: ``IGSettings.explainer`` values
EXPLAINERS: tuple[str, ...] = ("ig", "gradcam", "ig_gradcam")


@dataclass
class IGSettings:
    """How each classifier is explained (:meth:`bundle.explain.ig.MultiTargetIntegratedGradients.attribute`).

    Attributes:
        n_steps, method, baselines, blur_sigma, n_baseline_draws, internal_batch_size: IG settings
            (``internal_batch_size`` caps the interpolated images per forward pass: the memory knob).
        output: what IG explains: ``"logits"`` (default) or ``"sigmoid"``.
        tta_flip: also explain the horizontally flipped image and average (off by default: anatomy is asymmetric).
        amp_dtype: optional autocast dtype for IG on CUDA (``torch.bfloat16`` / ``"bfloat16"``, ``float16``).
        explainer: ``"ig"`` (the method), ``"gradcam"``: MONAI's Grad-CAM of ``gradcam_layer`` instead of IG, the
            rest of the recipe unchanged (the Grad-CAM-label control of the pre-training, ``bundle.doll.controls``),
            or ``"ig_gradcam"``: the consensus of both, the geometric mean of each classifier's normalised IG and
            Grad-CAM maps (IG's fine detail kept only where the class-discriminative Grad-CAM region agrees).
        gradcam_layer: the classifiers' Grad-CAM layer (``bundle.networks.classifiers.gradcam_layer_of``).
        class_explainers: with ``explainer="ig_gradcam"`` (the one setting that computes both maps), the map an
            observation keeps (observation name -> ``"ig"``, ``"gradcam"`` or ``"ig_gradcam"``; the others keep the
            consensus). Grad-CAM's map is the classifier's last feature grid upsampled (8x coarser than the image):
            the consensus helps where the finding is a region and can hurt where it is thin or small (tubes,
            wires). ``scripts/tune_doll.py --explainer ig_gradcam`` picks each observation's map with its percentile.
    """

    n_steps: int = 16
    method: str = "gausslegendre"
    baselines: str | float = "zeros"
    blur_sigma: float = 10.0
    n_baseline_draws: int = 1
    internal_batch_size: int | None = 64
    output: str = "logits"
    tta_flip: bool = False
    amp_dtype: torch.dtype | str | None = None
    explainer: str = "ig"
    gradcam_layer: str | None = None
    class_explainers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.explainer not in EXPLAINERS:
            raise ValueError(f"unknown explainer {self.explainer!r}: use one of {', '.join(EXPLAINERS)}")
        self.class_explainers = _by_observation("class_explainers", self.class_explainers, str)
        if self.class_explainers and self.explainer != "ig_gradcam":
            raise ValueError(f"class_explainers needs explainer 'ig_gradcam' (it computes both maps), not "
                             f"{self.explainer!r}")
        wrong = {k: v for k, v in self.class_explainers.items() if v not in EXPLAINERS}
        if wrong:
            raise ValueError(f"class_explainers: unknown explainer(s) {wrong}: use one of {', '.join(EXPLAINERS)}")
        if self.explainer != "ig" and not self.gradcam_layer:
            raise ValueError(f"explainer {self.explainer!r} needs gradcam_layer (the classifiers' last feature layer)")
        if isinstance(self.amp_dtype, str):
            self.amp_dtype = getattr(torch, self.amp_dtype.replace("torch.", ""))

    def combine(self, ig_soft: torch.Tensor, cam_soft: torch.Tensor, classes: torch.Tensor | Sequence[int]
                ) -> torch.Tensor:
        """The maps of ``explainer="ig_gradcam"``: ``(N, H, W)`` normalised IG and Grad-CAM maps of observations
        ``classes`` (``(N,)`` indices into the CheXpert order) to each one's :attr:`class_explainers` map, by default
        the consensus ``sqrt(ig * gradcam)`` of their positive parts."""
        out = (ig_soft.clamp_min(0) * cam_soft.clamp_min(0)).sqrt()
        if not self.class_explainers:
            return out
        names = [OBSERVATIONS[int(c)] for c in torch.as_tensor(classes).view(-1).tolist()]
        if len(names) != out.shape[0]:
            raise ValueError(f"{out.shape[0]} maps but {len(names)} class indices")
        for i, name in enumerate(names):
            kind = self.class_explainers.get(name, "ig_gradcam")
            if kind != "ig_gradcam":
                out[i] = (ig_soft[i] if kind == "ig" else cam_soft[i]).clamp_min(0)
        return out

    def attribute_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``MultiTargetIntegratedGradients.attribute``."""
        return {"n_steps": self.n_steps, "method": self.method, "baselines": self.baselines,
                "blur_sigma": self.blur_sigma, "n_baseline_draws": self.n_baseline_draws,
                "internal_batch_size": self.internal_batch_size}


@dataclass
class PostprocessSettings:
    """IG maps to DoLL (:mod:`bundle.doll.postprocess`).

    Attributes:
        smooth_sigma: Gaussian smoothing of the positive evidence, pixels.
        class_smooth_sigma: per-observation ``smooth_sigma`` (observation name -> pixels; the others keep
            ``smooth_sigma``): a small lesion or a thin tube is blurred away by the smoothing a large region needs.
            ``scripts/tune_doll.py`` picks each observation's value with its percentile.
        normalize: ``"max"`` or ``"percentile"`` (with ``norm_percentile``).
        norm_clip: clip the normalised maps to ``[0, 1]`` (:func:`bundle.doll.postprocess.normalize_maps`; the
            default, the shipped DoLL's). ``False`` keeps each map's order above its ``norm_percentile``: no plateau
            of ties at the maximum, and percentile thresholds above ``norm_percentile`` keep the map's peak; for
            ``"percentile"`` or ``"fixed"`` thresholds (Otsu's histogram covers ``[0, 1]`` only).
        boost: ``"prob_weighted"`` (default), ``"mean"`` or ``"max"`` across classifiers.
        threshold: ``"otsu"`` (default), ``"fixed"`` or ``"percentile"``; ``threshold_value`` is the fixed value,
            the percentile (0-100), or Otsu's floor.
        class_threshold_values: per-observation ``threshold_value`` (observation name -> value; the others keep
            ``threshold_value``). Lesions differ in size by 40x (a fracture covers ~0.3% of a phantom radiograph,
            edema ~8%), so one percentile gives every DoLL mask the same area whatever the finding;
            ``scripts/tune_doll.py`` picks each observation's value on training images with true lesions.
        min_component_size: connected components below this many pixels are removed.
    """

    smooth_sigma: float = 2.0
    class_smooth_sigma: dict[str, float] = field(default_factory=dict)
    normalize: str = "max"
    norm_percentile: float = 99.0
    norm_clip: bool = True
    boost: str = "prob_weighted"
    threshold: str = "otsu"
    threshold_value: float = 0.0
    class_threshold_values: dict[str, float] = field(default_factory=dict)
    min_component_size: int = 16

    def __post_init__(self) -> None:
        if self.boost not in ("prob_weighted", "mean", "max"):
            raise ValueError(f"unknown boost {self.boost!r}: use 'prob_weighted', 'mean' or 'max'")
        self.norm_clip = as_bool(self.norm_clip, "norm_clip")
        if not self.norm_clip and self.threshold == "otsu":
            raise ValueError("norm_clip false needs 'percentile' or 'fixed' thresholds: Otsu's histogram covers [0, 1]")
        for name in ("class_threshold_values", "class_smooth_sigma"):
            setattr(self, name, _by_observation(name, getattr(self, name), float))
        if any(v < 0 for v in self.class_smooth_sigma.values()):
            raise ValueError(f"class_smooth_sigma: negative value(s) in {self.class_smooth_sigma}")

    def threshold_values(self, classes: torch.Tensor | Sequence[int] | None, n: int) -> float | torch.Tensor:
        """The threshold value of each of ``n`` maps of observations ``classes`` (indices into the CheXpert order;
        ``None``: every map gets ``threshold_value``)."""
        return _per_class(self.class_threshold_values, self.threshold_value, classes, n)

    def smooth_sigmas(self, classes: torch.Tensor | Sequence[int] | None, n: int) -> float | torch.Tensor:
        """The smoothing sigma of each of ``n`` maps of observations ``classes`` (as :meth:`threshold_values`)."""
        return _per_class(self.class_smooth_sigma, self.smooth_sigma, classes, n)


def _by_observation(name: str, values: Mapping[str, Any] | None, cast: type) -> dict[str, Any]:
    """A per-observation setting ``name`` as ``{observation name: cast(value)}``; unknown names are refused."""
    table = {str(k): cast(v) for k, v in dict(values or {}).items()}
    unknown = sorted(set(table) - set(OBSERVATIONS))
    if unknown:
        raise ValueError(f"{name}: unknown observation(s) {unknown}; names: {list(OBSERVATIONS)}")
    return table


def _per_class(table: Mapping[str, float], default: float, classes: torch.Tensor | Sequence[int] | None,
               n: int) -> float | torch.Tensor:
    """``default``, or when ``table`` has values and ``classes`` are given, one value per map: its observation's
    entry of ``table`` (observation name -> value), else ``default``."""
    if classes is None or not table:
        return default
    values = torch.tensor([float(table.get(name, default)) for name in OBSERVATIONS])
    idx = torch.as_tensor(classes, dtype=torch.long).view(-1).cpu()
    if idx.numel() != n:
        raise ValueError(f"{n} maps but {idx.numel()} class indices")
    return values[idx]


#: the flat keyword names of :class:`DoLLGenerator` before the settings were grouped: (group, field)
FLAT_SETTINGS: dict[str, tuple[str, str]] = {
    "target_source": ("targets", "source"), "prob_threshold": ("targets", "prob_threshold"),
    "exclude": ("targets", "exclude"),
    **{k: ("ig", k) for k in ("n_steps", "method", "baselines", "blur_sigma", "n_baseline_draws",
                              "internal_batch_size", "tta_flip", "amp_dtype", "explainer", "gradcam_layer",
                              "class_explainers")},
    "ig_output": ("ig", "output"),
    **{k: ("post", k) for k in ("smooth_sigma", "class_smooth_sigma", "normalize", "norm_percentile", "norm_clip",
                                "boost", "threshold", "threshold_value", "class_threshold_values",
                                "min_component_size")},
}


def _settings(cls: type, value: Any) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    raise TypeError(f"{cls.__name__}: expected a {cls.__name__} or a dict, got {type(value).__name__}")


class DoLLGenerator:
    """Distil and boost the IG explanations of ``classifiers`` into DoLL (see the module docstring).

    Args:
        classifiers: networks mapping ``(B, 1, H, W)`` images to ``(B, K)`` logits (put in eval mode).
        num_classes: ``K`` (14 CheXpert observations).
        targets: :class:`TargetSettings` or a dict of its fields (which observations are explained).
        ig: :class:`IGSettings` or a dict of its fields (Integrated Gradients).
        post: :class:`PostprocessSettings` or a dict of its fields (maps to masks, boosting).
        **flat: the settings under their flat names (:data:`FLAT_SETTINGS`: ``n_steps``, ``target_source``,
            ``ig_output``, ``smooth_sigma``, ...); a flat name overrides its group's value, so a command-line
            override ``--doll#n_steps 4`` still works on a grouped ``doll:`` block.

    The groups are ``self.targets``, ``self.ig`` and ``self.post`` (change their fields to re-tune the
    post-processing of cached maps, as ``scripts/tune_doll.py`` does).
    """

    def __init__(self, classifiers: Sequence[nn.Module], num_classes: int = NUM_OBSERVATIONS,
                 targets: TargetSettings | Mapping[str, Any] | None = None,
                 ig: IGSettings | Mapping[str, Any] | None = None,
                 post: PostprocessSettings | Mapping[str, Any] | None = None, **flat: Any):
        if not classifiers:
            raise ValueError("DoLLGenerator needs at least one classifier")
        unknown = sorted(set(flat) - set(FLAT_SETTINGS))
        if unknown:
            raise TypeError(f"DoLLGenerator: unknown setting(s) {unknown}; groups: targets, ig, post "
                            f"(flat names: {sorted(FLAT_SETTINGS)})")
        groups = {"targets": targets, "ig": ig, "post": post}
        for name, value in flat.items():
            group, fld = FLAT_SETTINGS[name]
            current = groups[group]
            merged = dataclasses.asdict(current) if dataclasses.is_dataclass(current) else dict(current or {})
            merged[fld] = value
            groups[group] = merged
        self.targets: TargetSettings = _settings(TargetSettings, groups["targets"])
        self.ig: IGSettings = _settings(IGSettings, groups["ig"])
        self.post: PostprocessSettings = _settings(PostprocessSettings, groups["post"])
        self.classifiers = list(classifiers)
        for net in self.classifiers:
            net.eval()
        self.num_classes = num_classes
        self.exclude = set(int(c) for c in self.targets.exclude)
        thr = torch.as_tensor(self.targets.prob_threshold, dtype=torch.float32)
        self.prob_threshold = thr.expand(num_classes).clone() if thr.dim() == 0 else thr
        self.engines = [MultiTargetIntegratedGradients(net, output=self.ig.output, amp_dtype=self.ig.amp_dtype)
                        for net in self.classifiers]

    @property
    def ig_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``MultiTargetIntegratedGradients.attribute`` (from ``self.ig``)."""
        return self.ig.attribute_kwargs()

    def settings(self) -> dict[str, dict[str, Any]]:
        """The three settings groups as plain dicts (for logging)."""
        return {"targets": dataclasses.asdict(self.targets), "ig": dataclasses.asdict(self.ig),
                "post": dataclasses.asdict(self.post)}

    # -- steps ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """``(M, B, K)`` sigmoid outputs of every classifier."""
        return torch.stack([torch.sigmoid(net(images).float()) for net in self.classifiers])

    def select_targets(self, probs: torch.Tensor, labels: torch.Tensor | None = None) -> list[list[int]]:
        """Targets per image from ``(B, K)`` mean probabilities and optional ``(B, K)`` labels (NaN = unknown)."""
        source = self.targets.source
        predicted = probs > self.prob_threshold.to(probs.device)
        if labels is None or source == "predicted":
            chosen = predicted if source != "labels" else torch.zeros_like(predicted)
        else:
            positive = torch.nan_to_num(labels.float(), nan=0.0).to(probs.device) > 0.5
            chosen = positive if source == "labels" else positive | predicted
        return [[c for c in range(self.num_classes) if bool(row[c]) and c not in self.exclude]
                for row in chosen.cpu()]

    def postprocess_soft(self, attributions: torch.Tensor, classes: torch.Tensor | Sequence[int] | None = None
                         ) -> torch.Tensor:
        """Raw IG maps ``(N, C, H, W)`` to normalised soft maps ``(N, H, W)``: positive, smoothed, normalised.
        ``classes`` (``(N,)`` observation indices) pick the per-observation smoothing (``class_smooth_sigma``);
        ``None`` smooths every map with ``smooth_sigma``."""
        maps = pp.positive_evidence(attributions)
        maps = pp.gaussian_smooth(maps, self.post.smooth_sigmas(classes, maps.shape[0]))
        return pp.normalize_maps(maps, self.post.normalize, self.post.norm_percentile, self.post.norm_clip)

    def binarize(self, soft: torch.Tensor, classes: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Soft maps ``(N, H, W)`` of observations ``classes`` (``(N,)`` indices; they pick the per-observation
        threshold values) to boolean masks: threshold, then removal of small components."""
        value = self.post.threshold_values(classes, soft.shape[0])
        masks = pp.threshold_maps(soft, self.post.threshold, value)
        return pp.remove_small_components(masks, self.post.min_component_size)

    def boost_maps(self, per_classifier: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Combine ``(M, B, K, H, W)`` maps into ``(B, K, H, W)`` with ``(M, B, K)`` probabilities as weights."""
        if self.post.boost == "max":
            return per_classifier.max(0).values
        if self.post.boost == "mean" or per_classifier.shape[0] == 1:
            return per_classifier.mean(0)
        w = probs.unsqueeze(-1).unsqueeze(-1)
        total = w.sum(0)
        weighted = (per_classifier * w).sum(0) / total.clamp_min(1e-8)
        return torch.where(total > 1e-8, weighted, per_classifier.mean(0))

    @staticmethod
    def _pairs(targets: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (image, slot, class) index triples of every explained pair, image-major, each ``(N,)``."""
        rows = [(i, t, c) for i, row in enumerate(targets) for t, c in enumerate(row)]
        idx = torch.tensor(rows, dtype=torch.long).view(-1, 3).to(device)
        return idx[:, 0], idx[:, 1], idx[:, 2]

    def _explain(self, m: int, images: torch.Tensor, targets: list[list[int]]) -> tuple[torch.Tensor, list]:
        """Normalised soft maps ``(B, K, H, W)`` of classifier ``m`` for the targets, plus the deltas.

        IG runs on the whole batch (the engine batches images of different targets), and the post-processing on
        all (image, target) maps at once."""
        b, _, h, w = images.shape
        out = images.new_zeros((b, self.num_classes, h, w))
        if not any(targets):
            return out, [torch.zeros(0)] * b
        if self.ig.explainer == "gradcam":
            cams = gradcam_maps(self.classifiers[m], self.ig.gradcam_layer, images, targets, self.num_classes)
            img, _, cls = self._pairs(targets, out.device)
            out[img, cls] = self.postprocess_soft(cams.to(out.device)[img, cls], cls).to(out.dtype)
            # Grad-CAM has no completeness axiom: its "deltas" are 0 (the records keep their per-target shape)
            return out, [torch.zeros(len(row)) for row in targets]
        soft, deltas = self.ig_soft_maps(m, images, targets)
        if self.ig.explainer == "ig_gradcam":
            img, _, cls = self._pairs(targets, out.device)
            cams = gradcam_maps(self.classifiers[m], self.ig.gradcam_layer, images, targets, self.num_classes)
            cam_soft = self.postprocess_soft(cams.to(out.device)[img, cls], cls)
            soft[img, cls] = self.ig.combine(soft[img, cls], cam_soft, cls).to(soft.dtype)
        return soft, deltas

    def ig_soft_maps(self, m: int, images: torch.Tensor, targets: list[list[int]]) -> tuple[torch.Tensor, list]:
        """Normalised soft maps ``(B, K, H, W)`` of classifier ``m``'s IG for the targets (whatever the explainer: the
        IG baseline of the quality stage), plus IG's convergence deltas per image."""
        b, _, h, w = images.shape
        out = images.new_zeros((b, self.num_classes, h, w))
        if not any(targets):
            return out, [torch.zeros(0)] * b
        with torch.enable_grad():
            res = self.engines[m].attribute(images, targets, return_convergence_delta=True, **self.ig_kwargs)
            if self.ig.tta_flip:
                res_f = self.engines[m].attribute(images.flip(-1), targets, return_convergence_delta=False,
                                                  **self.ig_kwargs)
        attr = res.attributions.detach()
        if self.ig.tta_flip:
            attr = 0.5 * (attr + res_f.attributions.detach().flip(-1))
        img, slot, cls = self._pairs(targets, out.device)
        out[img, cls] = self.postprocess_soft(attr[img, slot], cls).to(out.dtype)
        deltas = [torch.zeros(0) if d is None else d.detach().cpu() for _, _, d in res.per_image()]
        return out, deltas

    # -- all together --------------------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 probs: torch.Tensor | None = None) -> DoLLOutput:
        """DoLL of a batch ``(B, 1, H, W)``; ``labels`` ``(B, K)`` with NaN for unknown; ``probs`` ``(M, B, K)``
        when the classifiers' outputs are already known (else computed).

        Every image is processed as it would be alone (targets, maps, thresholds are per image and per map): a
        batch gives the per-image results up to float rounding of the batched convolutions."""
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
        keep = torch.zeros_like(soft)
        if any(targets):
            img, _, cls = self._pairs(targets, soft.device)
            masks[img, cls] = self.binarize(soft[img, cls], cls).to(torch.uint8)
            keep[img, cls] = 1.0
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
    from ..networks.transfer import read_state_dict

    nets = []
    for name in names:
        folder = os.path.join(ckpt_root, name)
        spec = load_json(os.path.join(folder, "classifier.json"))
        weights = os.path.join(folder, "model.pt")
        if not os.path.exists(weights):
            raise BundleInputError(weights, f"classifier {name!r} has no trained weights (run the classifier stage)")
        net = build_classifier(spec["arch"], in_channels=spec.get("in_channels", 1),
                               num_classes=spec.get("num_classes", NUM_OBSERVATIONS), **spec.get("kwargs", {}))
        net.load_state_dict(read_state_dict(weights)[0])
        nets.append(net.to(device).eval())
    return nets


class ClassifierEnsemble(nn.Module):
    """Stack the sigmoid probabilities of several classifiers: ``(B, M, K)``. The DoLL stage's evaluator network:
    :class:`bundle.doll.inferer.DoLLInferer` runs it once per batch and hands the probabilities to the generator
    (target selection and boosting weights), which then does not compute them again."""

    def __init__(self, classifiers: Sequence[nn.Module]):
        super().__init__()
        self.classifiers = nn.ModuleList(classifiers)
        self.eval()

    def train(self, mode: bool = True) -> "ClassifierEnsemble":
        """Always in eval mode: the ensemble only predicts (MONAI's evaluator restores the previous mode)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sigmoid(net(x).float()) for net in self.classifiers], dim=1)

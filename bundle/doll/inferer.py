"""DoLL of a whole batch inside the evaluator: :class:`DoLLInferer` (a MONAI ``Inferer``) and the post-processing
:class:`DoLLPredd` that only converts its per-image output for :class:`~bundle.doll.handler.DoLLWriter`.

MONAI's evaluators decollate the batch *before* ``postprocessing``, so DoLL computed there (the per-image
:class:`~bundle.doll.generator.IGToDoLLd`) runs IG one image at a time whatever ``batch_size`` says. Here IG runs in
the inferer, on the batch: :class:`~bundle.doll.generator.DoLLGenerator` explains all images of the batch at once
(the IG engine batches images of different targets: one backward pass per target slot) and post-processes all
(image, target) maps at once. The evaluator's network (:class:`~bundle.doll.generator.ClassifierEnsemble`) gives the
probabilities once; the labels reach the inferer through MONAI's ``PrepareBatchExtraInput``::

    evaluator:
      _target_: SupervisedEvaluator
      network: "$bundle.doll.generator.ClassifierEnsemble(@classifiers)"
      inferer: {_target_: bundle.doll.inferer.DoLLInferer, generator: "@doll_generator"}
      prepare_batch: {_target_: monai.engines.utils.PrepareBatchExtraInput, extra_keys: {labels: label}}
      postprocessing: {_target_: bundle.doll.inferer.DoLLPredd, keys: pred}

Every image's DoLL is the one it gets alone (per-image targets, maps and thresholds) up to the float rounding of
batched convolutions: ``tests/test_doll.py`` compares the two paths.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from .generator import DoLLGenerator, DoLLOutput, IGToDoLLd

#: keys of the per-image ``pred`` dict of :class:`DoLLInferer`
PRED_KEYS = ("doll", "soft", "targets", "probs", "delta")


def output_to_pred(out: DoLLOutput, num_classes: int, soft: bool = True) -> dict[str, torch.Tensor]:
    """A :class:`DoLLOutput` of ``B`` images as batch-first tensors (what MONAI decollates into per-image dicts):
    ``doll`` ``(B, K, H, W)`` uint8, ``soft`` ``(B, K, H, W)`` (when ``soft``), ``targets`` ``(B, K)`` bool,
    ``probs`` ``(B, M, K)`` and ``delta`` ``(B, M, K)`` (completeness deltas in the target columns, zero elsewhere).
    """
    b = out.masks.shape[0]
    n_clf = out.probs.shape[0]
    targets = torch.zeros((b, num_classes), dtype=torch.bool)
    delta = torch.zeros((b, n_clf, num_classes), dtype=torch.float32)
    for i, row in enumerate(out.targets):
        if row:
            targets[i, row] = True
            delta[i][:, row] = out.deltas[i].float().cpu()
    dev = out.masks.device
    pred = {"doll": out.masks, "targets": targets.to(dev), "probs": out.probs.transpose(0, 1).float(),
            "delta": delta.to(dev)}
    if soft:
        pred["soft"] = out.soft
    return pred


class DoLLInferer(Inferer):
    """MONAI inferer: the DoLL of a batch ``(B, 1, H, W)``, all images at once.

    ``__call__(inputs, network, labels=None)``: ``network`` (optional) maps the batch to the ``(B, M, K)``
    probabilities of the generator's ``M`` classifiers (:class:`~bundle.doll.generator.ClassifierEnsemble`), used
    for target selection and boosting; ``None`` = the generator computes them. ``labels`` ``(B, K)`` (NaN =
    unknown) choose the targets with ``target_source`` ``labels*`` (an evaluator passes them with
    ``PrepareBatchExtraInput(extra_keys={"labels": "label"})``). Returns :func:`output_to_pred`'s dict.

    Args:
        generator: the :class:`~bundle.doll.generator.DoLLGenerator`.
        soft: also return the soft maps (off saves their transfer and memory when they are not written).
    """

    def __init__(self, generator: DoLLGenerator, soft: bool = True) -> None:
        super().__init__()
        self.generator = generator
        self.soft = soft
        self.last: DoLLOutput | None = None

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor] | None = None, *args: Any,
                 labels: torch.Tensor | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        gen = self.generator
        images = (inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)).float()
        probs = None
        if network is not None:
            with torch.no_grad():
                p = torch.as_tensor(network(images, *args, **kwargs)).float()
            expected = (images.shape[0], len(gen.classifiers), gen.num_classes)
            if tuple(p.shape) != expected:
                raise ValueError(f"DoLLInferer: the network must return the (B, M, K) = {expected} probabilities "
                                 f"of the generator's classifiers (ClassifierEnsemble), got {tuple(p.shape)}")
            probs = p.transpose(0, 1)
        if labels is not None:
            labels = (labels.as_tensor() if isinstance(labels, MetaTensor) else torch.as_tensor(labels)).float()
            labels = labels.view(images.shape[0], -1)
        self.last = gen(images, labels, probs=probs)
        return output_to_pred(self.last, gen.num_classes, soft=self.soft)


class DoLLPredd(MapTransform):
    """Post-processing of one decollated item: the :class:`DoLLInferer` ``pred`` dict to the keys
    :class:`~bundle.doll.handler.DoLLWriter` writes: ``doll`` ``(K, H, W)`` uint8, ``doll_soft`` (optional),
    ``doll_targets`` (list of explained observations), ``doll_probs`` ``(M, K)``, ``doll_delta`` ``(M, T)``. Only
    converts; the ``pred`` dict is dropped.

    Args:
        keys: the key of the inferer's output (``pred``).
        doll_key, soft_key: output keys (``soft_key=None`` drops the soft maps).
        generator: optional per-image fallback: an item whose ``pred`` holds no DoLL (an evaluator run with
            another inferer) gets its DoLL computed here from ``image_key`` / ``label_key``, one image at a time
            (:class:`~bundle.doll.generator.IGToDoLLd`). Overlays also find the stage's generator here
            (``@postprocessing#generator``).
    """

    def __init__(self, keys: KeysCollection = "pred", doll_key: str = "doll", soft_key: str | None = "doll_soft",
                 generator: DoLLGenerator | None = None, image_key: str = "image", label_key: str | None = "label",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.doll_key = doll_key
        self.soft_key = soft_key
        self.generator = generator
        self.fallback = None if generator is None else IGToDoLLd(image_key, label_key=label_key, doll_key=doll_key,
                                                                 soft_key=soft_key, generator=generator)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if not (isinstance(pred, Mapping) and "doll" in pred):
                if self.fallback is None:
                    raise ValueError(f"DoLLPredd: {key!r} holds no DoLL (run the evaluator with DoLLInferer, or give "
                                     "a generator for the per-image fallback)")
                d = self.fallback(d)
                continue
            targets = torch.nonzero(torch.as_tensor(pred["targets"]).cpu()).view(-1).tolist()
            d[self.doll_key] = torch.as_tensor(pred["doll"]).to(torch.uint8)
            if self.soft_key and "soft" in pred:
                d[self.soft_key] = pred["soft"]
            d["doll_targets"] = targets
            d["doll_probs"] = torch.as_tensor(pred["probs"]).cpu()
            d["doll_delta"] = torch.as_tensor(pred["delta"]).cpu()[:, targets]
            d.pop(key)
        return d

"""Diagnosis-oriented localization labels (DoLL): IG of several classifiers distilled and boosted into masks.

- :mod:`bundle.doll.postprocess`: positive evidence, smoothing, normalisation, thresholds, small components.
- :mod:`bundle.doll.generator`: :class:`DoLLGenerator` (settings groups :class:`TargetSettings`, :class:`IGSettings`,
  :class:`PostprocessSettings`), the per-image transforms :class:`IGToDoLL` / :class:`IGToDoLLd`.
- :mod:`bundle.doll.inferer`: :class:`DoLLInferer`, the DoLL of a whole batch inside an evaluator, and
  :class:`DoLLPredd`, its post-processing (conversion only).
- :mod:`bundle.doll.handler`: :class:`DoLLWriter` (ignite handler), resumable and sharded generation.
- :mod:`bundle.doll.quality`: DoLL against the phantom's true lesion masks, beside Grad-CAM and single-classifier IG.
"""


from .._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__)

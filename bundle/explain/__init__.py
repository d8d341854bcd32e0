"""Explanations: multi-target Integrated Gradients (``bundle.explain.ig``), Grad-CAM (``bundle.explain.gradcam``).

Names are imported lazily (``from bundle.explain import integrated_gradients`` loads ``ig`` on first use; any
sub-module, e.g. ``bundle.explain.gradcam``, is imported on first attribute access), so ``import bundle.explain``
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._lazy import submodule_getattr

_EXPORTS = {
    "IGResult": "ig",
    "MultiTargetIntegratedGradients": "ig",
    "QUADRATURE_METHODS": "ig",
    "gaussian_blur": "ig",
    "integrated_gradients": "ig",
    "make_baselines": "ig",
    "normalize_targets": "ig",
    "quadrature": "ig",
}


_submodule = submodule_getattr(__name__)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    return _submodule(name)


__all__ = sorted(_EXPORTS)

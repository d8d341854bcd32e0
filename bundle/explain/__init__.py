"""Explanations of classifiers: multi-target Integrated Gradients (``bundle.explain.ig``).

Names are imported lazily (``from bundle.explain import integrated_gradients`` loads ``ig`` on first use), so
``import bundle.explain`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name == "ig":
        return importlib.import_module(f"{__name__}.ig")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

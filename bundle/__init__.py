"""cxr_doll_segmentation: custom components of the MONAI bundle (imported by the configs as ``bundle``).

Sub-packages by concern: ``data`` (phantom generator, dataset adapters, image IO), ``explain`` (Integrated
Gradients, Grad-CAM), ``doll`` (IG-to-DoLL transform, handler, quality), ``networks`` (classifiers, weight
transfer, adapters), ``metrics``/``stats`` (segmentation metrics, ensembles, paired statistics), ``reporting``.
Sub-packages are imported lazily (``bundle.data`` etc.) so ``import bundle`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .constants import NUM_OBSERVATIONS, OBSERVATIONS, SCR_STRUCTURES
from .utils import BUNDLE_ROOT, BundleInputError

__version__ = "0.1.0"

_SUBMODULES = ("constants", "utils", "data", "explain", "doll", "networks", "metrics", "stats", "reporting",
               "workflows")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BUNDLE_ROOT", "BundleInputError", "NUM_OBSERVATIONS", "OBSERVATIONS", "SCR_STRUCTURES", "__version__"]

"""cxr_doll_segmentation: custom components of the MONAI bundle (imported by the configs as ``bundle``).

One home per concept, in layers; a module imports only from its own layer or lower ones (tests/test_layering.py):

0. ``constants``, ``utils``, ``metadata``, ``tracking``: names, file helpers, the checkpoint reader, MLflow runs.
1. ``data`` (phantom generator, dataset adapters, image IO), ``tasks`` (task and run-name vocabulary),
   ``transforms`` (every MONAI-style transform), ``metrics`` (segmentation/classification metrics, ensembles),
   ``stats`` (paired statistics), ``visualize`` (overlays, figure grids).
2. ``networks`` (segmenters, classifiers, weight transfer, fine-tuning), ``explain`` (Integrated Gradients, Grad-CAM).
3. ``handlers`` (every ignite/MONAI handler; rank decided inside).
4. ``doll`` (IG to DoLL: generator, batched inferer, writer, quality).
5. ``workflows`` (inference writer and helpers).
6. ``reporting`` (analysis and report).

Sub-packages are imported lazily (``bundle.data`` etc.) so ``import bundle`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .constants import NUM_OBSERVATIONS, OBSERVATIONS, SCR_STRUCTURES
from .utils import BUNDLE_ROOT, BundleInputError

__version__ = "0.1.0"

_SUBMODULES = ("constants", "utils", "metadata", "tracking", "data", "tasks", "transforms", "metrics", "stats", "visualize",
               "networks", "explain", "handlers", "doll", "workflows", "reporting")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BUNDLE_ROOT", "BundleInputError", "NUM_OBSERVATIONS", "OBSERVATIONS", "SCR_STRUCTURES", "__version__"]

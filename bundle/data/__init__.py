"""Data: image IO, MONAI transforms, the seeded phantom generator and the dataset adapters.

Sub-modules are imported lazily (``bundle.data.phantom`` works after a bare ``import bundle``) so that importing
this package stays cheap: nothing heavy (torch, pandas) is imported here.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":  # a missing dependency of an existing sub-module: show it
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

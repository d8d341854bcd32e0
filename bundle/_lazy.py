"""Lazy sub-module access for the ``bundle`` packages (``bundle.doll.handler`` works in config expressions without
an explicit import, and ``import bundle.<package>`` stays cheap)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable


def submodule_getattr(package: str) -> Callable[[str], ModuleType]:
    """A module-level ``__getattr__`` for ``package`` that imports ``package.<name>`` on first access."""

    def __getattr__(name: str) -> ModuleType:
        if name.startswith("_"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{package}.{name}":
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
            raise  # a missing dependency of an existing sub-module: show it

    return __getattr__

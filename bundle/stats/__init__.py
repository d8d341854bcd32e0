"""Paired statistics between init strategies (Wilcoxon, bootstrap CI, effect sizes, Holm) and replicability.

Only numpy is imported here; scipy and pandas are imported by the functions that need them.
"""

from __future__ import annotations

from .paired import (
    WilcoxonResult,
    cohens_dz,
    compare_inits,
    holm,
    paired_bootstrap_ci,
    paired_differences,
    rank_biserial,
    replicability,
    replicability_summary,
    wilcoxon_signed_rank,
)

__all__ = [
    "paired_differences", "WilcoxonResult", "wilcoxon_signed_rank", "paired_bootstrap_ci", "rank_biserial",
    "cohens_dz", "holm", "replicability_summary", "replicability", "compare_inits",
]


def __getattr__(name: str):
    """Import submodules lazily on attribute access (``bundle.<package>.<module>`` in config expressions)."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise

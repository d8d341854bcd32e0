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


from .._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__)

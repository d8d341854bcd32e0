"""Data: image IO, MONAI transforms, the seeded phantom generator, the dataset adapters and the user's data file
(``userdata``: ``--data``).

Sub-modules are imported lazily (``bundle.data.phantom`` works after a bare ``import bundle``) so that importing
this package stays cheap: nothing heavy (torch, pandas) is imported here.
"""

from __future__ import annotations

from .._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__)

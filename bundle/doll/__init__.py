"""Diagnosis-oriented localization labels (DoLL): IG of several classifiers distilled and boosted into masks.

- :mod:`bundle.doll.postprocess`: positive evidence, smoothing, normalisation, thresholds, small components.
- :mod:`bundle.doll.generator`: :class:`DoLLGenerator`, the transforms :class:`IGToDoLL` / :class:`IGToDoLLd`.
- :mod:`bundle.doll.handler`: :class:`DoLLWriter` (ignite handler), resumable and sharded generation.
- :mod:`bundle.doll.quality`: DoLL against the phantom's true lesion masks, beside Grad-CAM and single-classifier IG.
"""


def __getattr__(name: str):
    """Import submodules lazily on attribute access (``bundle.<package>.<module>`` in config expressions)."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise

"""Figures and the pipeline report (HTML, Markdown, CSV)."""


def __getattr__(name: str):
    """Import submodules lazily on attribute access (``bundle.<package>.<module>`` in config expressions)."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise

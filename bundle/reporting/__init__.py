"""Figures and the pipeline report (HTML, Markdown, CSV)."""


from .._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__)

"""Workflow helpers used by the stage configs: resumable checkpointing, classification pieces, distributed helpers."""


from .._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__)

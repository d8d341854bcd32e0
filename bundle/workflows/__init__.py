"""Workflow helpers of the inference config: the input list, the mask writer and the end-of-run summary
(:mod:`bundle.workflows.inference`)."""


from .._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__)

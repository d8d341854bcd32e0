"""The MLflow handler of the training and evaluation configs (MONAI's ``MLFlowHandler`` with tags, rank 0 only)."""

from __future__ import annotations

from typing import Any, Mapping

from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from ..tracking import check_tracking_uri, store_lock


class TrackingHandler(MLFlowHandler):
    """MONAI's :class:`~monai.handlers.MLFlowHandler` plus run ``tags`` and an ``enabled`` switch.

    ``enabled=False`` makes a no-op that never opens the tracking store; so does every rank but 0 under
    ``torch.distributed`` (concurrent creation of one SQLite store fails, and one run is logged once). Tags (e.g. ``stage``, ``init``, ``task``, ``size``, ``seed``) are set when the run starts.
    All other arguments are :class:`~monai.handlers.MLFlowHandler`'s.
    """

    def __init__(self, enabled: bool = True, tags: Mapping[str, Any] | None = None, **kwargs: Any):
        from ..utils import global_rank

        self.enabled = enabled and global_rank() == 0
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if enabled:
            check_tracking_uri(kwargs.get("tracking_uri"))
            with store_lock(kwargs.get("tracking_uri")):
                super().__init__(**kwargs)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            super().attach(engine)

    def start(self, engine: Engine) -> None:
        with store_lock(self.client.tracking_uri if self.client is not None else None):
            super().start(engine)
        if self.cur_run is not None:
            for key, value in self.tags.items():
                self.client.set_tag(self.cur_run.info.run_id, key, value)



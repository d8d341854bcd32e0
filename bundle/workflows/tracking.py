"""MLflow tracking for every stage: one store (``tracking_uri`` in ``configs/common.yaml``), consistent names and tags."""

from __future__ import annotations

from typing import Any, Mapping

from ignite.engine import Engine
from monai.handlers import MLFlowHandler


class TrackingHandler(MLFlowHandler):
    """MONAI's :class:`~monai.handlers.MLFlowHandler` plus run ``tags`` and an ``enabled`` switch.

    ``enabled=False`` makes a no-op that never opens the tracking store (ranks > 0 under DDP: concurrent creation of
    one SQLite store fails). Tags (e.g. ``stage``, ``init``, ``task``, ``size``, ``seed``) are set when the run starts.
    All other arguments are :class:`~monai.handlers.MLFlowHandler`'s.
    """

    def __init__(self, enabled: bool = True, tags: Mapping[str, Any] | None = None, **kwargs: Any):
        self.enabled = enabled
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if enabled:
            super().__init__(**kwargs)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            super().attach(engine)

    def start(self, engine: Engine) -> None:
        super().start(engine)
        if self.cur_run is not None:
            for key, value in self.tags.items():
                self.client.set_tag(self.cur_run.info.run_id, key, value)


def read_runs(tracking_uri: str, experiment_name: str) -> list[Any]:
    """All runs of an experiment (newest first), read back with :class:`mlflow.MlflowClient`."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])

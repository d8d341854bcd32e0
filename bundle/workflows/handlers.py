"""Small ignite handlers that make the stage configs plain (no circular config references)."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from ignite.engine import Engine, Events
from monai.handlers import EarlyStopHandler

logger = logging.getLogger(__name__)


class TrainerEarlyStop(EarlyStopHandler):
    """MONAI's :class:`~monai.handlers.EarlyStopHandler` attached to the trainer itself: the trainer it stops is the
    engine it is attached to, so a config needs no reference from the handler back to ``train#trainer``.
    ``score_function`` typically reads the evaluator's key metric, e.g.
    ``$lambda e: @validate#evaluator.state.metrics['val_mean_auroc']``; attach it after the ``ValidationHandler``.
    """

    def attach(self, engine: Engine) -> None:
        if self._handler is None:
            self.set_trainer(engine)
        super().attach(engine)


class ProgressBar:
    """A tqdm progress bar over iterations (ignite's), shown only when ``enabled`` and stderr is a terminal
    (``force=True`` shows it anyway): CI logs stay readable."""

    def __init__(self, enabled: bool = True, force: bool = False, output_transform: Callable | None = None):
        self.enabled = enabled and (force or sys.stderr.isatty())
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar as _Bar

        _Bar(persist=False).attach(engine, output_transform=self.output_transform)


class EpochSummary:
    """Log one line per epoch with the engine's metrics (what a CI log or a non-terminal run shows)."""

    def __init__(self, name: str = "train", total_epochs: int | None = None):
        self.name = name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics: dict[str, Any] = {k: v for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if not k.startswith("auroc_"))
        logger.info(f"[{self.name}] epoch {engine.state.epoch}/{engine.state.max_epochs} {shown}")


class MetricsWriter:
    """Write the engine's scalar metrics (plus ``extra`` fields) to a JSON file atomically when it completes."""

    def __init__(self, path: str, extra: dict[str, Any] | None = None):
        self.path = path
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from ..utils import atomic_write_json

        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        atomic_write_json(self.path, {**self.extra, "metrics": metrics})

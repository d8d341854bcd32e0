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
    ``patience`` < 1 switches the rule off (nothing is attached). The resume handler
    (:class:`~bundle.handlers.checkpoint.ResumableCheckpoint`) finds it on the trainer and saves its counter.

    Args:
        start_score: the rule starts counting only once the score has first reached this value (None: from the
            first event). A run that has not started learning is not on a plateau: a segmenter whose validation Dice
            is still 0 after its first epochs (a slow start that takes off later) would otherwise be stopped by
            ``patience`` flat validations and end at Dice 0. Before the score reaches it nothing is counted, so such
            a run trains on to the cap (and, if it never learns, the report flags the structure). The decision
            depends only on the scores, so a resumed run stops where an uninterrupted one would.
        other arguments: those of :class:`~monai.handlers.EarlyStopHandler`.
    """

    def __init__(self, patience: int, score_function: Callable, trainer: Engine | None = None,
                 min_delta: float = 0.0, cumulative_delta: bool = False, epoch_level: bool = True,
                 start_score: float | None = None) -> None:
        super().__init__(patience=patience, score_function=score_function, trainer=trainer, min_delta=min_delta,
                         cumulative_delta=cumulative_delta, epoch_level=epoch_level)
        self.start_score = None if start_score is None else float(start_score)

    def attach(self, engine: Engine) -> None:
        if int(self.patience) < 1:  # patience 0: the rule is off
            return
        if self._handler is None:
            self.set_trainer(engine)
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        if self.start_score is None or self._handler is None:
            return super().__call__(engine)
        score = float(self.score_function(engine))  # read once: a score function may be stateful
        if self._handler.best_score is None and score < self.start_score:
            return  # not started learning yet: nothing to count
        self._handler.score_function = lambda _engine: score
        try:
            self._handler(engine)
        finally:
            self._handler.score_function = self.score_function


class ProgressBar:
    """A tqdm progress bar over iterations (ignite's), shown only when ``enabled`` and stderr is a terminal
    (``force=True`` shows it anyway): CI logs stay readable. Rank 0 only under ``torch.distributed``."""

    def __init__(self, enabled: bool = True, force: bool = False, output_transform: Callable | None = None):
        from ..utils import as_bool, global_rank

        shown = force or sys.stderr.isatty()
        self.enabled = as_bool(enabled, "ProgressBar: enabled") and shown and global_rank() == 0
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar as _Bar

        _Bar(persist=False).attach(engine, output_transform=self.output_transform)


class EpochSummary:
    """Log one line per epoch with the engine's metrics (what a CI log or a non-terminal run shows)."""

    def __init__(self, name: str = "train"):
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


class ValidationCurveWriter:
    """Write the validation curve of a training run as a tidy CSV: one row per validation with the trainer's epoch,
    the optimizer steps taken (``epoch * steps_per_epoch``) and every scalar metric of the evaluator.

    Attach it to the evaluator (a ``validate#handlers`` entry). The file is rewritten atomically after each
    validation; on a resumed run the rows of the epochs already done are kept (rows of later epochs, from a run
    that was killed after writing them, are replaced). It is what the report's training-efficiency figure reads
    (validation Dice against optimizer steps per init).

    Args:
        path: the CSV file.
        steps_per_epoch: optimizer steps of one trainer epoch (``epoch_length``).
        tags: constant columns added to every row (e.g. task, init, train_size, seed).
    """

    def __init__(self, path: str, steps_per_epoch: int, tags: dict[str, Any] | None = None):
        self.path = path
        self.steps_per_epoch = int(steps_per_epoch)
        self.tags = dict(tags or {})

    def attach(self, engine: Engine) -> None:
        from ..utils import global_rank

        if global_rank() != 0:  # one writer under torch.distributed
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import os

        import pandas as pd

        from ..utils import atomic_write_text

        epoch = int(engine.state.epoch)  # the evaluator runs with the trainer's epoch (MONAI ValidationHandler)
        row = {**self.tags, "epoch": epoch, "steps": epoch * self.steps_per_epoch,
               **{k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}}
        frame = pd.DataFrame([row])
        if os.path.isfile(self.path):
            old = pd.read_csv(self.path, dtype={"train_size": str})
            frame = pd.concat([old[old["epoch"] < epoch], frame], ignore_index=True)
        atomic_write_text(self.path, frame.to_csv(index=False))


class EpochSeed:
    """Re-seed every random source of training at the start of each epoch from ``(seed, epoch)``: the data loader's
    shuffling generator, the random transforms, torch's and NumPy's global generators (dropout, ...).

    An epoch then depends only on the seed, its number and the state saved at the end of the previous epoch, so a
    run killed at any point and resumed from its last checkpoint (:class:`~bundle.handlers.checkpoint.
    ResumableCheckpoint`) ends with the same weights as an uninterrupted run (scripts/fault_check.py measures it).
    Attach it first among the trainer's handlers. Each epoch starts a fresh pass over the data loader (every
    training config of the bundle makes an epoch one whole pass).

    Args:
        seed: the run's seed.
        generator: the ``torch.Generator`` of the training data loader (``shuffle=True``), or ``None``.
        transform: the training pre-processing (a MONAI ``Compose``; its random transforms are re-seeded), or ``None``.

    Under ``torch.distributed`` the seed is offset by ``1000 x rank``, so that the ranks draw different batches.
    """

    def __init__(self, seed: int, generator: Any = None, transform: Any = None):
        from ..utils import global_rank

        self.seed = int(seed) + 1000 * global_rank()
        self.generator = generator
        self.transform = transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + int(epoch) * 7_919) % (2**31 - 1)

    def __call__(self, engine: Engine) -> None:
        import numpy as np
        import torch

        s = self.epoch_seed(engine.state.epoch)
        torch.manual_seed(s)
        np.random.seed(s)
        if self.generator is not None:
            self.generator.manual_seed(s)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=s)
        if self.generator is not None and engine.state.dataloader is not None:
            # a fresh loader iterator now, after the re-seeding: creating one draws from the generator, and ignite
            # would otherwise create it at a moment that differs between a resumed and an uninterrupted run (at the
            # start of `run` after a resume, at the first exhausted `next` within a run)
            engine.set_data(engine.state.dataloader)


class FinetuneHandler:
    """Attach the fine-tuning mode's handler of a :class:`FinetuneInit` (the encoder warm-up in ``warmup`` mode;
    nothing otherwise). A config component (a dict with ``_target_``), so tools that edit handler lists, such as
    MONAI Label's bundle train task, can read it; attach it after the checkpoint handler so a resumed run knows its
    epoch."""

    def __init__(self, finetune: Any):
        self.finetune = finetune

    def attach(self, engine: Engine) -> None:
        if self.finetune.handler is not None:
            self.finetune.handler.attach(engine)


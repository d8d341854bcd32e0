"""Resumable training: one ignite handler that saves the whole training state each epoch and restores it on start.

MONAI's ``CheckpointSaver``/``CheckpointLoader`` pair needs the trainer inside its own handler list (a circular config
reference) and forgets the best metric on restart. :class:`ResumableCheckpoint` gets the trainer from ``attach`` and
keeps, in ``<ckpt_dir>/last.pt``: the network, optimizer, LR scheduler, the trainer's ignite state (epoch, iteration)
and the evaluator's best metric. It also keeps ``<ckpt_dir>/<best_filename>`` (the network of the best validation
epoch). Files are written through a temporary file and an atomic rename: a kill at any moment leaves the previous
checkpoint intact, and re-running the same command resumes after the last completed epoch.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events
from monai.handlers import EarlyStopHandler

from ..utils import atomic_save, global_rank, hold_folder_lock, load_checkpoint, remove_stale_temp_files

logger = logging.getLogger(__name__)


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if isinstance(net, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else net


class ResumableCheckpoint:
    """Save ``last.pt`` every ``save_interval`` epochs and the best network; resume from ``last.pt`` when present.

    Args:
        ckpt_dir: folder of the checkpoints.
        network: the trained network (a DDP wrapper is unwrapped when saving).
        optimizer, lr_scheduler: optional; saved and restored with the network.
        evaluator: optional MONAI evaluator whose ``state.best_metric``/``best_metric_epoch`` decide the best model
            and are restored on resume (attach this handler after the ``ValidationHandler``).
        best_filename: file name of the best network (a plain ``state_dict``), ``None`` to skip.
        save_interval: epochs between two ``last.pt`` writes.
        resume: restore from ``last.pt`` when it exists.
        enabled: ``False``: never write (under ``torch.distributed`` only rank 0 writes anyway; every rank resumes).
        early_stop: the early-stopping handler (MONAI ``EarlyStopHandler``) whose patience counter and best score
            are saved and restored, so that a resumed run stops at the epoch an uninterrupted one would; default:
            the ``EarlyStopHandler`` attached to the same engine, if any.

    The *configured* training length is kept on resume: ignite's ``Engine.load_state_dict`` would restore
    ``max_epochs`` (and ``epoch_length``) from the checkpoint, so a run resumed with a larger ``max_epochs`` would stop
    at the old one and a finished run would start again from epoch 0 (ignite restarts a "done" state). Here a run
    resumed with a larger ``max_epochs`` continues after the last saved epoch, and a finished run does nothing
    (logged; the trainer's ``epoch_length`` is set to 0, which MONAI's ``Workflow.run`` skips). A run ended early
    (``engine.terminate()``, e.g. by a plateau rule) is finished too: the epoch at which it stopped is saved with
    ``last.pt`` (``"stopped"``), and its early-stopping state is restored for the record.
    """

    class _Stopped:
        """The epoch at which the trainer was terminated (``None``: not terminated); saved in ``last.pt``."""

        def __init__(self) -> None:
            self.epoch: int | None = None

        def state_dict(self) -> dict[str, int | None]:
            return {"epoch": self.epoch}

        def load_state_dict(self, state: Mapping[str, int | None]) -> None:
            self.epoch = state.get("epoch")

    def __init__(self, ckpt_dir: str, network: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 lr_scheduler: Any = None, evaluator: Engine | None = None, best_filename: str | None = "model.pt",
                 save_interval: int = 1, resume: bool = True, enabled: bool = True, early_stop: Any = None):
        self.ckpt_dir = ckpt_dir
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.evaluator = evaluator
        self.best_filename = best_filename
        self.save_interval = save_interval
        self.resume = resume
        self.enabled = enabled and global_rank() == 0  # one writer under torch.distributed; every rank resumes
        self.early_stop = early_stop
        self.last_path = os.path.join(ckpt_dir, "last.pt")
        self.stopped = self._Stopped()

    def _objects(self, engine: Engine) -> dict[str, Any]:
        objs: dict[str, Any] = {"network": _unwrap(self.network), "trainer": engine}
        if self.optimizer is not None:
            objs["optimizer"] = self.optimizer
        if self.lr_scheduler is not None:
            objs["lr_scheduler"] = self.lr_scheduler
        objs["stopped"] = self.stopped
        return objs

    def attach(self, engine: Engine) -> None:
        # before the COMPLETED save, so that the saved state knows the run was stopped
        engine.add_event_handler(Events.TERMINATE, self._terminated)
        if self.enabled:  # one writer per checkpoint folder: a second run on it refuses (bundle.utils)
            hold_folder_lock(self.ckpt_dir)
            for name in ("last.pt", self.best_filename):  # temporary files of a killed earlier run
                if name:
                    remove_stale_temp_files(os.path.join(self.ckpt_dir, name))
        if self.resume and os.path.exists(self.last_path):
            self.load(engine)
        if self.enabled:
            # registered when the run starts, i.e. after every other handler: an epoch's checkpoint then holds
            # what all of them did at its end (the early-stopping counter, the scheduler step, the best metric)
            self._registered = False
            engine.add_event_handler(Events.STARTED, self._register_saves)

    def _register_saves(self, engine: Engine) -> None:
        if not self._registered:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
            engine.add_event_handler(Events.COMPLETED, self.save)
            self._registered = True

    def _terminated(self, engine: Engine) -> None:
        self.stopped.epoch = int(engine.state.epoch)
        logger.info(f"training stopped at epoch {engine.state.epoch} (early stopping)")

    def load(self, engine: Engine) -> None:
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        ckpt = load_checkpoint(self.last_path, map_location="cpu")  # weights_only=True: tensors and plain values
        for name, obj in self._objects(engine).items():
            if name in ckpt:
                obj.load_state_dict(ckpt[name])
        if ckpt.get("early_stop") is not None:
            # the plateau handler is attached after this one: restore its state when the run starts
            engine.add_event_handler(Events.STARTED, self._restore_early_stop, ckpt["early_stop"])
        best = ckpt.get("best")
        if best is not None and self.evaluator is not None:
            self.evaluator.state.best_metric = best["best_metric"]
            self.evaluator.state.best_metric_epoch = best["best_metric_epoch"]
        logger.info(f"resumed from {self.last_path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")
        if self.stopped.epoch is not None:
            logger.info(f"training already complete ({self.last_path}: stopped early at epoch {self.stopped.epoch}); "
                        "nothing to do")
            engine.state.epoch_length = 0
            return
        if epoch_length is not None and engine.state.epoch_length != epoch_length:
            # an epoch of another length: continue counting whole epochs from the saved epoch
            engine.state.iteration = engine.state.epoch * int(epoch_length)
            engine.state.epoch_length = epoch_length
        if max_epochs is not None:
            engine.state.max_epochs = max_epochs
            if engine.state.epoch >= max_epochs:
                logger.info(f"training already complete ({self.last_path}: epoch {engine.state.epoch} of "
                            f"max_epochs {max_epochs}); nothing to do (raise max_epochs to train more)")
                engine.state.epoch_length = 0
            else:
                logger.info(f"resuming at epoch {engine.state.epoch} of {max_epochs}")

    def _restore_early_stop(self, engine: Engine, state: Mapping[str, Any]) -> None:
        handler = self._early_stopping(engine)
        if handler is None:
            logger.warning(f"{self.last_path} holds an early-stopping state but no early-stopping handler is attached")
            return
        handler.load_state_dict(state)

    def _early_stopping(self, engine: Engine) -> Any:
        """ignite's ``EarlyStopping`` of ``early_stop``, else of the :class:`monai.handlers.EarlyStopHandler`
        attached to ``engine`` (so a config needs no reference between the two handlers); ``None`` when none is."""
        handler = getattr(self.early_stop, "_handler", None)
        if handler is None:
            for handlers in engine._event_handlers.values():
                for h, *_ in handlers:
                    if isinstance(h, EarlyStopHandler) and h._handler is not None:
                        return h._handler
        return handler

    def save(self, engine: Engine) -> None:
        state = {name: obj.state_dict() for name, obj in self._objects(engine).items()}
        early_stopping = self._early_stopping(engine)
        if early_stopping is not None:
            state["early_stop"] = dict(early_stopping.state_dict())
        if self.evaluator is not None:
            state["best"] = {"best_metric": self.evaluator.state.best_metric,
                             "best_metric_epoch": self.evaluator.state.best_metric_epoch}
            if self.best_filename and self.evaluator.state.best_metric_epoch == engine.state.epoch:
                best_path = os.path.join(self.ckpt_dir, self.best_filename)
                atomic_save(best_path, lambda tmp: torch.save(_unwrap(self.network).state_dict(), tmp))
        atomic_save(self.last_path, lambda tmp: torch.save(state, tmp))



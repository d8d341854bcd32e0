"""The ignite/MONAI handlers of the bundle's workflows, one home (as :mod:`monai.handlers`): training helpers
(:mod:`.training`), the resumable checkpoint (:mod:`.checkpoint`), MLflow tracking (:mod:`.tracking`) and the
segmentation evaluation writer (:mod:`.segmentation`). Handlers that write files or logs decide by rank themselves
(:func:`bundle.utils.global_rank`): under ``torch.distributed`` only rank 0 writes, so no config switches a handler
off by its list position."""

from __future__ import annotations

from .checkpoint import ResumableCheckpoint
from .segmentation import SegmentationCSVWriter
from .tracking import TrackingHandler
from .training import (EpochSeed, EpochSummary, FinetuneHandler, MetricsWriter, ProgressBar,
                       TrainerEarlyStop, ValidationCurveWriter)

__all__ = ["EpochSeed", "EpochSummary", "FinetuneHandler", "MetricsWriter", "ProgressBar",
           "ResumableCheckpoint", "SegmentationCSVWriter", "TrackingHandler",
           "TrainerEarlyStop", "ValidationCurveWriter"]

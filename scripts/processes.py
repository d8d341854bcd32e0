"""Helpers shared by the runners (scripts/run_pipeline.py, scripts/sweep.py) that start bundle commands as
processes: command-line values, whole-line output, and sharing the CPU cores between concurrent processes.

Standard library only, so that importing it costs nothing at a runner's start-up.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def cli_value(value: Any) -> str:
    """``value`` as a ``python -m monai.bundle run --id <value>`` argument: text as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def say(message: str) -> None:
    """One whole line to stdout (one write, so that lines of concurrent runs never interleave)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def thread_env(jobs: int) -> dict[str, str]:
    """Environment of one of ``jobs`` concurrent CPU processes: the cores shared out (``OMP_NUM_THREADS``), so that
    ``jobs`` small workloads run side by side instead of oversubscribing the machine. On 2 cores two 1-thread
    processes train small networks about 1.5x faster in total than one 2-thread process (docs/README.md,
    Performance). ``jobs <= 1`` keeps the caller's thread settings."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if jobs > 1:
        threads = str(max(1, len(os.sched_getaffinity(0)) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env

"""Helpers shared by the runners (scripts/run_pipeline.py, scripts/sweep.py) that start bundle commands as
processes: command-line values, whole-line output, sharing the CPU cores between concurrent processes, and a pool
that runs bundle workflows in fresh processes without paying MONAI's import in each.

Standard library only at import time, so that importing it costs nothing at a runner's start-up.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def cli_value(value: Any) -> str:
    """``value`` as a ``python -m monai.bundle run --id <value>`` argument: text as is, anything else as a Python
    literal of its JSON form (tuples as lists, numpy scalars as numbers), which the command's parser (fire's
    ``DefaultParseValue``) reads back as the same value. JSON's own spelling would not survive it: fire keeps
    ``false``, ``true`` and ``null`` as text, also inside lists and dicts, so ``False`` arrived as ``'false'``, which
    ``bool()`` takes as true.

    A top-level ``None`` is written ``null``, the text a user types: ``monai.bundle run`` drops an override whose
    value is ``None`` (``update_kwargs(ignore_none=True)``), so a literal ``None`` would leave the id at its config
    default. Ids that can be switched off read that text as off (e.g. ``output_bias_prior``,
    :class:`bundle.networks.FinetuneInit`). ``None`` inside a list or dict stays ``None``."""
    if value is None:
        return "null"
    return value if isinstance(value, str) else repr(json.loads(json.dumps(value)))


def say(message: str) -> None:
    """One whole line to stdout (one write, so that lines of concurrent runs never interleave)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def thread_env(jobs: int) -> dict[str, str]:
    """Environment of one of ``jobs`` concurrent CPU processes: the cores shared out (``OMP_NUM_THREADS``), so that
    ``jobs`` small workloads run side by side instead of oversubscribing the machine. On 2 cores two 1-thread
    processes train small networks about 1.5x faster in total than one 2-thread process (docs/README.md,
    Performance). ``jobs <= 1`` keeps the caller's thread settings."""
    return env_with_threads(threads_for(jobs))


def threads_for(jobs: int) -> int | None:
    """CPU threads of each of ``jobs`` concurrent processes (the cores shared out, at least 1); ``None`` for one
    job (the caller's setting stays)."""
    return max(1, len(os.sched_getaffinity(0)) // jobs) if jobs > 1 else None


#: glibc ``malloc`` settings of the worker processes. With glibc's defaults every training step hands its activation
#: buffers back to the kernel and faults them in again (``mmap`` above a sliding threshold, heap trimming): on the
#: 2-core machine a fine-tuning run spent 6.1 s of its 95 s in the kernel, against 1.6 s of 90 s with these settings,
#: bit-identical results (docs/benchmarks.md). Set where the user has not set them; ``CXR_DOLL_MALLOC_TUNE=0``
#: leaves the allocator at glibc's defaults. Other allocators (macOS, jemalloc, tcmalloc) ignore them.
MALLOC_ENV = {
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),  # never give the heap top back to the OS
    "MALLOC_TOP_PAD_": str(1 << 30),  # grow the heap in big steps
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's maximum: blocks below 32 MiB come from the heap
}


def allocator_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with :data:`MALLOC_ENV` added where unset, unless
    ``CXR_DOLL_MALLOC_TUNE`` is ``0``. glibc reads the variables when a process starts, so they act in the children
    started with the returned environment, not in the caller."""
    env = dict(os.environ if env is None else env)
    if env.get("CXR_DOLL_MALLOC_TUNE", "1") != "0":
        for key, value in MALLOC_ENV.items():
            env.setdefault(key, value)
    return env


def env_with_threads(threads: int | None) -> dict[str, str]:
    """This process's environment for a child process, unbuffered, with ``threads`` OpenMP/MKL threads (``None``:
    the current setting) and the allocator settings of :func:`allocator_env`."""
    env = {**allocator_env(), "PYTHONUNBUFFERED": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


#: Modules the bundle-process server imports once (:func:`process_pool`): every workflow then runs in a fresh process
#: forked from it, so none pays the interpreter and import start-up again (about 13 s of CPU per process on this
#: machine class, mostly MONAI's import).
PRELOAD = ("torch", "monai", "monai.bundle", "ignite", "mlflow", "fire.parser", "bundle.tasks", "bundle.networks.finetune", "bundle.handlers",
           "bundle.tracking", "bundle.networks")

#: The bundle's configs folder (the file names of :func:`run_workflows` steps are under it).
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def process_pool(jobs: int) -> Any:
    """A ``concurrent.futures`` pool of ``jobs`` workers in which each task is a fresh process forked from a
    ``forkserver`` that has imported :data:`PRELOAD` (the server computes nothing, so forking it is safe: no thread
    pool exists yet). Where ``forkserver`` does not exist (Windows) each task is a ``spawn``-ed process that pays
    the start-up. The server starts with this process's environment, to which :func:`allocator_env`'s settings are
    added first, so that every pooled workflow runs under them."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    os.environ.update(allocator_env())

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
    else:
        ctx = mp.get_context("spawn")
    return ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx, max_tasks_per_child=1)


def run_workflows(steps: Any) -> None:
    """Run bundle workflows one after the other in this process: ``[{"name", "configs": [file names under
    configs/], "args": {id: value}}]``, each exactly as ``python -m monai.bundle run --config_file [...] --id value``
    (values in the command-line form of :func:`cli_value`, parsed as that command parses them)."""
    import fire.parser  # the parser `python -m monai.bundle` applies to command-line values

    from monai.bundle import run

    for step in steps:
        files = [os.path.join(CONFIGS, c) for c in step["configs"]]
        args = {k: fire.parser.DefaultParseValue(cli_value(v)) for k, v in step["args"].items()}
        say(f"[workflow] {step['name']}: {' '.join(step['configs'])}")
        run(config_file=files, **args)


def run_workflows_in_child(steps: Any, log_path: str | None, threads: int | None = None) -> int:
    """The body of one pooled process (:func:`process_pool`): its output to ``log_path`` (file descriptors 1 and 2,
    so native libraries' output lands there too; ``None`` keeps the parent's), ``threads`` CPU threads (``None``:
    the inherited setting), then :func:`run_workflows`. Returns the exit status, 1 with the traceback in the log
    when a workflow raised, as a ``python -m monai.bundle run`` process would."""
    import traceback

    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    if threads:
        import torch

        os.environ.update(env_with_threads(threads))
        torch.set_num_threads(threads)
    try:
        run_workflows(steps)
        return 0
    except BaseException:  # noqa: BLE001 - reported through the log and the exit status, as a process would
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()

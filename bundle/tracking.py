"""MLflow for every stage: one store (``tracking_uri`` in every config), created once under a lock, and one-shot runs
(:func:`log_run`) for the stages that are not ignite engines. The ignite handler is
:class:`bundle.handlers.tracking.TrackingHandler`."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Sequence


@contextlib.contextmanager
def store_lock(tracking_uri: str | None) -> Iterator[None]:
    """Serialise the creation of a local SQLite tracking store and of its experiments across processes.

    Two processes that open a new ``sqlite:///`` store at once both run MLflow's schema migration and one fails
    (alembic "Online migration expected to match one row"); two that create the same experiment at once hit a
    unique constraint. The pipeline runs classifiers and sweep cells concurrently, so opening the store and
    starting a run hold an exclusive ``flock`` on ``<database>.lock``. Other URIs (servers) need no lock.
    """
    uri = str(tracking_uri or "")
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = uri[len("sqlite:///"):]
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    with open(db + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if not os.path.exists(db):
                _create_store(db)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _create_store(db: str) -> None:
    """Create a new SQLite tracking store atomically: MLflow's schema migration runs on a temporary database that is
    renamed onto ``db`` when complete. A process killed during the migration (seconds on a slow machine) then leaves
    no half-migrated store, which MLflow would refuse ever after ("out-of-date database schema")."""
    import mlflow

    from .utils import atomic_path

    with atomic_path(db) as tmp:
        os.remove(tmp)  # an empty file is not a database: let MLflow create it
        mlflow.MlflowClient(tracking_uri="sqlite:///" + tmp).search_experiments(max_results=1)


def check_tracking_uri(tracking_uri: str | None, timeout: float = 5.0) -> None:
    """Fail at once, with a clear message, when a tracking *server* (``http(s)://host:port``) does not answer.

    Documented choice (docs/reliability.md): a stage refuses to start rather than train for minutes and then fail
    on its first log call, or train without a record. Local stores (``sqlite:///``, ``file:``, paths) need no check.
    """
    from urllib.parse import urlparse

    uri = str(tracking_uri or "")
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    import socket

    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout):
            pass
    except OSError as e:
        raise RuntimeError(f"MLflow tracking server {uri} is unreachable ({e.strerror or e}); start it, or pass "
                           f"--tracking_uri sqlite:///<folder>/mlruns.db to track locally. Stopped before any "
                           f"work (nothing lost).") from None


def read_runs(tracking_uri: str, experiment_name: str) -> list[Any]:
    """All runs of an experiment (newest first), read back with :class:`mlflow.MlflowClient`."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    runs: list[Any] = []
    token = None
    while True:  # page through: one search returns at most max_results runs (a full protocol logs more)
        page = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def log_run(tracking_uri: str, experiment_name: str, run_name: str, params: Mapping[str, Any] | None = None,
            metrics: Mapping[str, float] | None = None, artifacts: Sequence[str] = (),
            tags: Mapping[str, Any] | None = None, step: int = 0) -> str:
    """Log one finished run (params, metrics, artifacts, tags) in one call; returns its run id.

    Used by stages that are not ignite training loops (DoLL generation summary, quality, analysis, report). Local
    SQLite stores keep artifacts in ``mlruns/`` beside the database, like :class:`~monai.handlers.MLFlowHandler`.
    """
    import math

    import mlflow
    from monai.utils import path_to_uri

    check_tracking_uri(tracking_uri)
    with store_lock(tracking_uri):
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            location = None
            if tracking_uri.startswith("sqlite:///"):
                location = path_to_uri(os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]), "mlruns"))
            exp_id = client.create_experiment(experiment_name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags={str(k): str(v) for k, v in (tags or {}).items()})
    rid = run.info.run_id
    for k, v in (params or {}).items():
        client.log_param(rid, k, str(v)[:6000])
    for k, v in (metrics or {}).items():
        if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v)):
            client.log_metric(rid, k, float(v), step=step)
    for path in artifacts:
        if os.path.isdir(path):
            client.log_artifacts(rid, path)
        elif os.path.exists(path):
            client.log_artifact(rid, path)
    client.set_terminated(rid, "FINISHED")
    return rid


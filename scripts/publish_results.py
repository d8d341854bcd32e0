"""Publish a finished run's results into ``docs/results/<name>/`` (files to commit).

After a protocol run and its analysis and report::

    python scripts/sweep.py --settings full
    python -m monai.bundle run --config_file configs/analysis.yaml
    python -m monai.bundle run --config_file configs/report.yaml
    python scripts/publish_results.py --name full_protocol --command "python scripts/sweep.py --settings full" --jobs 2

writes ``docs/results/full_protocol/`` with the report, its tables and figures, the per-image test Dice of every run
and the measured run times read back from MLflow (:mod:`bundle.reporting.publish`). The folder is replaced whole, and
only once it is complete.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(name: str, output_root: str | None = None, results_dir: str | None = None, tracking_uri: str | None = None,
         prefix: str | None = None, command: str = "", notes: str = "", jobs: int | None = None,
         commit: str | None = None) -> str:
    """Publish ``<output_root>`` (default ``eval/``) as ``<results_dir>/<name>`` (default ``docs/results/<name>``).

    Args:
        name: the results' folder name (e.g. ``full_protocol``).
        output_root: the run's output folder (``report/`` and ``segmentation/sweep_test.csv`` inside).
        results_dir: where published results live (default ``docs/results``).
        tracking_uri: the run's MLflow store (default ``sqlite:///<output_root>/mlruns.db``, as the configs').
        prefix: the MLflow experiment prefix (default ``bundle.constants.MLFLOW_EXPERIMENT_PREFIX``).
        command, notes: recorded in the README. jobs: runs that ran at once (for the wall-time estimate).
        commit: the code's commit the runs were made with (default: ``git rev-parse HEAD`` of the checkout that holds
            ``output_root``, else of this one).
    """
    from monai.utils import path_to_sqlite_uri

    from bundle.constants import MLFLOW_EXPERIMENT_PREFIX
    from bundle.reporting.publish import publish_results

    out = Path(output_root) if output_root else ROOT / "eval"
    dest = Path(results_dir or ROOT / "docs" / "results") / name
    uri = tracking_uri or path_to_sqlite_uri(str(out / "mlruns.db"))
    path = publish_results(out, dest, uri, prefix or MLFLOW_EXPERIMENT_PREFIX, command=command, notes=notes,
                           commit=commit, jobs=jobs, bundle_root=ROOT)
    print(f"[publish] {path}")
    return str(path)


if __name__ == "__main__":
    import fire

    fire.Fire(main, serialize=lambda r: None)

"""The MLflow run of one chain: params, per-epoch metrics, dataset lineage, the report.

Functions take an explicit ``run_id`` (no fluent active-run state), so tasks can run
in any thread or process and a retried task logs into the same run.
"""

from __future__ import annotations

import logging
import subprocess
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from onnxflow.arrays import ArrayDataset
from onnxflow.errors import ValidationError
from onnxflow.results import DatasetArtifact, TrialResult, ValidationSummary

log = logging.getLogger(__name__)


def start_run(
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    dataset: DatasetArtifact | ArrayDataset | None = None,
) -> str:
    """Create the run, log params and tags and the dataset (if any) as a training input."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.create_run(ensure_experiment(experiment), run_name=run_name, tags=dict(tags))
    run_id = run.info.run_id
    client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
    if dataset is not None:
        _log_dataset(run_id, dataset)
    client.update_run(run_id, status="RUNNING")
    log.info("MLflow run %s (%s) in experiment %r", run_id, run_name, experiment)
    return run_id


def ensure_experiment(experiment: str) -> str:
    """The experiment's id, created if need be. Called once before tasks fan out to Dask
    workers, it also creates a new store's tables: workers that each found an empty SQLite
    store would race to create them."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return exp.experiment_id if exp else client.create_experiment(experiment)


def _log_dataset(run_id: str, dataset: DatasetArtifact | ArrayDataset) -> None:
    import mlflow

    if getattr(dataset, "stream", None) is not None:  # never read whole: its digest only
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            streamed = MetaDataset(
                resolve_dataset_source(dataset.info.source),
                name=dataset.info.name,
                digest=dataset.info.digest,
            )
        with mlflow.start_run(run_id=run_id):
            mlflow.log_input(streamed, context="training")
        return
    X, y = _all_rows(dataset)
    # The digest of the table as loaded (split order differs), so the tags agree.
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": harmless
        warnings.simplefilter("ignore", UserWarning)
        mlflow_dataset = mlflow.data.from_numpy(
            X,
            targets=y,
            source=dataset.info.source,
            name=dataset.info.name,
            digest=dataset.info.digest,
        )
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(mlflow_dataset, context="training")


def _all_rows(dataset) -> tuple[Any, Any]:
    """Features (an array, or named arrays for a recipe's dataset) and labels of every split."""
    import numpy as np

    with np.load(dataset.path, allow_pickle=False) as npz:
        if "X_train" in npz.files:
            return (
                np.concatenate([npz["X_train"], npz["X_val"], npz["X_test"]]),
                np.concatenate([npz["y_train"], npz["y_val"], npz["y_test"]]),
            )
        splits = ("train", "validation", "test")
        names = dataset.info.input_names
        return (
            {n: np.concatenate([npz[f"{s}.{n}"] for s in splits]) for n in names},
            np.concatenate([npz[f"{s}.label"] for s in splits]),
        )


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow import MlflowClient

    MlflowClient().log_batch(run_id, params=[_param(k, v) for k, v in params.items()])


def log_epoch(run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()]
    )


def log_metrics(run_id: str, metrics: Mapping[str, float]) -> None:
    log_epoch(run_id, 0, metrics)


def log_validation(run_id: str, report_dir: Path, summary: ValidationSummary | None) -> None:
    """Attach the report (json, md, plots) to the run; figures too when it passed."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if report_dir.exists():
        client.log_artifacts(run_id, str(report_dir), artifact_path="validation")
    client.set_tag(run_id, "validation", "passed" if summary and summary.passed else "failed")
    if summary is not None:
        log_metrics(run_id, validation_metrics(summary))


def logged_validation(
    run_id: str, report_dir: Path, validate: Callable[[], ValidationSummary]
) -> ValidationSummary:
    """Run ``validate`` and attach its report to the run whether the model passed or not
    (a failed model's report is what a reviewer reads to see why)."""
    try:
        summary = validate()
    except ValidationError:
        log_validation(run_id, report_dir, None)
        raise
    log_validation(run_id, report_dir, summary)
    return summary


def validation_metrics(summary: ValidationSummary) -> dict[str, float]:
    figures = {
        f"test_{summary.metric_name}_framework": summary.framework_metric,
        f"test_{summary.metric_name}_onnx": summary.onnx_metric,
        "parity_max_abs": summary.parity_max_abs,
        "parity_max_rel": summary.parity_max_rel,
        "model_bytes": float(summary.model_bytes),
    }
    figures.update({f"latency_ms_{k}": v for k, v in summary.latency_ms.items()})
    return figures


def finish_run(run_id: str, failed: bool = False) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def close_abandoned_runs(experiment: str, flow_run_over: Callable[[str], bool]) -> list[str]:
    """Mark FAILED the RUNNING runs of ``experiment`` whose flow run (tag ``flow_run_id``)
    is over: their process died with its worker before it could finish them.

    Returns the ids of the runs it closed. Runs of flow runs still going are left alone.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    closed = []
    for run in client.search_runs(
        [exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000
    ):
        flow_run_id = run.data.tags.get("flow_run_id")
        if flow_run_id and flow_run_over(flow_run_id):
            client.set_tag(
                run.info.run_id,
                "abandoned",
                f"flow run {flow_run_id} ended without finishing this run",
            )
            client.set_terminated(run.info.run_id, status="FAILED")
            log.warning(
                "MLflow run %s of ended flow run %s was still RUNNING: marked FAILED",
                run.info.run_id,
                flow_run_id,
            )
            closed.append(run.info.run_id)
    return closed


def git_commit(cwd: Path | None = None) -> str:
    """The commit of the code that ran, or ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def use_tracking_uri(uri: str) -> None:
    """Point this process's MLflow client at ``uri``: a Dask worker process (maybe on
    another host) does not share the flow's environment, so the flow passes it."""
    import mlflow

    mlflow.set_tracking_uri(uri)


def finish_trial(run_id: str, result: TrialResult) -> None:
    """Close a sweep trial's child run: its state and note as tags, its figures as metrics;
    FINISHED when it completed or was pruned, FAILED when it failed or was lost."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_tag(run_id, "trial_state", result.state)
    if result.note:
        client.set_tag(run_id, "trial_note", result.note[:5000])
    figures = {"trial_seconds": result.seconds, "trial_epochs": float(result.epochs)}
    if result.value is not None:
        figures["trial_value"] = result.value
    log_metrics(run_id, figures)
    failed = result.state in ("failed", "lost")
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact_file(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    from mlflow import MlflowClient

    MlflowClient().log_artifact(run_id, str(path), artifact_path=artifact_path)


def process_tags() -> dict[str, str]:
    """Where this code runs (a Dask worker's host and pid), for a trial's run."""
    import os
    import socket

    return {"worker_host": socket.gethostname(), "worker_pid": str(os.getpid())}

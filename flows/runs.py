"""The MLflow run around a flow's steps, opened and closed the same way by every flow."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prefect.runtime import flow_run

from onnxflow.arrays import ArrayDataset
from onnxflow.results import DatasetArtifact
from onnxflow.tasks.tracking import finish_run_task, start_run_task


@contextmanager
def mlflow_run(
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    dataset: DatasetArtifact | ArrayDataset | None = None,
) -> Iterator[str]:
    """Start an MLflow run tagged with this flow run's id (so a retrain can close it if
    the flow run dies), yield its id; FINISHED when the block ends, FAILED if it raises."""
    run_id = start_run_task(
        experiment, run_name, params, {**tags, "flow_run_id": str(flow_run.id)}, dataset
    )
    try:
        yield run_id
    except BaseException:
        finish_run_task(run_id, failed=True)
        raise
    finish_run_task(run_id)

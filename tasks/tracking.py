"""Prefect tasks of the MLflow run (logic: :mod:`onnxflow.tracking`): open it, close it,
close the ones a killed worker left open. Tracking-server I/O, retried with backoff."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from onnxflow import tracking
from onnxflow.results import DatasetArtifact
from onnxflow.tasks.retry import registry_task


@registry_task
def start_run_task(
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    dataset: DatasetArtifact | None = None,
) -> str:
    return tracking.start_run(experiment, run_name, params, tags, dataset)


@registry_task
def ensure_experiment_task(experiment: str) -> str:
    return tracking.ensure_experiment(experiment)


@registry_task
def finish_run_task(run_id: str, failed: bool = False) -> None:
    tracking.finish_run(run_id, failed)


@registry_task
def close_abandoned_runs_task(experiment: str) -> list[str]:
    return tracking.close_abandoned_runs(experiment, flow_run_over)


def flow_run_over(flow_run_id: str) -> bool:
    """True if this Prefect server knows the flow run and it is in a final state."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except (ObjectNotFound, ValueError):  # another server's run, or not an id
            return False
    return run.state is not None and run.state.is_final()

"""Prefect tasks of the MLflow run (logic: :mod:`onnxflow.tracking`): open it, close it,
close the ones a killed worker left open. Tracking-server I/O, retried with backoff."""

from __future__ import annotations

from onnxflow import tracking
from onnxflow.tasks.retry import registry_task

# The steps themselves are the tasks: their signatures are the ones in onnxflow.tracking.
start_run_task = registry_task(tracking.start_run, name="start_run_task")
ensure_experiment_task = registry_task(tracking.ensure_experiment, name="ensure_experiment_task")
finish_run_task = registry_task(tracking.finish_run, name="finish_run_task")


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

"""Prefect tasks that talk to MLflow: they retry transient I/O failures with backoff."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from onnxflow import tracking
from onnxflow.config import PromoteConfig, RegisterConfig
from onnxflow.promote import PromotionDecision, promote
from onnxflow.registration import register_validated
from onnxflow.results import DatasetArtifact, RegisteredVersion, ValidationSummary
from onnxflow.tasks.retry import REGISTRY_RETRY_DELAYS, transient_only

registry_task = task(
    retries=len(REGISTRY_RETRY_DELAYS),
    retry_delay_seconds=REGISTRY_RETRY_DELAYS,
    retry_condition_fn=transient_only,
    cache_policy=NO_CACHE,
)


@registry_task
def start_run_task(
    experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
    dataset: DatasetArtifact | None = None,
) -> str:
    return tracking.start_run(experiment, run_name, params, tags, dataset)


@registry_task
def finish_run_task(run_id: str, failed: bool = False) -> None:
    tracking.finish_run(run_id, failed)


@registry_task
def register_task(
    model_path: Path, summary: ValidationSummary, lineage: Mapping[str, str],
    dataset: DatasetArtifact, config: RegisterConfig, run_id: str,
) -> RegisteredVersion:
    return register_validated(
        model_path, summary=summary, lineage=lineage, dataset=dataset, config=config, run_id=run_id
    )


@registry_task
def promote_task(model_name: str, candidates: Sequence[str], config: PromoteConfig) -> PromotionDecision:
    return promote(model_name, candidates, config)


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

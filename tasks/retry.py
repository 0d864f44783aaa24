"""Retry policy shared by the tasks that talk to the registry: transient I/O only."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from onnxflow.errors import OnnxflowError

#: Backoff between attempts of a registry task, in seconds.
REGISTRY_RETRY_DELAYS = [2, 5, 10]


def transient_only(task, task_run, state) -> bool:
    """Retry unless the failure is one of ours: those are deterministic, retrying can't help."""
    try:
        state.result()
    except OnnxflowError:
        return False
    except Exception:
        return True
    return False


#: The decorator of every task that talks to the MLflow registry or tracking server.
registry_task = task(
    retries=len(REGISTRY_RETRY_DELAYS),
    retry_delay_seconds=REGISTRY_RETRY_DELAYS,
    retry_condition_fn=transient_only,
    cache_policy=NO_CACHE,
)

"""Retry policy shared by the tasks that talk to the registry: transient I/O only."""

from __future__ import annotations

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

"""The Dask cluster tasks run on (``--dask``, ``--sweep``), through Prefect's DaskTaskRunner.

A local cluster of worker processes on this machine by default, for the length of the flow
run; or an existing scheduler (``--dask-address``, ``ONNXFLOW_DASK_ADDRESS``), so the same
flow runs on a Kubernetes or HPC Dask cluster unchanged. Tasks pass paths and small frozen
results, so a worker on another host needs only the shared folders (artifacts, the Optuna
journal) and the MLflow tracking URI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxflow.config import DaskConfig

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


def task_runner(config: DaskConfig) -> DaskTaskRunner:
    """Prefect's DaskTaskRunner for ``config``: the scheduler at ``address``, or a local
    cluster of ``workers`` processes.

    The local scheduler gives a task no second attempt when its worker dies
    (``allowed_failures=0``): a trial on a killed worker is reported lost at once instead
    of being run again from scratch elsewhere. (A remote scheduler keeps its own setting.)
    """
    from prefect_dask import DaskTaskRunner

    if config.address:
        return DaskTaskRunner(address=config.address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": config.workers,
            "threads_per_worker": config.threads_per_worker,
            "processes": True,
            "dashboard_address": None,
            "scheduler_kwargs": {"allowed_failures": 0},
        }
    )


def describe(config: DaskConfig) -> str:
    if config.address:
        return f"Dask scheduler {config.address}"
    return f"local Dask cluster, {config.workers} worker process(es)"


def is_lost(exc: BaseException) -> bool:
    """True when a task's error says its worker died or its future was cancelled (the task
    never finished), as opposed to the task itself raising."""
    from asyncio import CancelledError as AsyncCancelledError
    from concurrent.futures import CancelledError  # distributed's FutureCancelledError too

    from distributed.comm import CommClosedError
    from distributed.scheduler import KilledWorker

    return isinstance(exc, KilledWorker | CancelledError | AsyncCancelledError | CommClosedError)

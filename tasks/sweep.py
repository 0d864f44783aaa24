"""Prefect tasks of a sweep (logic: :mod:`onnxflow.sweep`): train one trial on a Dask worker
(a built-in framework's or a recipe's), and close a trial's MLflow child run. They pass
paths and small frozen results."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE

from onnxflow import tracking
from onnxflow.config import SweepConfig
from onnxflow.results import TrialResult
from onnxflow.sources import AnySource
from onnxflow.sweep import StudyRef, TrialSpec, run_trial
from onnxflow.tasks.retry import registry_task


@task(name="trial", task_run_name="trial-{spec.number}", cache_policy=NO_CACHE)
def train_trial_task(
    source: AnySource,
    spec: TrialSpec,
    study: StudyRef,
    sweep: SweepConfig,
    out_dir: Path,
    tracking_uri: str,
) -> TrialResult:
    """One trial, trained as the source's chain trains it (a built-in model, or a recipe's
    build_model and fit) with the trial's train settings and parameters."""

    def trainer(config, trial_dir, on_epoch):
        return source.model_copy(update={"train_config": config}).train(trial_dir, on_epoch)

    # the trial in its MLflow child run: epochs logged, the run closed with its outcome
    tracking.use_tracking_uri(tracking_uri)
    tracking.set_tags(spec.run_id, tracking.process_tags())
    on_epoch = partial(tracking.log_epoch, spec.run_id)
    result = run_trial(trainer, source.train_config, spec, study, sweep, out_dir, on_epoch)
    tracking.finish_trial(spec.run_id, result)
    return result


@registry_task
def finish_trial_task(run_id: str, result: TrialResult) -> None:
    tracking.finish_trial(run_id, result)


@registry_task
def crash_task_run_task(task_run_id: UUID, message: str) -> None:
    """Mark Crashed the Prefect task run of a trial whose worker died: nothing else will
    finish it, and the UI would show it running for ever."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_task_run_state(task_run_id, Crashed(message=message), force=True)

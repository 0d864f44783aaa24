"""Prefect tasks of a sweep (logic: :mod:`onnxflow.sweep`): train one trial on a Dask worker,
and close a trial's MLflow child run. They pass paths and small frozen results."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from onnxflow import tracking
from onnxflow.config import Framework, SweepConfig, TrainConfig
from onnxflow.frameworks import get_adapter
from onnxflow.results import DatasetArtifact, TrialResult
from onnxflow.sweep import StudyRef, TrialSpec, run_trial
from onnxflow.tasks.retry import registry_task


@task(name="trial", task_run_name="trial-{spec.number}", cache_policy=NO_CACHE)
def train_trial_task(
    framework: Framework,
    dataset: DatasetArtifact,
    base: TrainConfig,
    spec: TrialSpec,
    study: StudyRef,
    sweep: SweepConfig,
    out_dir: Path,
    tracking_uri: str,
) -> TrialResult:
    tracking.use_tracking_uri(tracking_uri)
    tracking.set_tags(spec.run_id, tracking.process_tags())
    adapter = get_adapter(framework)

    def trainer(config, trial_dir, on_epoch):
        return adapter.train(dataset, config, trial_dir, on_epoch=on_epoch)

    result = run_trial(
        trainer, base, spec, study, sweep, out_dir, partial(tracking.log_epoch, spec.run_id)
    )
    tracking.finish_trial(spec.run_id, result)
    return result


@registry_task
def finish_trial_task(run_id: str, result: TrialResult) -> None:
    tracking.finish_trial(run_id, result)

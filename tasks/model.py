"""Prefect tasks for train, export, simplify and validate.

Each is a thin switchboard over the plain step function. These steps are deterministic
compute on local files: no retries (a failure would fail the same way again).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import task

from onnxflow import tracking
from onnxflow.config import ExportConfig, Framework, SimplifyConfig, TrainConfig, ValidateConfig
from onnxflow.frameworks import get_adapter
from onnxflow.results import (
    DatasetArtifact,
    DatasetInfo,
    ExportedModel,
    SimplifiedModel,
    TrainedModel,
    ValidationSummary,
)
from onnxflow.simplify import simplify_model
from onnxflow.validation import validate_model


@task(name="train", task_run_name="train-{framework}")
def train_task(
    framework: Framework, dataset: DatasetArtifact, config: TrainConfig, out_dir: Path, run_id: str
) -> TrainedModel:
    trained = get_adapter(framework).train(
        dataset, config, out_dir, on_epoch=partial(tracking.log_epoch, run_id)
    )
    tracking.log_metrics(run_id, {"train_seconds": trained.train_seconds})
    return trained


@task(name="export", task_run_name="export-{framework}")
def export_task(
    framework: Framework,
    trained: TrainedModel,
    info: DatasetInfo,
    config: ExportConfig,
    out_dir: Path,
) -> ExportedModel:
    return get_adapter(framework).export(trained, info, config, out_dir)


@task(name="simplify")
def simplify_task(model_path: Path, config: SimplifyConfig, out_dir: Path) -> SimplifiedModel:
    return simplify_model(model_path, config, out_dir)


@task(name="validate")
def validate_task(
    model_path: Path,
    trained: TrainedModel,
    dataset: DatasetArtifact,
    config: ValidateConfig,
    out_dir: Path,
    run_id: str,
) -> ValidationSummary:
    """Validate, and attach the report to the run whether or not the model passed."""
    return tracking.logged_validation(
        run_id, out_dir, lambda: validate_model(model_path, trained, dataset, config, out_dir)
    )

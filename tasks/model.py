"""Prefect tasks of the one chain, for every source of a model (logic:
:mod:`onnxflow.sources`, :mod:`onnxflow.simplify`, :mod:`onnxflow.validation`).

Each is a thin switchboard over the plain step function. These steps are deterministic
compute on local files: no retries (a failure would fail the same way again), and no
caching (a source is paths and configs, not its files' contents).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from onnxflow import tracking
from onnxflow.config import SimplifyConfig, ValidateConfig
from onnxflow.results import SimplifiedModel, TrainedModel, ValidationSummary
from onnxflow.simplify import simplify_model
from onnxflow.sources import AnySource, SourcedModel, validate_sourced


@task(name="train", task_run_name="train-{source.label}", cache_policy=NO_CACHE)
def train_task(source: AnySource, out_dir: Path, run_id: str) -> TrainedModel | None:
    """The source's training, its epochs logged on the run (None: nothing to train)."""
    trained = source.train(out_dir, on_epoch=partial(tracking.log_epoch, run_id))
    if trained is not None:
        tracking.log_metrics(run_id, {"train_seconds": trained.train_seconds})
        if source.kind == "recipe":
            tracking.log_params(run_id, {f"recipe.{k}": v for k, v in trained.params.items()})
    return trained


@task(name="export", task_run_name="export-{source.label}", cache_policy=NO_CACHE)
def export_task(source: AnySource, trained: TrainedModel | None, out_dir: Path) -> SourcedModel:
    return source.export(trained, out_dir)


@task(name="simplify")
def simplify_task(model_path: Path, config: SimplifyConfig, out_dir: Path) -> SimplifiedModel:
    return simplify_model(model_path, config, out_dir)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(
    source: AnySource,
    model: SourcedModel,
    model_path: Path,
    config: ValidateConfig,
    out_dir: Path,
    run_id: str,
) -> ValidationSummary:
    """Validate, and attach the report to the run whether or not the model passed."""
    return tracking.logged_validation(
        run_id, out_dir, lambda: validate_sourced(source, model, model_path, config, out_dir)
    )

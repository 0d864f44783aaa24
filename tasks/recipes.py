"""Prefect tasks of a recipe's chain (logic: :mod:`onnxflow.recipes.steps`).

They pass the recipe's path, the dataset's files and small frozen results, never the
recipe's module or a live model. Deterministic compute: no retries, no caching.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from onnxflow import tracking
from onnxflow.arrays import ArrayDataset, ArrayDatasetInfo
from onnxflow.config import DataConfig, ExportConfig, RegisterConfig, TrainConfig, ValidateConfig
from onnxflow.recipes.steps import (
    export_recipe,
    prepare_recipe_data,
    register_recipe,
    train_recipe,
    validate_recipe,
)
from onnxflow.results import ExportedModel, RegisteredVersion, TrainedModel, ValidationSummary
from onnxflow.tasks.register import registry_task


@task(name="recipe-data", cache_policy=NO_CACHE)
def prepare_recipe_data_task(recipe: str, config: DataConfig, out_dir: Path) -> ArrayDataset:
    return prepare_recipe_data(recipe, config, out_dir)


@task(name="recipe-train", cache_policy=NO_CACHE)
def train_recipe_task(
    recipe: str, dataset: ArrayDataset, config: TrainConfig, out_dir: Path, run_id: str
) -> TrainedModel:
    trained = train_recipe(
        recipe, dataset, config, out_dir, on_epoch=partial(tracking.log_epoch, run_id)
    )
    tracking.log_metrics(run_id, {"train_seconds": trained.train_seconds})
    tracking.log_params(run_id, {f"recipe.{k}": v for k, v in trained.params.items()})
    return trained


@task(name="recipe-export", cache_policy=NO_CACHE)
def export_recipe_task(
    trained: TrainedModel, info: ArrayDatasetInfo, config: ExportConfig, out_dir: Path
) -> ExportedModel:
    return export_recipe(trained, info, config, out_dir)


@task(name="recipe-validate", cache_policy=NO_CACHE)
def validate_recipe_task(
    model_path: Path,
    trained: TrainedModel,
    dataset: ArrayDataset,
    config: ValidateConfig,
    out_dir: Path,
    run_id: str,
) -> ValidationSummary:
    """Validate, and attach the report to the run whether or not the model passed."""
    return tracking.logged_validation(
        run_id,
        out_dir,
        lambda: validate_recipe(model_path, trained, dataset, config, out_dir),
    )


@registry_task
def register_recipe_task(
    model_path: Path,
    summary: ValidationSummary,
    lineage: Mapping[str, str],
    dataset: ArrayDataset,
    config: RegisterConfig,
    run_id: str,
) -> RegisteredVersion:
    return register_recipe(model_path, summary, lineage, dataset, config, run_id)

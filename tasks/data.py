"""Prefect tasks of the data step (logic: :mod:`onnxflow.data`, a recipe's ``load_data``:
:mod:`onnxflow.recipes.steps`)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from onnxflow.arrays import ArrayDataset
from onnxflow.config import DataConfig
from onnxflow.data import prepare_data
from onnxflow.recipes.steps import prepare_recipe_data
from onnxflow.results import DatasetArtifact


@task(name="data")
def prepare_data_task(config: DataConfig, out_dir: Path) -> DatasetArtifact:
    return prepare_data(config, out_dir)


@task(name="recipe-data", cache_policy=NO_CACHE)
def prepare_recipe_data_task(recipe: str, config: DataConfig, out_dir: Path) -> ArrayDataset:
    return prepare_recipe_data(recipe, config, out_dir)

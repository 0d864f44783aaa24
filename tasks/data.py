"""Prefect task for the data step (logic: :mod:`onnxflow.data`)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from onnxflow.config import DataConfig
from onnxflow.data import prepare_data
from onnxflow.results import DatasetArtifact


@task(name="data")
def prepare_data_task(config: DataConfig, out_dir: Path) -> DatasetArtifact:
    return prepare_data(config, out_dir)

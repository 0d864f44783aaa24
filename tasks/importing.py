"""Prefect tasks of the import-model flow (logic: :mod:`onnxflow.importing`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from onnxflow import tracking
from onnxflow.config import RegisterConfig, ValidateConfig
from onnxflow.importing import (
    convert_to_onnx,
    detect_format,
    read_arrays,
    register_imported,
    sample_feeds,
    validate_import,
)
from onnxflow.results import ImportedModel, RegisteredVersion, ValidationSummary
from onnxflow.tasks.retry import registry_task


@task(name="convert-to-onnx", cache_policy=NO_CACHE)
def convert_import_task(source: Path, sample: Path, opset: int, out_dir: Path) -> ImportedModel:
    """Detect the format, convert, and check the sample fits: a broken file or a sample
    that does not match fails here, before any MLflow run exists."""
    imported = convert_to_onnx(source, detect_format(source), read_arrays(sample), opset, out_dir)
    sample_feeds(imported.path, sample)
    return imported


@task(name="validate-import", cache_policy=NO_CACHE)
def validate_import_task(
    imported: ImportedModel,
    model_path: Path,
    sample: Path,
    expected: Path | None,
    config: ValidateConfig,
    out_dir: Path,
    run_id: str,
) -> ValidationSummary:
    return tracking.logged_validation(
        run_id,
        out_dir,
        lambda: validate_import(imported, model_path, sample, expected, config, out_dir),
    )


@registry_task
def register_import_task(
    imported: ImportedModel,
    model_path: Path,
    sample: Path,
    summary: ValidationSummary,
    lineage: Mapping[str, str],
    config: RegisterConfig,
    run_id: str,
) -> RegisteredVersion:
    return register_imported(imported, model_path, sample, summary, lineage, config, run_id)

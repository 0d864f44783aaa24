"""Prefect tasks of the optional quantize step (logic: :mod:`onnxflow.quantize`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from onnxflow.config import QuantizeConfig, RegisterConfig
from onnxflow.quantize import quantization_tags, quantize_model
from onnxflow.registration import register_onnx
from onnxflow.results import DatasetArtifact, QuantizedModel, RegisteredVersion
from onnxflow.tasks.retry import registry_task


@task(name="quantize", cache_policy=NO_CACHE)
def quantize_task(
    model_path: Path, dataset: DatasetArtifact, config: QuantizeConfig, out_dir: Path
) -> QuantizedModel:
    return quantize_model(model_path, dataset, config, out_dir)


@registry_task
def register_quantized_task(
    quantized: QuantizedModel,
    lineage: Mapping[str, str],
    example,
    config: RegisterConfig,
    run_id: str,
) -> RegisteredVersion:
    tags = {**lineage, **quantization_tags(quantized)}
    return register_onnx(
        quantized.path,
        model_name=config.model_name,
        input_example=example,
        tags=tags,
        aliases=(),
        run_id=run_id,
    )

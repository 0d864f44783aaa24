"""Prefect tasks of the register and promote steps (logic: :mod:`onnxflow.registration`,
:mod:`onnxflow.promote`); registry I/O, so they retry transient failures with backoff."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from onnxflow.config import PromoteConfig, RegisterConfig
from onnxflow.promote import PromotionDecision, promote
from onnxflow.registration import register_validated
from onnxflow.results import RegisteredVersion, ValidationSummary
from onnxflow.sources import ValidationSample
from onnxflow.tasks.retry import registry_task


@registry_task
def register_task(
    model_path: Path,
    summary: ValidationSummary,
    lineage: Mapping[str, str],
    sample: ValidationSample,
    config: RegisterConfig,
    run_id: str,
) -> RegisteredVersion:
    return register_validated(
        model_path, summary=summary, lineage=lineage, sample=sample, config=config, run_id=run_id
    )


@registry_task
def promote_task(
    model_name: str, candidates: Sequence[str], config: PromoteConfig
) -> PromotionDecision:
    return promote(model_name, candidates, config)

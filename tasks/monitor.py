"""Prefect tasks of the monitor step (logic: :mod:`onnxflow.monitor`, the retrain data
:mod:`onnxflow.evidence`): registry I/O, so they retry transient failures like every
registry task."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from onnxflow.config import DataConfig, PromoteConfig
from onnxflow.evidence import (
    CommonEvaluation,
    RetrainData,
    build_retrain_data,
    evaluate_common,
    gate_retrained,
    pending_retrain,
    served_source,
    tag_common,
    tag_retrained,
)
from onnxflow.monitor import Figures, RetrainPolicy, monitor_model
from onnxflow.tasks.retry import registry_task


@registry_task
def monitor_task(
    model_name: str, capture: str, since: dt.datetime, policy: RetrainPolicy, alias: str
) -> Figures:
    return monitor_model(model_name, capture, since, policy, alias=alias)


@registry_task
def served_source_task(name: str, version: str, data: DataConfig) -> tuple[str, DataConfig]:
    return served_source(name, version, data)


@registry_task
def retrain_data_task(
    data: DataConfig, capture: str, name: str, version: str, since: dt.datetime, out_dir: Path
) -> RetrainData:
    return build_retrain_data(data, capture, name, version, since, out_dir)


@registry_task
def tag_retrained_task(name: str, versions: list[str], data: RetrainData, reason: str) -> None:
    tag_retrained(name, versions, data, reason)


@registry_task
def evaluate_common_task(
    name: str, candidates: list[str], champion: str, data: RetrainData
) -> CommonEvaluation:
    result = evaluate_common(name, [*candidates, champion], data)
    tag_common(name, candidates, champion, result)
    return result


@registry_task
def pending_retrain_task(name: str) -> str | None:
    return pending_retrain(name)


@registry_task
def gate_retrained_task(
    name: str, version: str, config: PromoteConfig, min_shadow_requests: int
) -> str:
    return gate_retrained(name, version, config, min_shadow_requests)

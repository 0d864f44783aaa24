"""Prefect task of the monitor step (logic: :mod:`onnxflow.monitor`): registry I/O, so it
retries transient failures like every registry task."""

from __future__ import annotations

import datetime as dt

from onnxflow.monitor import Figures, RetrainPolicy, monitor_model
from onnxflow.tasks.retry import registry_task


@registry_task
def monitor_task(
    model_name: str, capture: str, since: dt.datetime, policy: RetrainPolicy, alias: str
) -> Figures:
    return monitor_model(model_name, capture, since, policy, alias=alias)

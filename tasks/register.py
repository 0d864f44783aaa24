"""Prefect tasks of the register and promote steps (logic: :mod:`onnxflow.registration`,
:mod:`onnxflow.promote`); registry I/O, so they retry transient failures with backoff."""

from __future__ import annotations

from collections.abc import Sequence

from onnxflow.config import PromoteConfig
from onnxflow.promote import PromotionDecision, promote
from onnxflow.registration import register_validated
from onnxflow.tasks.retry import registry_task

#: The register step itself is the task (its signature lives once, in onnxflow.registration).
register_task = registry_task(register_validated, name="register_task")


@registry_task
def promote_task(
    model_name: str, candidates: Sequence[str], config: PromoteConfig
) -> PromotionDecision:
    return promote(model_name, candidates, config)

"""promote: gate the challenger against the current champion on one metric.

``auto`` moves ``champion`` when the best new version is strictly better (or there is
no champion yet); ``review`` leaves the move to a reviewer in the MLflow UI. Either way
the decision and its reason are written on the version as tags.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from onnxflow.config import PromoteConfig
from onnxflow.errors import PromotionError
from onnxflow.results import StepResult

log = logging.getLogger(__name__)

#: Metrics where a smaller value wins; every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"rmse", "mse", "mae", "loss", "latency_ms"})


class PromotionDecision(StepResult):
    model_name: str
    alias: str
    candidate: str
    """The best version of this run, by the metric (it also gets ``challenger``)."""
    metric: str
    candidate_value: float
    champion_before: str | None
    champion_value: float | None
    champion_after: str | None
    decision: Literal["promoted", "kept_champion", "awaiting_review"]
    reason: str


def is_better(metric: str, new: float, old: float) -> bool:
    return new < old if metric in LOWER_IS_BETTER else new > old


def promote(model_name: str, candidates: Sequence[str], config: PromoteConfig) -> PromotionDecision:
    """Pick the best of ``candidates`` and decide whether it becomes ``config.alias``."""
    from mlflow import MlflowClient

    if not candidates:
        raise PromotionError("Nothing to promote: no version was registered by this run.")
    client = MlflowClient()
    versions = [client.get_model_version(model_name, str(v)) for v in candidates]
    metric = config.metric or versions[0].tags.get("metric_name", "accuracy")
    scored = [(v, _metric_of(v, metric)) for v in versions]
    best, best_value = max(scored, key=lambda p: -p[1] if metric in LOWER_IS_BETTER else p[1])
    client.set_registered_model_alias(model_name, "challenger", best.version)

    champion = _alias_version(client, model_name, config.alias)
    champion_value = None
    if champion is not None and metric in champion.tags:
        champion_value = float(champion.tags[metric])
    return decide_and_apply(
        model_name,
        str(best.version),
        metric,
        best_value,
        str(champion.version) if champion is not None else None,
        champion_value,
        config,
    )


def decide(
    metric: str,
    candidate: str,
    candidate_value: float,
    champion: str | None,
    champion_value: float | None,
    config: PromoteConfig,
) -> tuple[Literal["promoted", "kept_champion", "awaiting_review"], str]:
    """The gate: ``candidate`` against ``champion`` on ``metric`` (both figures measured
    by the caller), and the mode; the decision and its reason."""
    if champion is not None and champion == candidate:
        decision, reason = "kept_champion", f"version {candidate} is already {config.alias}"
    elif champion is None:
        decision, reason = "promoted", f"no {config.alias} yet; {metric}={candidate_value:.4f}"
    elif champion_value is None:
        decision = "promoted"
        reason = f"{config.alias} v{champion} has no {metric!r} tag; {metric}={candidate_value:.4f}"
    elif is_better(metric, candidate_value, champion_value):
        decision = "promoted"
        reason = f"{metric} {candidate_value:.4f} beats v{champion}'s {champion_value:.4f}"
    else:
        decision = "kept_champion"
        reason = f"{metric} {candidate_value:.4f} does not beat v{champion}'s {champion_value:.4f}"
    if decision == "promoted" and config.mode == "review":
        decision = "awaiting_review"
        reason = f"review mode: a reviewer moves {config.alias!r} ({reason})"
    return decision, reason


def decide_and_apply(
    model_name: str,
    candidate: str,
    metric: str,
    candidate_value: float,
    champion: str | None,
    champion_value: float | None,
    config: PromoteConfig,
) -> PromotionDecision:
    """:func:`decide`, then move the alias when promoted (the MLflow server's promotion
    policy may refuse: the decision is then left to a reviewer) and write the decision and
    its reason on the candidate."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    decision, reason = decide(metric, candidate, candidate_value, champion, champion_value, config)
    if decision == "promoted":
        try:
            client.set_registered_model_alias(model_name, config.alias, candidate)
        except MlflowException as exc:
            # The MLflow server's promotion policy (onnxflow.stack.policy) may keep this
            # model's champion for a reviewer: the run then ends like review mode.
            if exc.error_code != "PERMISSION_DENIED":
                raise
            decision = "awaiting_review"
            reason = f"the MLflow server refused auto promotion: {exc.message}"
    client.set_model_version_tag(model_name, candidate, "promotion_decision", decision)
    client.set_model_version_tag(model_name, candidate, "promotion_reason", reason)
    log.info("promote %s v%s: %s (%s)", model_name, candidate, decision, reason)
    after = candidate if decision == "promoted" else champion
    return PromotionDecision(
        model_name=model_name,
        alias=config.alias,
        candidate=candidate,
        metric=metric,
        candidate_value=candidate_value,
        champion_before=champion,
        champion_value=champion_value,
        champion_after=after,
        decision=decision,
        reason=reason,
    )


def _metric_of(version, metric: str) -> float:
    try:
        return float(version.tags[metric])
    except (KeyError, ValueError):
        raise PromotionError(
            f"Version {version.version} of {version.name!r} has no numeric {metric!r} tag; "
            f"its tags are: {', '.join(sorted(version.tags)) or 'none'}"
        ) from None


def _alias_version(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None

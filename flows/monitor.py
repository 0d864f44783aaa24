"""``monitor``: captured traffic and feedback of a window against the serving version.

    monitor (window ─► drift, live accuracy ─► report + tags on the version) ─► decision

Run it on a schedule (a deployment of this flow) or from ``onnxflow monitor``; the figures
land on the serving version's run and tags, the decision in the flow's result.
"""

from __future__ import annotations

import logging

from prefect import flow

from onnxflow.monitor import Figures, RetrainPolicy, parse_since
from onnxflow.tasks.monitor import monitor_task

log = logging.getLogger(__name__)  # onnxflow's loggers reach the flow run's logs


@flow(name="onnxflow-monitor")
def monitor(
    model_name: str,
    capture: str,
    since: str = "1d",
    policy: RetrainPolicy = RetrainPolicy(),
    alias: str = "champion",
) -> Figures:
    """Monitor ``model_name@alias`` on what the endpoints captured under ``capture``."""
    figures = monitor_task(model_name, capture, parse_since(since), policy, alias)
    log.info(
        "%s version %s: drift share %.3f, live accuracy %s; retrain: %s (%s)",
        figures.model,
        figures.version,
        figures.drift_share,
        figures.live_accuracy,
        figures.retrain,
        figures.reason,
    )
    return figures

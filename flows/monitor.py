"""``monitor``: captured traffic and feedback of a window against the serving version; with
``retrain``, a retrain on that evidence when the policy asks for one.

    monitor (window ─► drift, live accuracy ─► report + tags on the version) ─► decision
      ├ a retrained challenger pending: the promotion gate (once it answered enough
      │ requests in shadow: it and the champion on the common evaluation set, the mode)
      └ else, policy crossed: retrain-on-evidence (original data + labelled captured rows
        ─► onnxflow-run in review mode ─► new version as challenger, retrain_* lineage
        tags; it and the champion measured on the common evaluation set, common_eval_*)

Run it on a schedule (a deployment of this flow) or from ``onnxflow monitor``; the figures
land on the serving version's run and tags, the decision in the flow's result.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path

from prefect import flow

from onnxflow.config import PipelineConfig
from onnxflow.evidence import retrain_config
from onnxflow.flows.pipeline import run
from onnxflow.monitor import Figures, RetrainPolicy, parse_since
from onnxflow.tasks.monitor import (
    evaluate_common_task,
    gate_retrained_task,
    monitor_task,
    pending_retrain_task,
    retrain_data_task,
    served_source_task,
    tag_retrained_task,
)

log = logging.getLogger(__name__)  # onnxflow's loggers reach the flow run's logs


@flow(name="onnxflow-monitor")
def monitor(
    model_name: str,
    capture: str,
    since: str = "1d",
    policy: RetrainPolicy = RetrainPolicy(),
    alias: str = "champion",
    retrain: bool = False,
    config: PipelineConfig = PipelineConfig(),
    out_dir: Path = Path("artifacts") / "retrain",
) -> Figures:
    """Monitor ``model_name@alias`` on what the endpoints captured under ``capture``;
    ``retrain``: when the policy is crossed, retrain on the evidence (``config``: the
    pipeline's settings; its data, when it names none, is the served version's own)."""
    start = parse_since(since)
    figures = monitor_task(model_name, capture, start, policy, alias)
    log.info(
        "%s version %s: drift share %.3f, live accuracy %s; retrain: %s (%s)",
        figures.model,
        figures.version,
        figures.drift_share,
        figures.live_accuracy,
        figures.retrain,
        figures.reason,
    )
    if retrain and (pending := pending_retrain_task(model_name)) is not None:
        # one retrain at a time: its challenger runs in shadow until the gate decides
        promotion = gate_retrained_task(
            model_name, pending, config.promote, policy.min_shadow_requests
        )
        log.info("%s: %s", model_name, promotion)
        return dataclasses.replace(figures, promotion=promotion)
    if not (retrain and figures.retrain):
        return figures
    versions = retrain_on_evidence(figures, capture, start, config, out_dir)
    return dataclasses.replace(figures, retrained=versions)


@flow(name="retrain-on-evidence")
def retrain_on_evidence(
    figures: Figures, capture: str, since: dt.datetime, config: PipelineConfig, out_dir: Path
) -> list[str]:
    """Original data + the window's labelled captured rows ─► the pipeline (review mode)."""
    name, version = figures.model, figures.version
    framework, data = served_source_task(name, version, config.data)
    table = retrain_data_task(data, capture, name, version, since, out_dir / "data")
    result = run(
        [framework], retrain_config(config.model_copy(update={"data": data}), table), out_dir
    )
    versions = [v.version for c in result.chains for v in (c.version, c.quantized) if v is not None]
    tag_retrained_task(name, versions, table, figures.reason)
    common = evaluate_common_task(name, versions, version, table)
    log.info(
        "%s on the common evaluation set (%d original test + %d held-out captured rows): %s",
        common.metric,
        common.rows_original,
        common.rows_captured,
        ", ".join(f"v{v} {value:.4f}" for v, value in common.values.items()),
    )
    log.info(
        "%s: retrained on %d original + %d captured rows: version(s) %s as challenger",
        name,
        table.rows_original,
        table.rows_captured,
        ", ".join(versions),
    )
    return versions

"""The Prefect deployments of ``retrain-and-deploy``, kept in code, and how to trigger them.

* ``retrain-and-deploy/scheduled``: on ``schedule_cron`` (default 02:00 daily), both
  frameworks, auto promotion: the nightly retrain that leaves the replicas on the new
  champion.
* ``retrain-and-deploy/on-demand``: no schedule; a data scientist runs it with their
  own parameters from the Prefect UI, ``prefect deployment run`` or ``onnxflow trigger``.
* ``onnxflow-monitor/NAME`` (per model of ``monitor_config``; none with capture off): on
  ``monitor_cron``, the replicas' capture against ``NAME@champion``; past the model's
  policy a retrain on evidence, then the gate of the retrained challenger.

Both run on the stack's process work pool. The entrypoint is the module path
``onnxflow.flows.retrain.retrain_and_deploy`` (the package is installed wherever a worker runs),
so no code storage is needed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from onnxflow.config import PipelineConfig
from onnxflow.errors import StackError
from onnxflow.flows import FLOW_NAME
from onnxflow.stack.settings import ON_DEMAND, SCHEDULED, MonitorSpec, StackSettings

log = logging.getLogger(__name__)

ENTRYPOINT = "onnxflow.flows.retrain.retrain_and_deploy"
#: The monitor flow's name (``onnxflow.flows.monitor.monitor``): deployments MONITOR_FLOW/NAME.
MONITOR_FLOW = "onnxflow-monitor"


def scheduled_config(settings: StackSettings) -> PipelineConfig:
    """The pipeline configuration of scheduled runs: ``schedule_config`` or the defaults."""
    if settings.schedule_config is None:
        return PipelineConfig()
    import yaml

    path = Path(settings.schedule_config)
    if not path.is_file():
        raise StackError(f"schedule_config {path} is not a file")
    return PipelineConfig.model_validate(yaml.safe_load(path.read_text()) or {})


def config_parameter(config: PipelineConfig) -> dict[str, Any]:
    """A config as the JSON a deployment parameter holds (aliases as in the YAML file):
    only the values it sets, so a recipe's DEFAULTS can fill the rest on the worker."""
    return config.model_dump(mode="json", by_alias=True, exclude_unset=True)


def _client_settings(settings: StackSettings) -> dict:
    """Prefect client settings for the stack's server: its URL and its basic-auth login."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

    from onnxflow.stack.manager import prefect_auth_env

    auth = prefect_auth_env(settings).get("PREFECT_API_AUTH_STRING")
    return {
        PREFECT_API_URL: settings.prefect_api_url,
        **({PREFECT_API_AUTH_STRING: auth, PREFECT_API_KEY: None} if auth else {}),
    }


def apply_deployments(settings: StackSettings) -> list[str]:
    """Create (or update) the work pool and both deployments on the stack's Prefect server."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron
    from prefect.settings import temporary_settings

    from onnxflow.flows.retrain import retrain_and_deploy

    common: dict[str, Any] = dict(
        entrypoint_type=EntrypointType.MODULE_PATH,
        work_pool_name=settings.work_pool,
        tags=["onnxflow"],
    )
    endpoints = settings.endpoints_for_runs
    scheduled = retrain_and_deploy.to_deployment(
        SCHEDULED,
        schedules=[Cron(settings.schedule_cron, timezone=settings.schedule_timezone)],
        paused=settings.schedule_paused,
        parameters={"config": config_parameter(scheduled_config(settings)), "endpoints": endpoints},
        description="Nightly retrain: both frameworks, auto promotion; finishes when every "
        "replica serves the new champion.",
        **common,
    )
    on_demand = retrain_and_deploy.to_deployment(
        ON_DEMAND,
        parameters={"endpoints": endpoints},
        description="Retrain with your own parameters (frameworks, data, epochs, promotion "
        "mode). Also: `onnxflow trigger --help`.",
        **common,
    )
    monitors = monitor_deployments(settings, common)
    with temporary_settings(_client_settings(settings)):
        _ensure_work_pool(settings.work_pool)
        _ensure_zombie_automation(settings.zombie_after_s)
        for deployment in (scheduled, on_demand, *monitors):
            deployment.apply(work_pool_name=settings.work_pool)
    return [
        f"{FLOW_NAME}/{SCHEDULED}",
        f"{FLOW_NAME}/{ON_DEMAND}",
        *(f"{MONITOR_FLOW}/{m.name}" for m in monitors),
    ]


def monitor_parameters(settings: StackSettings, name: str, spec: MonitorSpec) -> dict[str, Any]:
    """The monitor flow's parameters for model ``name``: the replicas' capture, the
    window, the policy, and the promotion mode of its gate."""
    return {
        "model_name": name,
        "capture": settings.capture_url,
        "since": spec.since,
        "policy": spec.policy.model_dump(mode="json"),
        "retrain": spec.retrain,
        "config": {"promote": {"mode": spec.promotion}},
        "out_dir": str(settings.state_dir.resolve() / "runs" / "monitor" / name),
    }


def monitor_deployments(settings: StackSettings, common: dict[str, Any]) -> list:
    """``onnxflow-monitor/NAME`` per monitored model, on ``monitor_cron`` (paused with the
    scheduled retrain): drift and live accuracy of the window, retrain on evidence when the
    policy is crossed, the gate of a retrained challenger once it has run in shadow."""
    from prefect.schedules import Cron

    from onnxflow.flows.monitor import monitor

    if not settings.capture:
        return []
    try:
        monitored = settings.monitored()
    except ValueError as exc:  # pydantic's ValidationError is one
        raise StackError(f"monitor_config {settings.monitor_config}: {exc}") from exc
    return [
        monitor.to_deployment(
            name,
            schedules=[Cron(settings.monitor_cron, timezone=settings.schedule_timezone)],
            paused=settings.schedule_paused,
            parameters=monitor_parameters(settings, name, spec),
            description=f"Monitor {name}@champion on the replicas' capture; retrain on "
            "evidence past the policy; promote a retrained challenger per its gate.",
            **common,
        )
        for name, spec in monitored.items()
    ]


def trigger_monitor(
    settings: StackSettings, name: str, parameters: dict[str, Any], timeout_s: float = 600
):
    """Run ``onnxflow-monitor/NAME`` now with ``parameters`` over the deployment's; wait
    until it finishes (the flow run, its state final)."""
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    with temporary_settings(_client_settings(settings)):
        return run_deployment(
            f"{MONITOR_FLOW}/{name}",
            parameters=parameters,
            timeout=timeout_s,
            poll_interval=2,
            as_subflow=False,
        )


def fixed_job_template() -> dict[str, Any]:
    """The process worker's base job template with what a flow run could use to run other
    code taken out: the command is the worker's own (``python -m prefect.engine``), the
    environment is the worker's (no ``env`` to add, e.g., PYTHONPATH), the folder is the
    worker's; job variables outside the template are refused (422) by the server's own
    validation, at flow-run creation and on a deployment update alike."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    fixed = ("command", "env", "working_dir")
    for key in fixed:
        template["variables"]["properties"].pop(key, None)
        template["job_configuration"][key] = {} if key == "env" else None
    template["variables"]["additionalProperties"] = False
    return template


def _ensure_work_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    template = fixed_job_template()
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=template)
            )
            log.info("created process work pool %s", name)
        except ObjectAlreadyExists:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))


ZOMBIE_AUTOMATION = "onnxflow: crash flow runs without heartbeats"


def zombie_automation(after_s: int):
    """Marks a flow run Crashed when, after a heartbeat, neither another heartbeat nor a
    final state arrives within ``after_s``: its worker (and its process) died. Prefect's
    own recipe (docs: "Detect zombie flows"); the server has no such check built in."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {after_s} s: the worker running it died",
            )
        ],
    )


def _ensure_zombie_automation(after_s: int) -> None:
    from prefect.automations import Automation

    try:
        Automation.read(name=ZOMBIE_AUTOMATION).delete()  # settings may have changed
    except ValueError:
        pass
    zombie_automation(after_s).create()


def trigger(
    settings: StackSettings,
    parameters: dict[str, Any],
    wait: bool = False,
    timeout_s: float | None = None,
):
    """Create a run of the on-demand deployment; with ``wait``, block until it finishes.

    Returns the flow run (its ``state`` is final when ``wait`` is set).
    """
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    with temporary_settings(_client_settings(settings)):
        return run_deployment(
            f"{FLOW_NAME}/{ON_DEMAND}",
            parameters=parameters,
            timeout=(timeout_s if wait else 0),
            poll_interval=2,
            as_subflow=False,
        )

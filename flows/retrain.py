"""``retrain-and-deploy``: the flow the stack's deployments run on the Prefect worker.

    onnxflow-run (train ─► ... ─► promote) ─► wait until every replica serves champion

The pipeline itself is :func:`onnxflow.flows.pipeline.run`; this flow adds what a service needs
around it: a run folder per flow run, and (when champion moved) the wait until every
serving replica answers with the new version, so a finished run means a deployed model.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from onnxflow.config import Framework, PipelineConfig, Settings
from onnxflow.flows import FLOW_NAME
from onnxflow.flows.pipeline import RunResult, run
from onnxflow.flows.sweep import sweep as sweep_flow
from onnxflow.recipes import allowed_recipe_dirs, check_recipe, with_recipe_defaults
from onnxflow.registration import hold_run_tickets
from onnxflow.tasks.endpoints import wait_for_endpoints_task
from onnxflow.tasks.tracking import close_abandoned_runs_task


@flow(name=FLOW_NAME)
def retrain_and_deploy(
    frameworks: Sequence[Framework] = ("torch", "keras"),
    config: PipelineConfig = PipelineConfig(),
    endpoints: Sequence[str] = (),
    endpoint_timeout_s: float = 120.0,
    recipe: str | None = None,
    sweep: bool = False,
    run_tickets: Sequence[str] = (),
) -> RunResult:
    """Train, validate, register and promote; then wait for the replicas at ``endpoints``
    to serve the new champion (review mode: nothing to wait for, a reviewer decides).

    ``recipe``: the path (readable by the worker) or module name of the user's model code;
    it replaces ``frameworks``, and its DEFAULTS fill what ``config`` does not set.

    ``sweep``: a sweep of ``config.sweep.trials`` trials of ``frameworks[0]`` on Dask (the
    config's cluster, else the worker's ``ONNXFLOW_DASK_ADDRESS``, else a local one)."""
    # Who asked (``onnxflow trigger``): each new version presents one ticket, and the
    # MLflow server stamps it ``requested_by`` that person.
    hold_run_tickets(run_tickets)
    if recipe:
        config = config.model_copy(update={"recipe": recipe})
    if config.recipe:  # only code the deployment allows; checked before it is imported
        config = config.model_copy(
            update={"recipe": check_recipe(config.recipe, allowed_recipe_dirs())}
        )
    logger = get_run_logger()
    config = with_recipe_defaults(config)
    settings = Settings()
    if config.dask.address is None and settings.dask_address:
        config = config.model_copy(
            update={"dask": config.dask.model_copy(update={"address": settings.dask_address})}
        )
    out_dir = settings.artifacts_dir / (flow_run.name or str(flow_run.id))
    # Runs a killed worker left RUNNING (their flow run since marked Crashed) are closed.
    # Housekeeping: its failure is logged, and never stops the retrain.
    swept = close_abandoned_runs_task(config.experiment, return_state=True)
    if not swept.is_completed():
        logger.warning("abandoned MLflow runs not checked: %s", swept.message)
    elif closed := swept.result():
        logger.warning("closed %d abandoned MLflow run(s): %s", len(closed), ", ".join(closed))
    if sweep:
        result = sweep_flow(frameworks[0], config, out_dir)
    else:
        result = run(frameworks, config, out_dir)
    decision = result.promotion
    if decision is None or decision.decision != "promoted":
        logger.info(
            "champion unchanged (%s); replicas keep their version",
            decision.decision if decision else "nothing registered",
        )
    elif endpoints:
        took = wait_for_endpoints_task(
            list(endpoints), decision.model_name, decision.champion_after, endpoint_timeout_s
        )
        logger.info(
            "version %s served by %s",
            decision.champion_after,
            ", ".join(f"{url} after {s:.1f} s" for url, s in took.items()),
        )
    return result

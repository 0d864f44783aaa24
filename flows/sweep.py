"""Sweeps as Prefect flows: Optuna's trials as tasks on a Dask cluster, the best one through
the normal chain.

    data ─► [ask ─► trial on a Dask worker ─► tell] x N ─► best trial ─► export ─►
            (simplify ─► validate ─► register) ─► promote

``sweep`` is what ``onnxflow run --sweep N`` runs: of a built-in framework, or of the recipe
in ``config.recipe`` (its trials train through the recipe's build_model and fit, its best
trial goes through the recipe's chain). Each trial is an MLflow child run of the
sweep's run (per-epoch metrics, its settings as params, how it ended as ``trial_state``);
trials whose worker died are recorded as lost, and the sweep finishes with the others.
The logic (study, search space, the ask/tell loop, pruning, best trial) is
:mod:`onnxflow.sweep`; this module only wires its steps and tasks.
"""

from __future__ import annotations

import json
import os
import queue
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from onnxflow import sweep as sweeps
from onnxflow.arrays import ArrayDataset
from onnxflow.config import Framework, PipelineConfig, pipeline_params
from onnxflow.dask_cluster import describe, task_runner
from onnxflow.errors import OnnxflowError
from onnxflow.flows.pipeline import RunResult, export_and_register, failure_message, run_markdown
from onnxflow.flows.runs import mlflow_run
from onnxflow.results import ChainResult, DatasetArtifact
from onnxflow.sources import training_source
from onnxflow.summary import version_rows
from onnxflow.tasks.data import prepare_data_task, prepare_recipe_data_task
from onnxflow.tasks.register import promote_task
from onnxflow.tasks.sweep import (
    crash_task_run_task,
    finish_trial_task,
    train_trial_task,
)
from onnxflow.tasks.tracking import start_run_task


@flow(name="onnxflow-sweep")
def sweep(
    framework: Framework = "torch",
    config: PipelineConfig = PipelineConfig(),
    out_dir: Path = Path("artifacts"),
) -> RunResult:
    """Sweep ``config.sweep.trials`` trials of ``framework`` (or of ``config.recipe``, when
    set: ``framework`` is then ignored) on the Dask cluster of ``config.dask``, register the
    best trial's validated model and promote it."""
    logger = get_run_logger()
    out_dir = out_dir.resolve()  # workers need not share this process's working directory
    if config.recipe:  # loaded once, here; the trials read its files
        dataset = prepare_recipe_data_task(config.recipe, config.data, out_dir / "data")
        framework = "recipe"
    else:
        dataset = prepare_data_task(config.data, out_dir / "data")
    logger.info("sweep of %d trials on a %s", config.sweep.trials, describe(config.dask))
    on_dask = sweep_and_register.with_options(task_runner=task_runner(config.dask))
    state = on_dask(framework, config, out_dir, dataset, _tracking_uri(), return_state=True)
    model_name = config.register_.model_name
    chains, failures, promotion = [], {}, None
    if state.is_completed():
        chains.append(state.result())
    else:
        failures[f"{framework} sweep"] = failure_message(state)
    versions = [c.version.version for c in chains]
    if chains:
        promotion = promote_task(model_name, versions, config.promote)
    table = version_rows(model_name, versions) if chains else []
    create_markdown_artifact(
        markdown=(sweeps.trials_markdown(chains[0].sweep) if chains else "")
        + run_markdown(table, promotion, failures),
        key=f"{model_name}-sweep-summary".lower().replace("_", "-"),
        description=f"onnxflow sweep on {dataset.info.name}",
    )
    if failures:
        raise OnnxflowError("; ".join(f"{name}: {msg}" for name, msg in failures.items()))
    return RunResult(chains=chains, failures=failures, promotion=promotion, table=table)


@flow(name="sweep-and-register", flow_run_name="sweep-{framework}")
def sweep_and_register(
    framework: Framework | Literal["recipe"],
    config: PipelineConfig,
    out_dir: Path,
    dataset: DatasetArtifact | ArrayDataset,
    tracking_uri: str,
) -> ChainResult:
    """The trials as tasks on this flow's task runner (Dask), then the best trial's model
    through export → simplify → validate → register, in the sweep's own MLflow run
    (``framework`` "recipe": the trials and the chain of ``config.recipe``)."""
    logger = get_run_logger()
    settings = config.sweep
    out = out_dir / f"sweep-{framework}"
    metric = sweeps.objective_metric(settings, dataset.info.task)
    study_ref = sweeps.StudyRef(
        name=f"{config.register_.model_name}-{framework}-{flow_run.id}",
        storage=sweeps.storage_url(settings, out),
        direction=sweeps.direction_of(metric),
        metric=metric,
    )
    study = sweeps.create_study(settings, study_ref)
    tags = {"source_framework": framework, "sweep_study": study_ref.name, "sweep_metric": metric}
    if config.recipe:
        tags["recipe"] = config.recipe
    with mlflow_run(
        config.experiment,
        f"sweep-{framework}-{config.register_.model_name}",
        pipeline_params(config),
        tags,
        dataset,
    ) as run_id:

        def trial_run(number: int, params: dict) -> str:
            return start_run_task(
                config.experiment,
                f"trial-{number}-{framework}",
                {f"train.{k}": json.dumps(v) for k, v in params.items()},
                {
                    "mlflow.parentRunId": run_id,
                    "sweep_study": study_ref.name,
                    "sweep_trial": str(number),
                    "source_framework": framework,
                    "flow_run_id": str(flow_run.id),
                },
            )

        scheduler = sweeps.TrialScheduler(
            study, study_ref, settings, settings.parallel or _worker_threads()
        )
        pending: dict = {}  # future -> TrialSpec
        finished: queue.SimpleQueue = queue.SimpleQueue()  # futures as they finish
        while not scheduler.done:
            while scheduler.can_ask:
                spec = scheduler.ask(trial_run)
                future = train_trial_task.submit(
                    training_source(config, dataset, framework),
                    spec,
                    study_ref,
                    settings,
                    out / f"trial-{spec.number}",
                    tracking_uri,
                )
                pending[future] = spec
                future.wrapped_future.add_done_callback(lambda _, f=future: finished.put(f))
            for future in _drain(finished):
                result, returned = sweeps.future_result(future, pending.pop(future))
                if not returned:  # the worker died or the task raised: close its run here
                    finish_trial_task(result.run_id, result)
                if result.state == "lost":
                    crash_task_run_task(future.task_run_id, f"Dask worker lost: {result.note}")
                    logger.warning("trial %d %s: %s", result.number, result.state, result.note)
                scheduler.tell(result)
                logger.info(
                    "trial %d %s: %s=%s %s",
                    result.number,
                    result.state,
                    metric,
                    result.value,
                    result.params,
                )

        outcome = scheduler.outcome()
        sweeps.log_outcome(run_id, outcome, out)
        logger.info("%s", sweeps.summary_line(outcome.trials))
        best = sweeps.require_best(outcome)
        best_config = config.model_copy(
            update={"train": sweeps.trial_train_config(config.train, best.params)}
        )
        chain = export_and_register(
            training_source(best_config, dataset, framework),
            best.trained,
            best_config,
            out / "best",
            run_id,
        )
    return chain.model_copy(update={"sweep": outcome})


def _drain(finished: queue.SimpleQueue) -> list:
    """The futures that finished: waits for the first, then takes those already there."""
    done = [finished.get()]
    while not finished.empty():
        done.append(finished.get())
    return done


def _worker_threads() -> int:
    """Threads of the Dask cluster this flow runs on (one trial each)."""
    from prefect.context import get_run_context

    runner = get_run_context().task_runner
    info = runner.client.scheduler_info(n_workers=-1)
    return max(1, sum(w.get("nthreads", 1) for w in info["workers"].values()))


def _tracking_uri() -> str:
    """This process's tracking URI with a relative SQLite path made absolute: Dask workers
    get it explicitly and need not share the flow's working directory."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri

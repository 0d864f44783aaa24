"""The pipeline as Prefect flows; read it next to docs/architecture.md.

    data ─► train ─► export ─► simplify ─► validate ─► register ─► [quantize ─► register] ─► promote
            └──────────── chain (any source: table model, recipe, imported file) ─┘
                      └───── export_and_register ─────────────┘  └ quantize_and_register ┘

``chain`` is the one flow every source of a model takes (:mod:`onnxflow.sources`); ``run``
runs the chosen frameworks' chains (or the recipe's) on one dataset and promotes the best
new version. No step logic lives here, only the wiring.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from onnxflow.config import Framework, PipelineConfig, pipeline_params
from onnxflow.dask_cluster import describe, task_runner
from onnxflow.data import load_splits
from onnxflow.errors import OnnxflowError
from onnxflow.flows.runs import mlflow_run
from onnxflow.promote import PromotionDecision
from onnxflow.registration import lineage_tags
from onnxflow.results import (
    ChainResult,
    DatasetArtifact,
    RegisteredVersion,
    StepResult,
    TrainedModel,
)
from onnxflow.sources import AnySource, SourcedModel, TableSource, training_source
from onnxflow.summary import to_markdown, version_rows
from onnxflow.tasks.data import prepare_data_task, prepare_recipe_data_task
from onnxflow.tasks.model import export_task, simplify_task, train_task, validate_task
from onnxflow.tasks.quantize import quantize_task, register_quantized_task
from onnxflow.tasks.register import promote_task, register_task
from onnxflow.tasks.tracking import ensure_experiment_task
from onnxflow.tracking import git_commit


class RunResult(StepResult):
    chains: list[ChainResult]
    failures: dict[str, str]
    promotion: PromotionDecision | None
    table: list[dict[str, str]]


@flow(name="chain", flow_run_name="chain-{source.label}")
def chain(
    source: AnySource,
    config: PipelineConfig = PipelineConfig(),
    out_dir: Path = Path("artifacts"),
) -> ChainResult:
    """train → export → (export_and_register) for any source, in its MLflow run; then the
    optional int8 copy of a table model (``quantize.mode``).

    A source with nothing to train (an imported file) is converted first, so a broken file
    or a sample that does not fit fails before any MLflow run exists."""
    out = out_dir / source.label
    model = None if source.trains else export_task(source, None, out)
    with mlflow_run(
        config.experiment,
        source.run_name(config.register_.model_name),
        source.run_params(config),
        source.run_tags(),
        source.dataset,
    ) as run_id:
        trained = train_task(source, out / "train", run_id) if source.trains else None
        result = export_and_register(source, trained, config, out, run_id, model)
    if config.quantize.mode == "off" or not isinstance(source, TableSource):
        return result
    state = quantize_and_register(
        result, source.dataset, config, out / "quantize", return_state=True
    )
    if state.is_completed():
        return result.model_copy(update={"quantized": state.result()})
    note = failure_message(state)
    get_run_logger().warning("%s: no quantized version: %s", source.label, note)
    return result.model_copy(update={"quantize_note": note})


def export_and_register(
    source: AnySource,
    trained: TrainedModel | None,
    config: PipelineConfig,
    out: Path,
    run_id: str,
    model: SourcedModel | None = None,
) -> ChainResult:
    """export → simplify → validate → register in the run ``run_id``: what every model goes
    through (a chain's, and the best trial of a sweep). ``model``: already exported.

    A model that fails validation stops here, with its report on the run: it is never
    registered."""
    model = model or export_task(source, trained, out)
    simplified = simplify_task(model.exported.path, config.simplify, out / "simplify")
    validation = validate_task(
        source, model, simplified.path, config.validate_, out / "validate", run_id
    )
    lineage = lineage_tags(
        model.framework,
        model.exported,
        simplified,
        model.lineage,
        git_commit=git_commit(),
        flow_run_id=str(flow_run.id),
    )
    version = register_task(
        simplified.path,
        summary=validation,
        lineage=lineage,
        sample=model.sample,
        config=config.register_,
        run_id=run_id,
    )
    return ChainResult(
        framework=model.framework,
        trained=trained,
        exported=model.exported,
        simplified=simplified,
        validation=validation,
        version=version,
    )


@flow(name="quantize-and-register")
def quantize_and_register(
    chain: ChainResult,
    dataset: DatasetArtifact,
    config: PipelineConfig,
    out_dir: Path,
) -> RegisteredVersion:
    """quantize → register, in a run of its own: an int8 copy of a registered version that
    loses at most ``quantize.max_accuracy_drop`` becomes a version tagged ``quantized``."""
    run_name = f"{chain.framework}-{config.register_.model_name}-{config.quantize.mode}-int8"
    with mlflow_run(
        config.experiment,
        run_name,
        pipeline_params(config),
        {"source_framework": chain.framework, "quantized_from": chain.version.version},
        dataset,
    ) as run_id:
        quantized = quantize_task(chain.simplified.path, dataset, config.quantize, out_dir)
        keep = ("source_framework", "exporter", "opset", "dataset_digest", "dataset_name")
        lineage = {
            **{k: v for k, v in chain.version.tags.items() if k in keep},
            "git_commit": git_commit(),
            "flow_run_id": str(flow_run.id),
            "quantized_from": chain.version.version,
        }
        return register_quantized_task(
            quantized, lineage, load_splits(dataset)["X_test"][:1], config.register_, run_id
        )


@flow(name="onnxflow-run")
def run(
    frameworks: Sequence[Framework] = ("torch", "keras"),
    config: PipelineConfig = PipelineConfig(),
    out_dir: Path = Path("artifacts"),
    dask: bool = False,
) -> RunResult:
    """Every framework's chain on one dataset (or the recipe's chain, when
    ``config.recipe`` is set: ``frameworks`` is then ignored, the model says which
    framework it is), then promote the best new version.

    ``dask``: the chains run side by side as tasks on the Dask cluster of ``config.dask``
    (one after the other in this process otherwise)."""
    logger = get_run_logger()
    chains, failures = [], {}
    if dask:  # workers need not share this process's working directory
        out_dir = out_dir.resolve()
    if config.recipe:  # the user's model code instead of the built-in frameworks
        data = prepare_recipe_data_task(config.recipe, config.data, out_dir / "data")
        frameworks = ("torch",)  # the model says which framework it is
    else:
        data = prepare_data_task(config.data, out_dir / "data")
    sources = {s.label: s for s in (training_source(config, data, fw) for fw in frameworks)}
    if dask:
        ensure_experiment_task(config.experiment)  # here, not in every worker at once
        logger.info("chains of %s on a %s", ", ".join(sources), describe(config.dask))
        on_dask = chains_on_dask.with_options(task_runner=task_runner(config.dask))
        states = on_dask(list(sources.values()), config, out_dir)
    else:
        states = {
            name: chain(source, config, out_dir, return_state=True)
            for name, source in sources.items()
        }
    for name, state in states.items():
        if isinstance(state, ChainResult):
            chains.append(state)
        elif isinstance(state, str):
            failures[name] = state
        elif state.is_completed():
            chains.append(state.result())
        else:
            failures[name] = failure_message(state)
        if name in failures:
            logger.error("%s chain failed: %s", name, failures[name])

    model_name = config.register_.model_name
    versions = [v.version for c in chains for v in (c.version, c.quantized) if v is not None]
    promotion = None
    if chains:
        promotion = promote_task(model_name, versions, config.promote)
    table = version_rows(model_name, versions) if chains else []
    create_markdown_artifact(
        markdown=run_markdown(table, promotion, failures),
        key=f"{model_name}-run-summary".lower().replace("_", "-"),
        description=f"onnxflow run on {data.info.name}",
    )
    if failures:
        raise OnnxflowError(
            "Chain(s) failed: " + "; ".join(f"{fw}: {msg}" for fw, msg in failures.items())
        )
    return RunResult(chains=chains, failures=failures, promotion=promotion, table=table)


@task(name="chain", task_run_name="chain-{source.label}", cache_policy=NO_CACHE)
def chain_task(source: AnySource, config: PipelineConfig, out_dir: Path) -> ChainResult:
    """One source's whole chain as one task, so that chains run side by side on Dask
    workers (the chain's own flow and tasks run inside it, in the worker)."""
    # Dask ships this task's function by value (its module attribute is the task, not the
    # function), and with it a by-value copy of the flow whose globals lack the names its
    # annotations use; Prefect then cannot validate the flow's parameters. The flow taken
    # from the module as the worker imports it has them all.
    from onnxflow.flows import pipeline

    return pipeline.chain(source, config, out_dir)


@flow(name="chains-on-dask")
def chains_on_dask(
    sources: list[AnySource], config: PipelineConfig, out_dir: Path
) -> dict[str, ChainResult | str]:
    """Each source's chain as a task on this flow's task runner (Dask); a chain's result,
    or the message of its failure."""
    futures = {s.label: chain_task.submit(s, config, out_dir) for s in sources}
    outcomes: dict[str, ChainResult | str] = {}
    for label, future in futures.items():
        try:
            outcomes[label] = future.result()
        except Exception as exc:  # the chain's error, or its worker died
            outcomes[label] = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
    return outcomes


def failure_message(state) -> str:
    try:
        state.result()
    except Exception as exc:  # the chain's own error, as raised by its failing task
        return str(exc)
    return state.message or "unknown failure"


def run_markdown(table, promotion: PromotionDecision | None, failures: dict[str, str]) -> str:
    parts = [to_markdown(table, title="Versions registered by this run")] if table else []
    if promotion:
        parts.append(
            f"**Promotion** ({promotion.metric}): v{promotion.candidate} "
            f"{promotion.decision.replace('_', ' ')}: {promotion.reason}. "
            f"`{promotion.alias}` is now v{promotion.champion_after or '-'}.\n"
        )
    for framework, message in failures.items():
        parts.append(f"**{framework} failed**:\n\n```\n{message}\n```\n")
    return "\n".join(parts)

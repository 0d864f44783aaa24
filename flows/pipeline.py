"""The pipeline as Prefect flows; read it next to docs/architecture.md.

    data ─► train ─► export ─► simplify ─► validate ─► register ─► [quantize ─► register] ─► promote
            └──── train_and_register ─────────────────────────────────────────────┘
                               └───── validate_and_register ──┘  └ quantize_and_register ┘

``run`` runs the chosen frameworks' chains on one dataset and promotes the best new
version. No step logic lives here, only the wiring.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from onnxflow.arrays import ArrayDataset
from onnxflow.config import Framework, PipelineConfig
from onnxflow.dask_cluster import describe, task_runner
from onnxflow.data import load_splits
from onnxflow.errors import OnnxflowError
from onnxflow.flows.runs import mlflow_run
from onnxflow.promote import PromotionDecision
from onnxflow.recipes.steps import recipe_tags
from onnxflow.registration import lineage_tags
from onnxflow.results import (
    ChainResult,
    DatasetArtifact,
    ExportedModel,
    RegisteredVersion,
    StepResult,
    TrainedModel,
)
from onnxflow.summary import to_markdown, version_rows
from onnxflow.tasks.data import prepare_data_task
from onnxflow.tasks.model import export_task, simplify_task, train_task, validate_task
from onnxflow.tasks.quantize import quantize_task, register_quantized_task
from onnxflow.tasks.recipes import (
    export_recipe_task,
    prepare_recipe_data_task,
    register_recipe_task,
    train_recipe_task,
    validate_recipe_task,
)
from onnxflow.tasks.register import promote_task, register_task
from onnxflow.tasks.tracking import ensure_experiment_task
from onnxflow.tracking import git_commit


class RunResult(StepResult):
    chains: list[ChainResult]
    failures: dict[str, str]
    promotion: PromotionDecision | None
    table: list[dict[str, str]]


@flow(name="train-and-register", flow_run_name="train-and-register-{framework}")
def train_and_register(
    framework: Framework,
    config: PipelineConfig = PipelineConfig(),
    out_dir: Path = Path("artifacts"),
    dataset: DatasetArtifact | None = None,
) -> ChainResult:
    """data → train → export → (validate_and_register), for one framework."""
    dataset = dataset or prepare_data_task(config.data, out_dir / "data")
    out = out_dir / framework
    run_name = f"{framework}-{config.register_.model_name}"
    with mlflow_run(
        config.experiment, run_name, run_params(config), {"source_framework": framework}, dataset
    ) as run_id:
        trained = train_task(framework, dataset, config.train, out / "train", run_id)
        exported = export_task(framework, trained, dataset.info, config.export, out / "export")
        chain = validate_and_register(trained, exported, dataset, config, out, run_id)
    if config.quantize.mode == "off":
        return chain
    state = quantize_and_register(chain, dataset, config, out / "quantize", return_state=True)
    if state.is_completed():
        return chain.model_copy(update={"quantized": state.result()})
    note = failure_message(state)
    get_run_logger().warning("%s: no quantized version: %s", framework, note)
    return chain.model_copy(update={"quantize_note": note})


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
        run_params(config),
        {"source_framework": chain.framework, "quantized_from": chain.version.version},
        dataset,
    ) as run_id:
        quantized = quantize_task(chain.simplified.path, dataset, config.quantize, out_dir)
        lineage = {
            **lineage_tags(
                chain.framework,
                chain.exported,
                chain.simplified,
                dataset.info,
                git_commit=git_commit(),
                flow_run_id=str(flow_run.id),
            ),
            "quantized_from": chain.version.version,
        }
        return register_quantized_task(
            quantized, lineage, load_splits(dataset)["X_test"][:1], config.register_, run_id
        )


@flow(name="validate-and-register")
def validate_and_register(
    trained: TrainedModel,
    exported: ExportedModel,
    dataset: DatasetArtifact,
    config: PipelineConfig,
    out_dir: Path,
    run_id: str,
) -> ChainResult:
    """simplify → validate → register: what every exported ONNX model goes through.

    A model that fails validation stops here, with its report on the run: it is never
    registered.
    """
    simplified = simplify_task(exported.path, config.simplify, out_dir / "simplify")
    validation = validate_task(
        simplified.path, trained, dataset, config.validate_, out_dir / "validate", run_id
    )
    lineage = lineage_tags(
        trained.framework,
        exported,
        simplified,
        dataset.info,
        git_commit=git_commit(),
        flow_run_id=str(flow_run.id),
    )
    version = register_task(simplified.path, validation, lineage, dataset, config.register_, run_id)
    return ChainResult(
        framework=trained.framework,
        trained=trained,
        exported=exported,
        simplified=simplified,
        validation=validation,
        version=version,
    )


@flow(name="recipe-and-register")
def recipe_and_register(
    recipe: str,
    config: PipelineConfig,
    out_dir: Path,
    dataset: ArrayDataset,
) -> ChainResult:
    """train (build_model, fit) → export → simplify → validate → register, for a recipe."""
    out = out_dir / "recipe"
    with mlflow_run(
        config.experiment,
        f"recipe-{config.register_.model_name}",
        run_params(config),
        {"source_framework": "recipe", "recipe": recipe},
        dataset,
    ) as run_id:
        trained = train_recipe_task(recipe, dataset, config.train, out / "train", run_id)
        return register_recipe_model(trained, dataset, config, out, run_id)


def register_recipe_model(
    trained: TrainedModel,
    dataset: ArrayDataset,
    config: PipelineConfig,
    out: Path,
    run_id: str,
) -> ChainResult:
    """export → simplify → validate → register of a trained recipe model, in the run
    ``run_id`` (a recipe's chain, and the best trial of a recipe's sweep)."""
    exported = export_recipe_task(trained, dataset.info, config.export, out / "export")
    simplified = simplify_task(exported.path, config.simplify, out / "simplify")
    validation = validate_recipe_task(
        simplified.path, trained, dataset, config.validate_, out / "validate", run_id
    )
    lineage = {
        **lineage_tags(
            trained.framework,
            exported,
            simplified,
            dataset.info,
            git_commit=git_commit(),
            flow_run_id=str(flow_run.id),
        ),
        **recipe_tags(trained, dataset.info),
    }
    version = register_recipe_task(
        simplified.path, validation, lineage, dataset, config.register_, run_id
    )
    return ChainResult(
        framework=trained.framework,
        trained=trained,
        exported=exported,
        simplified=simplified,
        validation=validation,
        version=version,
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
    if config.recipe:  # the user's model code instead of the built-in frameworks
        dataset = prepare_recipe_data_task(config.recipe, config.data, out_dir / "data")
        states = {
            "recipe": recipe_and_register(
                config.recipe, config, out_dir, dataset, return_state=True
            )
        }
    elif dask:
        out_dir = out_dir.resolve()  # workers need not share this process's working directory
        dataset = prepare_data_task(config.data, out_dir / "data")
        ensure_experiment_task(config.experiment)  # here, not in every worker at once
        logger.info("chains of %s on a %s", ", ".join(frameworks), describe(config.dask))
        on_dask = chains_on_dask.with_options(task_runner=task_runner(config.dask))
        states = on_dask(frameworks, config, out_dir, dataset)
    else:
        dataset = prepare_data_task(config.data, out_dir / "data")
        states = {
            framework: train_and_register(framework, config, out_dir, dataset, return_state=True)
            for framework in frameworks
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
        description=f"onnxflow run on {dataset.info.name}",
    )
    if failures:
        raise OnnxflowError(
            "Chain(s) failed: " + "; ".join(f"{fw}: {msg}" for fw, msg in failures.items())
        )
    return RunResult(chains=chains, failures=failures, promotion=promotion, table=table)


@task(name="chain", task_run_name="chain-{framework}", cache_policy=NO_CACHE)
def chain_task(
    framework: Framework, config: PipelineConfig, out_dir: Path, dataset: DatasetArtifact
) -> ChainResult:
    """One framework's whole chain as one task, so that chains run side by side on Dask
    workers (the chain's own flow and tasks run inside it, in the worker)."""
    # Dask ships this task's function by value (its module attribute is the task, not the
    # function), and with it a by-value copy of the flow whose globals lack the names its
    # annotations use; Prefect then cannot validate the flow's parameters. The flow taken
    # from the module as the worker imports it has them all.
    from onnxflow.flows import pipeline

    return pipeline.train_and_register(framework, config, out_dir, dataset)


@flow(name="chains-on-dask")
def chains_on_dask(
    frameworks: Sequence[Framework],
    config: PipelineConfig,
    out_dir: Path,
    dataset: DatasetArtifact,
) -> dict[str, ChainResult | str]:
    """Each framework's chain as a task on this flow's task runner (Dask); a chain's result,
    or the message of its failure."""
    futures = {fw: chain_task.submit(fw, config, out_dir, dataset) for fw in frameworks}
    outcomes: dict[str, ChainResult | str] = {}
    for framework, future in futures.items():
        try:
            outcomes[framework] = future.result()
        except Exception as exc:  # the chain's error, or its worker died
            outcomes[framework] = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
    return outcomes


def run_params(config: PipelineConfig) -> dict[str, object]:
    params = {}
    for section in (
        "data",
        "train",
        "export",
        "simplify",
        "validate",
        "register",
        "promote",
        "quantize",
    ):
        values = config.model_dump(by_alias=True)[section]
        params.update({f"{section}.{k}": v for k, v in values.items()})
    return params


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

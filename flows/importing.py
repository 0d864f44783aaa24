"""Bring your own model: the same simplify → validate → register chain as trained models.

    convert (detect, to ONNX, check the sample) ─► simplify ─► validate ─► register

A broken file or a sample that does not fit fails before any MLflow run exists; a model
that fails validation has its report on its run and is never registered. The version
gets ``challenger``; moving ``champion`` is left to ``onnxflow promote`` (an imported
model has no labelled test split to be gated on).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from onnxflow.config import PipelineConfig
from onnxflow.flows.runs import mlflow_run
from onnxflow.importing import import_run_params
from onnxflow.registration import lineage_tags
from onnxflow.results import (
    ImportedModel,
    RegisteredVersion,
    SimplifiedModel,
    StepResult,
    ValidationSummary,
)
from onnxflow.tasks.importing import (
    convert_import_task,
    register_import_task,
    validate_import_task,
)
from onnxflow.tasks.model import simplify_task
from onnxflow.tracking import git_commit


class ImportResult(StepResult):
    imported: ImportedModel
    simplified: SimplifiedModel
    validation: ValidationSummary
    version: RegisteredVersion


@flow(name="import-model", flow_run_name="import-model-{model_name}")
def import_model(
    source: Path,
    model_name: str,
    sample: Path,
    expected: Path | None = None,
    config: PipelineConfig = PipelineConfig(),
    out_dir: Path = Path("artifacts"),
) -> ImportResult:
    """convert → simplify → validate → register, for a model trained elsewhere."""
    imported = convert_import_task(source, sample, config.export.opset, out_dir / "export")
    run_name = f"import-{imported.source_format}-{model_name}"
    with mlflow_run(
        config.experiment,
        run_name,
        import_run_params(imported, sample),
        {"source_framework": imported.framework, "source_format": imported.source_format},
    ) as run_id:
        simplified = simplify_task(imported.path, config.simplify, out_dir / "simplify")
        validation = validate_import_task(
            imported,
            simplified.path,
            sample,
            expected,
            config.validate_,
            out_dir / "validate",
            run_id,
        )
        lineage = lineage_tags(
            imported.framework,
            imported,
            simplified,
            None,
            git_commit=git_commit(),
            flow_run_id=str(flow_run.id),
        )
        version = register_import_task(
            imported,
            simplified.path,
            sample,
            validation,
            lineage,
            config.register_.model_copy(update={"model_name": model_name}),
            run_id,
        )
    return ImportResult(
        imported=imported, simplified=simplified, validation=validation, version=version
    )

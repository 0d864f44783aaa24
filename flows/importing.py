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
from onnxflow.results import (
    ImportedModel, RegisteredVersion, SimplifiedModel, StepResult, ValidationSummary,
)
from onnxflow.tracking import git_commit
from onnxflow.tasks.importing import (
    convert_import_task, register_import_task, start_import_run_task, validate_import_task,
)
from onnxflow.tasks.model import simplify_task
from onnxflow.tasks.register import finish_run_task


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
    run_id = start_import_run_task(config.experiment, model_name, imported, sample)
    try:
        simplified = simplify_task(imported.path, config.simplify, out_dir / "simplify")
        validation = validate_import_task(imported, simplified.path, sample, expected,
                                          config.validate_, out_dir / "validate", run_id)
        lineage = import_lineage(imported, simplified)
        version = register_import_task(
            imported, simplified.path, sample, validation, lineage,
            config.register_.model_copy(update={"model_name": model_name}), run_id,
        )
    except BaseException:
        finish_run_task(run_id, failed=True)
        raise
    finish_run_task(run_id)
    return ImportResult(imported=imported, simplified=simplified, validation=validation,
                        version=version)


def import_lineage(imported: ImportedModel, simplified: SimplifiedModel) -> dict[str, str]:
    tags = {
        "source_framework": imported.framework,
        "exporter": imported.exporter,
        "opset": str(imported.opset),
        "dataset_digest": "none (imported model)",
        "git_commit": git_commit(),
        "flow_run_id": str(flow_run.id),
        "simplified": str(simplified.simplified).lower(),
        "nodes_before": str(simplified.nodes_before),
        "nodes_after": str(simplified.nodes_after),
    }
    if simplified.reason:
        tags["simplify_reason"] = simplified.reason[:4000]
    return tags

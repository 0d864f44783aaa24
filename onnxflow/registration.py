"""register: put a validated ONNX model into the MLflow model registry.

One registered model per use case; every version carries lineage and validation tags
and the sha256 of its ONNX files, which the endpoint checks before serving it.
Aliases, never stages: ``challenger`` is the latest validated, ``champion`` is served.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onnxflow.config import RegisterConfig
from onnxflow.errors import RegistryError
from onnxflow.onnxfiles import check_external_data, onnx_digest
from onnxflow.results import (
    ExportedModel,
    ImportedModel,
    RegisteredVersion,
    SimplifiedModel,
    ValidationSummary,
)
from onnxflow.runtime import PROVIDERS, open_session

if TYPE_CHECKING:
    from onnxflow.sources import ValidationSample

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
"""Name of the logged model inside its run (the version's files sit under it)."""


#: Where a version's reference profile lies in its run (:mod:`onnxflow.profile`).
PROFILE_PATH = "profile/reference.json"
#: ... and its reference sample: validation rows and predictions (:mod:`onnxflow.profile`).
REFERENCE_SAMPLE_PATH = "profile/reference_sample.parquet"


def register_onnx(
    model_path: Path,
    *,
    model_name: str,
    input_example: np.ndarray | Mapping[str, np.ndarray],
    tags: Mapping[str, str] | None = None,
    aliases: Sequence[str] = ("challenger",),
    run_id: str | None = None,
    profile: Mapping | None = None,
    reference_sample: Mapping[str, np.ndarray] | None = None,
) -> RegisteredVersion:
    """Log ``model_path`` (with its external data) and register it as a new version.

    The low-level call (benchmarks and tests use it directly); the pipeline's register
    step, for every source, is :func:`register_validated`, which has the validation sample.

    ``profile``: the version's reference profile (:mod:`onnxflow.profile`), logged as
    ``profile/reference.json`` on its run, for the drift monitor; ``reference_sample``:
    its reference rows (column name to a 1-d array), ``profile/reference_sample.parquet``.

    With ``run_id`` the model is logged into that run, and a version already registered
    from that run is reused instead of creating a second one: a retried register step
    is idempotent. Tags (plus ``onnx_sha256``) and aliases are (re)applied either way.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    model_path = Path(model_path)
    check_external_data(model_path)
    version = _version_from_run(client, model_name, run_id) if run_id else None
    if version is None:
        with mlflow.start_run(run_id=run_id) as run:
            run_id = run.info.run_id
            info = _log_onnx(model_path, input_example)
        # The digest is taken from the logged files and given at creation, so no version
        # ever exists without it (a crash in between leaves a logged model, not a version).
        all_tags = {**(tags or {}), "onnx_sha256": _stored_digest(info.model_uri)}
        ticket = _take_run_ticket()
        presented = {**all_tags, RUN_TICKET_TAG: ticket} if ticket else all_tags
        version = _register(client, info.model_uri, model_name, presented)
        log.info("registered %s version %s from run %s", model_name, version.version, run_id)
    else:
        log.info(
            "run %s already registered %s version %s: reusing it",
            run_id,
            model_name,
            version.version,
        )
        stored = _stored_digest(f"models:/{model_name}/{version.version}")
        all_tags = {**(tags or {}), "onnx_sha256": stored}
        for key, value in all_tags.items():
            client.set_model_version_tag(model_name, version.version, key, str(value))
    if profile is not None:
        client.log_dict(run_id, dict(profile), PROFILE_PATH)
    if reference_sample is not None:
        _log_reference_sample(client, run_id, reference_sample)
    for alias in aliases:
        client.set_registered_model_alias(model_name, alias, version.version)
    return RegisteredVersion(
        name=model_name,
        version=str(version.version),
        run_id=run_id,
        model_uri=f"models:/{model_name}/{version.version}",
        tags=all_tags,
    )


def _log_reference_sample(client, run_id: str, sample: Mapping[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: pa.array(np.asarray(values)) for name, values in sample.items()})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(REFERENCE_SAMPLE_PATH).name
        pq.write_table(table, path, compression="zstd")
        client.log_artifact(run_id, str(path), str(Path(REFERENCE_SAMPLE_PATH).parent))


#: The version tag a run ticket is presented as (the MLflow server turns it into
#: ``requested_by``; see :mod:`onnxflow.stack.tickets`).
RUN_TICKET_TAG = "run_ticket"
_RUN_TICKETS: list[str] = []
_TICKETS_LOCK = threading.Lock()


def hold_run_tickets(tickets: Sequence[str]) -> None:
    """The run tickets of this flow run (``onnxflow trigger``'s proof of who asked): each
    new version created from now on presents the next one, until none is left."""
    with _TICKETS_LOCK:
        _RUN_TICKETS[:] = list(tickets)


def _take_run_ticket() -> str | None:
    with _TICKETS_LOCK:
        return _RUN_TICKETS.pop(0) if _RUN_TICKETS else None


def set_alias(model_name: str, alias: str, version: str | int) -> None:
    """Point ``alias`` at ``version``; rollback is the same call with an older version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise RegistryError(
            f"Model {model_name!r} has no version {version}: {exc.message}"
        ) from None
    try:
        client.set_registered_model_alias(model_name, alias, str(version))
    except MlflowException as exc:  # e.g. the server's promotion policy, naming its rule
        raise RegistryError(
            f"cannot point {model_name}@{alias} at version {version}: {exc.message}"
        ) from None


def _log_onnx(model_path: Path, input_example):
    import mlflow
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    session = open_session(model_path)
    feeds = (
        dict(input_example)
        if isinstance(input_example, Mapping)
        else {session.get_inputs()[0].name: input_example}
    )
    outputs = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    example_out = outputs[0] if len(outputs) == 1 else dict(zip(names, outputs))
    example_in = input_example if not isinstance(input_example, Mapping) else feeds
    return mlflow.onnx.log_model(
        onnx.load(str(model_path)),
        name=MODEL_ARTIFACT,
        signature=infer_signature(example_in, example_out),
        input_example=example_in,
        # Passing requirements skips MLflow's inference subprocess (seconds per model).
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
        onnx_execution_providers=list(PROVIDERS),
        # A stable name instead of onnx's random one: same model, same bytes, same digest.
        location="model.onnx.data",
    )


def _register(client, model_uri: str, model_name: str, tags: Mapping[str, str]):
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(
            model_name, description="Registered by onnxflow; champion is served."
        )
    mv = mlflow.register_model(model_uri, model_name, tags={k: str(v) for k, v in tags.items()})
    return client.get_model_version(model_name, mv.version)


def _version_from_run(client, model_name: str, run_id: str):
    """The version a previous attempt registered from ``run_id``, if any."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def _stored_digest(model_uri: str) -> str:
    """Digest of the files as the registry stores them (MLflow re-saves the model)."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        return onnx_digest(local / "model.onnx")


def register_validated(
    model_path: Path,
    *,
    summary: ValidationSummary,
    lineage: Mapping[str, str],
    sample: ValidationSample,
    config: RegisterConfig,
    run_id: str,
) -> RegisteredVersion:
    """The register step of every source's chain: a model that passed validation becomes
    a tagged version with alias ``config.alias``.

    ``lineage`` carries the tags known before validation (framework, exporter, opset,
    dataset digest, git commit, flow run, simplify figures, the source's own); validation
    adds its own. ``sample`` is the validation sample (:func:`onnxflow.sources.read_sample`
    gives its input arrays and labels): its first row is the version's input example (the
    whole sample for a model without a dynamic batch axis). A source that trained the
    model also gives its training inputs (:func:`onnxflow.sources.read_training_inputs`):
    the version's reference profile (:mod:`onnxflow.profile`) is computed from them here,
    with its reference sample (validation rows and predictions, for the monitor's Evidently
    report); an imported model's profile and sample are of the validation sample.
    """
    if not summary.passed:
        raise RegistryError(
            f"Refusing to register {model_path}: validation failed (see {summary.report_dir})."
        )
    from onnxflow.profile import profile_and_sample
    from onnxflow.sources import read_sample, read_training_inputs

    inputs = read_sample(sample).inputs
    # an imported model trained on nothing we have: its profile is of the validation sample
    training = read_training_inputs(sample) or (inputs, inputs)
    profile, reference = profile_and_sample(model_path, *training)

    report = report_tags(summary.report_dir)
    if report.get("batch_axis") != "none":
        inputs = {name: array[:1] for name, array in inputs.items()}
    tags = {**lineage, **validation_tags(summary), **report}
    return register_onnx(
        model_path,
        model_name=config.model_name,
        input_example=inputs,
        tags=tags,
        aliases=(config.alias,),
        run_id=run_id,
        profile=profile,
        reference_sample=reference,
    )


def report_tags(report_dir: Path) -> dict[str, str]:
    """Tags read back from the validation report: whether the batch axis is dynamic, and
    what parity was checked against (or why it was not)."""
    import json

    path = Path(report_dir) / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    tags = {
        "batch_axis": report.get("batch_axis", "unknown"),
        "parity_checked": str(report.get("parity_checked", False)).lower(),
    }
    if report.get("parity_checked"):
        tags["parity_against"] = str(report.get("parity_against", ""))
    else:
        tags["parity_max_abs"] = tags["parity_max_rel"] = "not checked"
        tags["parity_note"] = str(report.get("parity_note", ""))
    return tags


def validation_tags(summary: ValidationSummary) -> dict[str, str]:
    """The version tags a reviewer and the promote step read (listed in the README's
    "The registry")."""
    return {
        "validation": "passed" if summary.passed else "failed",
        "metric_name": summary.metric_name,
        summary.metric_name: f"{summary.onnx_metric:.6g}",
        f"framework_{summary.metric_name}": f"{summary.framework_metric:.6g}",
        "parity_max_abs": f"{summary.parity_max_abs:.3g}",
        "parity_max_rel": f"{summary.parity_max_rel:.3g}",
        "latency_ms_onnx_b1": f"{summary.latency_ms.get('onnx_b1', float('nan')):.4g}",
        "latency_ms_framework_b1": f"{summary.latency_ms.get('framework_b1', float('nan')):.4g}",
        "model_bytes": str(summary.model_bytes),
        "ir_version": str(summary.ir_version),
    }


def lineage_tags(
    framework: str,
    exported: ExportedModel | ImportedModel,
    simplified: SimplifiedModel,
    source_tags: Mapping[str, str],
    *,
    git_commit: str,
    flow_run_id: str,
) -> dict[str, str]:
    """Where a version came from: code, framework, exporter, simplification, and the
    source's own tags (``SourcedModel.lineage``: dataset digest, recipe, imported file)."""
    tags = {
        "source_framework": framework,
        "exporter": exported.exporter,
        "opset": str(exported.opset),
        **source_tags,
        "git_commit": git_commit,
        "flow_run_id": flow_run_id,
        "simplified": str(simplified.simplified).lower(),
        "nodes_before": str(simplified.nodes_before),
        "nodes_after": str(simplified.nodes_after),
    }
    fallback = getattr(exported, "fallback_reason", None)
    if fallback:
        tags["export_fallback_reason"] = fallback[:4000]
    if simplified.reason:
        tags["simplify_reason"] = simplified.reason[:4000]
    return tags

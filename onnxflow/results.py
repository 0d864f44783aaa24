"""What steps hand each other: small frozen records of paths and figures.

Between Prefect tasks we pass these, never live models, so that retries, caching and
a distributed task runner all work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from onnxflow.config import Framework, Task

SourceFormat = Literal["keras", "savedmodel", "torch_export", "torchscript", "onnx"]
"""What ``import-model`` was given (see :mod:`onnxflow.importing`)."""
ArtifactFormat = Literal["torch_export", "torchscript", "savedmodel", "tflite"]
"""What ``convert --to torch`` saved: a ``.pt2`` program or TorchScript."""


EpochCallback = Callable[[int, dict[str, float]], None]
"""What training calls after each epoch: ``on_epoch(epoch, metrics)``, epochs from 1."""


class StepResult(BaseModel):
    model_config = ConfigDict(frozen=True)


class DatasetInfo(StepResult):
    name: str
    source: str
    task: Task
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...] = ()
    n_train: int
    n_val: int
    n_test: int
    digest: str
    """Content hash of the whole table (features and labels), for lineage."""
    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]
    """Training-split statistics; models fold this standardisation into their first layer
    so the ONNX model takes raw features."""
    target_mean: float = 0.0
    target_std: float = 1.0
    """Regression only: models fold ``y * std + mean`` into their last layer."""
    seed: int

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_outputs(self) -> int:
        return len(self.class_names) if self.task == "classification" else 1


class DatasetArtifact(StepResult):
    path: Path
    """``splits.npz`` with X_train, y_train, X_val, y_val, X_test, y_test (float32 features;
    int64 class indices or float32 targets)."""
    info: DatasetInfo


class TrainedModel(StepResult):
    framework: Framework
    path: Path
    """The framework's own file: ``model.pt2`` (torch.export program) or ``model.keras``."""
    metrics: dict[str, float]
    """Final-epoch metrics on the training and validation splits."""
    params: dict[str, str]
    train_seconds: float


class ExportedModel(StepResult):
    path: Path
    """``model.onnx``; external data, when any, lies beside it."""
    exporter: str
    """e.g. ``torch.onnx.export(dynamo=True)``, ``torch.onnx.export(dynamo=False)``, ``tf2onnx``."""
    opset: int
    fallback_reason: str | None = None
    export_seconds: float


class SimplifiedModel(StepResult):
    path: Path
    simplified: bool
    reason: str | None = None
    """Why the unsimplified model went on, when it did."""
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int


class ValidationSummary(StepResult):
    report_dir: Path
    """Holds report.json, report.md and the plots."""
    passed: bool
    metric_name: str
    """``accuracy`` (higher is better) or ``rmse`` (lower is better)."""
    framework_metric: float
    onnx_metric: float
    parity_max_abs: float
    parity_max_rel: float
    latency_ms: dict[str, float]
    """``{"framework_b1": ..., "onnx_b1": ..., "framework_b32": ..., "onnx_b32": ...}``, medians."""
    opset: int
    ir_version: int
    model_bytes: int


class RegisteredVersion(StepResult):
    name: str
    version: str
    run_id: str
    model_uri: str
    tags: dict[str, str]


class ChainResult(StepResult):
    """Everything one source's chain produced, from training (or import) to its version."""

    framework: str
    trained: TrainedModel | None = None
    """None for an imported model (trained elsewhere)."""
    exported: ExportedModel | ImportedModel
    simplified: SimplifiedModel
    validation: ValidationSummary
    version: RegisteredVersion
    quantized: RegisteredVersion | None = None
    """The int8 version registered next to ``version`` (``--quantize``), if it was kept."""
    quantize_note: str | None = None
    """Why no quantized version was registered although one was asked for."""
    sweep: SweepOutcome | None = None
    """The sweep whose best trial this chain registered (``--sweep``)."""


class ImportedModel(StepResult):
    """An imported model converted to ONNX, as the validate and register steps need it."""

    source: Path
    source_format: SourceFormat
    framework: str
    """``keras``, ``tensorflow``, ``torch`` or ``onnx`` (no framework to compare with)."""
    path: Path
    """``model.onnx`` (external data, when any, beside it)."""
    exporter: str
    opset: int
    export_seconds: float
    upgraded_from_opset: int | None = None
    """The opset an ONNX file had before :mod:`onnxflow.opset_upgrade` moved it forward."""


class QuantizedModel(StepResult):
    path: Path
    mode: str
    report_dir: Path
    metric_name: str
    float_metric: float
    quantized_metric: float
    drop: float
    """Accuracy lost (fraction), or RMSE gained, through quantization."""
    max_abs_diff: float
    """Largest output difference from the float model on the test split."""
    bytes_before: int
    bytes_after: int
    latency_ms: dict[str, float]
    """``float_b1``, ``quantized_b1``, ``float_b32``, ``quantized_b32``: medians."""


class ConvertedModel(StepResult):
    source: str
    """The registry URI or the path given."""
    onnx_path: Path
    """The ONNX model that was converted (a downloaded copy for a registry URI)."""
    path: Path
    """``model.pt2`` (torch.export program), ``model.pt`` (TorchScript), a SavedModel
    folder or a ``.tflite`` file."""
    artifact_format: ArtifactFormat
    fallback_reason: str | None = None
    """Why TorchScript was saved instead of a torch.export program, when it was."""
    dynamic_batch: bool
    """The saved file was run on one row and on the whole sample."""
    sample: str
    rows: int
    parity: dict[str, dict[str, float]]
    """Per output: ``max_abs``, ``max_rel`` (as in the validation report)."""
    parity_max_abs: float
    report_path: Path
    seconds: float
    figures: dict[str, Any] = {}
    """TensorFlow conversions: sizes, latencies and parity of both files (report.json)."""


TrialState = Literal["complete", "pruned", "failed", "lost"]
"""How a sweep trial ended; ``lost``: its Dask worker died (or it was cancelled) first."""


class TrialResult(StepResult):
    """One sweep trial: its settings, how it ended, and (when complete) the trained model."""

    number: int
    params: dict[str, Any]
    state: TrialState
    run_id: str
    """The trial's MLflow child run."""
    value: float | None = None
    """The sweep metric at the last epoch (pruned: at the epoch it was stopped)."""
    epochs: int = 0
    trained: TrainedModel | None = None
    note: str | None = None
    """Why it was pruned, failed or lost."""
    seconds: float = 0.0


class SweepOutcome(StepResult):
    """Every trial of a sweep and the best one (None if no trial completed)."""

    study: str
    metric: str
    direction: Literal["maximize", "minimize"]
    trials: list[TrialResult]
    best: TrialResult | None

    @property
    def lost(self) -> list[TrialResult]:
        return [t for t in self.trials if t.state == "lost"]

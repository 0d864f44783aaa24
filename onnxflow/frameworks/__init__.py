"""Framework adapters: one module per training framework, all with the same three functions.

``train`` writes the framework's own model file, ``export`` turns it into ``model.onnx``
and ``load_predictor`` loads it back for validation. Adapters are imported lazily, so
choosing PyTorch never imports TensorFlow (and the serving process imports neither).

Every exported model has the same interface, whatever trained it, declared once in
:func:`onnxflow.interface.table_model_interface`: one input ``features``
``[batch, n_features]`` float32 taking RAW features (the standardisation is folded into
the first layer) and one output, ``probabilities`` ``[batch, n_classes]`` for classifiers
or ``prediction`` ``[batch, 1]`` for regressors, with a dynamic batch axis.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import numpy as np

from onnxflow.config import ExportConfig, TrainConfig
from onnxflow.errors import ExportError, OnnxflowError
from onnxflow.interface import default_opset, load_graph, read_interface, table_model_interface
from onnxflow.results import (
    DatasetArtifact,
    DatasetInfo,
    EpochCallback,
    ExportedModel,
    TrainedModel,
)

log = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]

_ADAPTERS = {
    "torch": "onnxflow.frameworks.pytorch",
    "keras": "onnxflow.frameworks.keras3",
    "sklearn": "onnxflow.frameworks.scikit",
}


class FrameworkAdapter(Protocol):
    def train(
        self,
        dataset: DatasetArtifact,
        config: TrainConfig,
        out_dir: Path,
        on_epoch: EpochCallback | None = None,
    ) -> TrainedModel: ...

    def export(
        self, trained: TrainedModel, info: DatasetInfo, config: ExportConfig, out_dir: Path
    ) -> ExportedModel: ...

    def load_predictor(self, model_path: Path) -> Predictor: ...


def get_adapter(framework: str) -> FrameworkAdapter:
    """The adapter module of ``framework`` (``torch``, ``keras`` or ``sklearn``), imported on
    first use."""
    try:
        module_name = _ADAPTERS[framework]
    except KeyError:
        known = ", ".join(sorted(_ADAPTERS))
        raise OnnxflowError(f"Unknown framework {framework!r}; expected one of: {known}.") from None
    return cast(FrameworkAdapter, importlib.import_module(module_name))


def image_side(n_features: int, error: type[OnnxflowError]) -> int:
    """The side of the square one-channel image a CNN reads the features as (digits: 8).

    A CNN keeps the common interface: it takes the flat ``[batch, n_features]`` raw
    features and reshapes them inside the model, so serving and validation see no change.
    """
    side = int(round(n_features**0.5))
    if side * side != n_features or side < 4:
        raise error(
            f"--model cnn reads the features as a square image of at least 4x4 pixels; "
            f"{n_features} features are not a square number >= 16. Use --model mlp."
        )
    return side


def standardized_splits(
    dataset: DatasetArtifact,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training and validation arrays as the networks see them during training.

    Features are standardised with the training-split statistics; regression targets too
    (both are folded back into the saved model, see :func:`fold_standardization`).
    """
    from onnxflow.data import load_splits

    info = dataset.info
    splits = load_splits(dataset)
    mean = np.asarray(info.feature_mean, dtype=np.float32)
    std = np.asarray(info.feature_std, dtype=np.float32)
    X_train = (splits["X_train"] - mean) / std
    X_val = (splits["X_val"] - mean) / std
    y_train, y_val = splits["y_train"], splits["y_val"]
    if info.task == "regression":
        y_train = ((y_train - info.target_mean) / info.target_std).astype(np.float32)
        y_val = ((y_val - info.target_mean) / info.target_std).astype(np.float32)
    return X_train.astype(np.float32), y_train, X_val.astype(np.float32), y_val


def fold_standardization(
    layers: list[tuple[np.ndarray, np.ndarray]], info: DatasetInfo
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fold the input standardisation (and a regressor's target scaling) into the weights.

    ``layers`` are ``(kernel [in, out], bias [out])`` pairs of the dense layers in order.
    ``((x - mean) / std) @ K + b == x @ (K / std[:, None]) + (b - (mean / std) @ K)``, so the
    saved model takes raw features with no extra Sub/Div nodes; for regression the last layer
    becomes ``(x @ K + b) * target_std + target_mean``.
    """
    mean = np.asarray(info.feature_mean, dtype=np.float64)
    std = np.asarray(info.feature_std, dtype=np.float64)
    folded = [(np.asarray(k, np.float64), np.asarray(b, np.float64)) for k, b in layers]
    kernel, bias = folded[0]
    folded[0] = (kernel / std[:, None], bias - (mean / std) @ kernel)
    if info.task == "regression":
        kernel, bias = folded[-1]
        folded[-1] = (kernel * info.target_std, bias * info.target_std + info.target_mean)
    return [(k.astype(np.float32), b.astype(np.float32)) for k, b in folded]


def trained_model(
    framework: str,
    path: Path,
    metrics: dict[str, float],
    started: float,
    params: dict[str, str],
    config: TrainConfig | None = None,
) -> TrainedModel:
    """The trained model's record, logged as one line; ``config``: the network's training
    settings become params too (an MLP or CNN; scikit-learn's pipeline has none)."""
    import time

    seconds = time.perf_counter() - started
    log.info(
        "%s model trained in %.1f s: %s -> %s", framework, seconds, format_metrics(metrics), path
    )
    if config is not None:
        params = {
            "model": config.model,
            "hidden_sizes": ",".join(map(str, config.hidden_sizes)),
            "epochs": str(config.epochs),
            "learning_rate": str(config.learning_rate),
            "batch_size": str(config.batch_size),
            "seed": str(config.seed),
            **params,
        }
    return TrainedModel(
        framework=framework, path=path, metrics=metrics, params=params, train_seconds=seconds
    )


def format_metrics(metrics: dict[str, float]) -> str:
    """``train_loss 0.1234 val_loss 0.2345 ...`` for the one-line progress log."""
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def save_exported(
    proto, info: DatasetInfo, opset: int, out_dir: Path, exporter: str, started: float
) -> ExportedModel:
    """Write an in-memory export as ``out_dir/model.onnx``, check it, and describe it."""
    import time

    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.onnx"
    onnx.save(proto, str(target))
    check_exported_model(target, info, opset)
    seconds = time.perf_counter() - started
    log.info("exported %s with %s in %.1f s", target, exporter, seconds)
    return ExportedModel(path=target, exporter=exporter, opset=opset, export_seconds=seconds)


def check_exported_model(model_path: Path, info: DatasetInfo, opset: int) -> None:
    """``onnx.checker`` plus the interface every onnxflow model promises; raises ExportError."""
    import onnx

    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{model_path.name} fails onnx.checker: {exc}") from exc
    model = load_graph(model_path)
    problems = []
    if default_opset(model) != opset:
        problems.append(f"opset {default_opset(model)}, expected {opset}")
    declared = table_model_interface(info.task, info.n_features, info.n_outputs)
    problems += declared.mismatches(read_interface(model))
    if problems:
        raise ExportError(
            f"{model_path.name} does not have the expected interface: " + "; ".join(problems)
        )

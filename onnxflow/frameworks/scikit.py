"""scikit-learn adapter: a pipeline (scaler + linear model), saved with joblib, exported
with skl2onnx.

The pipeline is ``StandardScaler`` then ``LogisticRegression`` (classification) or
``Ridge`` (regression). It takes raw features like every onnxflow model: the scaler is
part of it. The export keeps the common interface: classifiers output only
``probabilities`` as a plain ``[batch, n_classes]`` tensor (no ZipMap: a list of dicts
is not a tensor, and V2 clients could not read it; the predicted label is its argmax),
regressors output ``prediction`` ``[batch, 1]``.

``model.joblib`` is a pickle: load only files this pipeline wrote itself.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from onnxflow.config import ExportConfig, TrainConfig
from onnxflow.errors import ExportError, TrainingError
from onnxflow.frameworks import (
    EpochCallback,
    Predictor,
    format_metrics,
    save_exported,
    trained_model,
)
from onnxflow.interface import INPUT_NAME, name_batch_axis, output_name
from onnxflow.results import DatasetArtifact, DatasetInfo, ExportedModel, TrainedModel

log = logging.getLogger(__name__)

EXPORTER = "skl2onnx"
#: The ai.onnx.ml opset skl2onnx targets alongside the default-domain opset.
ML_OPSET = 3
#: LogisticRegression's iteration cap: lbfgs on standardised digits converges well before.
MAX_ITER = 2000


def train(
    dataset: DatasetArtifact,
    config: TrainConfig,
    out_dir: Path,
    on_epoch: EpochCallback | None = None,
) -> TrainedModel:
    """Fit the pipeline on the training split; write ``out_dir/model.joblib``.

    ``on_epoch`` is called once (epoch 1): the solver runs to convergence, not in epochs.
    ``config.seed`` seeds the solver; the network settings (epochs, widths, model) do not
    apply to a linear model and are ignored.
    """
    import joblib
    import sklearn
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import log_loss, mean_squared_error
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from onnxflow.data import load_splits

    info = dataset.info
    splits = load_splits(dataset)
    classification = info.task == "classification"
    estimator = (
        LogisticRegression(max_iter=MAX_ITER, random_state=config.seed)
        if classification
        else Ridge(alpha=1.0, random_state=config.seed)
    )
    pipeline = make_pipeline(StandardScaler(), estimator)
    started = time.perf_counter()
    pipeline.fit(splits["X_train"], splits["y_train"])

    X_train, y_train, X_val, y_val = (splits[k] for k in ("X_train", "y_train", "X_val", "y_val"))
    if classification:
        labels = np.arange(info.n_outputs)
        val_proba = pipeline.predict_proba(X_val)
        metrics = {
            "train_loss": float(log_loss(y_train, pipeline.predict_proba(X_train), labels=labels)),
            "val_loss": float(log_loss(y_val, val_proba, labels=labels)),
            "val_accuracy": float(np.mean(val_proba.argmax(axis=1) == y_val)),
        }
    else:
        val_mse = float(mean_squared_error(y_val, pipeline.predict(X_val)))
        metrics = {
            "train_loss": float(mean_squared_error(y_train, pipeline.predict(X_train))),
            "val_loss": val_mse,
            "val_rmse": float(np.sqrt(val_mse)),
        }
    if not np.isfinite(list(metrics.values())).all():
        raise TrainingError(
            f"scikit-learn training produced non-finite metrics: {format_metrics(metrics)}"
        )
    if on_epoch is not None:
        on_epoch(1, metrics)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.joblib"
    joblib.dump(pipeline, path)
    return trained_model(
        "sklearn",
        path,
        metrics,
        started,
        {
            "framework_version": f"scikit-learn {sklearn.__version__}",
            "model": " + ".join(type(step).__name__ for _, step in pipeline.steps),
            "seed": str(config.seed),
            "n_parameters": str(_n_parameters(estimator)),
        },
    )


def export(
    trained: TrainedModel, info: DatasetInfo, config: ExportConfig, out_dir: Path
) -> ExportedModel:
    """Convert ``model.joblib`` with skl2onnx to ``out_dir/model.onnx`` (one output)."""
    import joblib
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    started = time.perf_counter()
    pipeline = joblib.load(trained.path)
    estimator = pipeline.steps[-1][1]
    classification = info.task == "classification"
    options = {id(estimator): {"zipmap": False}} if classification else None
    try:
        proto = convert_sklearn(
            pipeline,
            initial_types=[(INPUT_NAME, FloatTensorType([None, info.n_features]))],
            options=options,
            target_opset={"": config.opset, "ai.onnx.ml": ML_OPSET},
        )
    except Exception as exc:  # skl2onnx raises RuntimeError/NotImplementedError/...
        raise ExportError(f"skl2onnx could not convert {trained.path}: {exc}") from exc

    wanted = output_name(info.task)
    found = [o.name for o in proto.graph.output]
    # classifiers: (label, probabilities); regressors: (variable)
    source = found[-1] if classification else found[0]
    proto = _keep_output(proto, source, wanted)
    if not name_batch_axis(proto):  # skl2onnx leaves the first axis unnamed
        raise ExportError("skl2onnx wrote a static batch axis, expected it dynamic")
    _set_opset(proto, config.opset)

    return save_exported(proto, info, config.opset, out_dir, EXPORTER, started)


def load_predictor(model_path: Path) -> Predictor:
    """float32 raw features -> the same output as the ONNX model, from ``model.joblib``."""
    import joblib

    pipeline = joblib.load(model_path)
    if hasattr(pipeline, "predict_proba"):
        return lambda features: pipeline.predict_proba(features).astype(np.float32)
    return lambda features: pipeline.predict(features).reshape(-1, 1).astype(np.float32)


# -- export ----------------------------------------------------------------------------


def _keep_output(proto, source: str, wanted: str):
    """The graph with ``source`` as its only output, renamed ``wanted``; the nodes that
    only fed the dropped outputs (the label's ArgMax/ArrayFeatureExtractor) are removed."""
    import onnx

    graph = proto.graph
    for node in graph.node:
        node.input[:] = [wanted if n == source else n for n in node.input]
        node.output[:] = [wanted if n == source else n for n in node.output]
    kept = next(o for o in graph.output if o.name == source)
    kept.name = wanted
    del graph.output[:]
    graph.output.append(kept)
    needed, nodes = {wanted}, []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            nodes.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(nodes))
    used_initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used_initializers)
    onnx.checker.check_model(proto)
    return proto


def _set_opset(proto, opset: int) -> None:
    """One entry per domain (skl2onnx can list the default domain twice); the default
    domain must be the opset asked for."""
    seen: dict[str, int] = {}
    for entry in proto.opset_import:
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        seen[domain] = max(seen.get(domain, 0), entry.version)
    if seen.get("", opset) != opset:
        raise ExportError(f"skl2onnx wrote opset {seen['']}, not the requested {opset}")
    del proto.opset_import[:]
    for domain, version in seen.items():
        entry = proto.opset_import.add()
        entry.domain, entry.version = domain, version


def _n_parameters(estimator) -> int:
    return int(
        sum(
            np.size(getattr(estimator, a)) for a in ("coef_", "intercept_") if hasattr(estimator, a)
        )
    )

"""Keras 3 adapter (TensorFlow backend): train an MLP or a small CNN, save ``model.keras``,
convert it with tf2onnx.

``tf2onnx.convert.from_keras`` fails on Keras 3 models (KeyError 'keras_tensor_1'), so the
export wraps the model in a ``tf.function`` with an explicit input signature and uses
``tf2onnx.convert.from_function``. tf2onnx names the output after the TF graph
(``Identity:0``) and each batch axis separately (``unk__6``); both are renamed to the
onnxflow interface afterwards.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from onnxflow.config import ExportConfig, TrainConfig
from onnxflow.errors import ExportError, OnnxflowError, TrainingError
from onnxflow.frameworks import (
    EpochCallback,
    Predictor,
    fold_standardization,
    format_metrics,
    image_side,
    save_exported,
    standardized_splits,
    trained_model,
)
from onnxflow.interface import INPUT_NAME, name_batch_axis, output_name
from onnxflow.results import DatasetArtifact, DatasetInfo, ExportedModel, TrainedModel

log = logging.getLogger(__name__)

EXPORTER = "tf2onnx"
#: Validation batches: one forward pass per few hundred rows is plenty for an MLP.
_EVAL_BATCH = 256


def train(
    dataset: DatasetArtifact,
    config: TrainConfig,
    out_dir: Path,
    on_epoch: EpochCallback | None = None,
) -> TrainedModel:
    """Train an MLP with Adam; write ``out_dir/model.keras`` (raw features in, probabilities
    or predictions out). ``on_epoch(epoch, metrics)`` is called after each epoch (1-based).

    Seeding and op determinism are process-wide in TensorFlow (there is no scoped switch),
    so they stay on after this returns.
    """
    keras, tf = _import_keras(TrainingError)

    info = dataset.info
    classification = info.task == "classification"
    side = image_side(info.n_features, TrainingError) if config.model == "cnn" else 0
    X_train, y_train, X_val, y_val = standardized_splits(dataset)
    if not classification:
        y_train, y_val = y_train.reshape(-1, 1), y_val.reshape(-1, 1)

    started = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    if side:
        model = _cnn(keras, side, config.hidden_sizes, info.n_outputs, classification)
    else:
        model = _mlp(keras, info.n_features, config.hidden_sizes, info.n_outputs, classification)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss="sparse_categorical_crossentropy" if classification else "mean_squared_error",
        metrics=["accuracy"] if classification else [keras.metrics.RootMeanSquaredError("rmse")],
        jit_compile=False,  # XLA compilation costs more than it saves on a small MLP
    )
    # a tf.data pipeline built once is ~1.5x faster than fit() on numpy arrays here
    train_data = (
        tf.data.Dataset.from_tensor_slices((X_train, y_train))
        .shuffle(len(X_train), seed=config.seed, reshuffle_each_iteration=True)
        .batch(config.batch_size)
        .prefetch(2)
    )
    val_data = tf.data.Dataset.from_tensor_slices((X_val, y_val)).batch(_EVAL_BATCH)
    reporter = _epoch_reporter(keras, info, config, on_epoch)
    model.fit(
        train_data,
        validation_data=val_data,
        epochs=config.epochs,
        verbose=0,
        shuffle=False,
        callbacks=[reporter],
    )  # the pipeline shuffles, seeded
    metrics = reporter.last_metrics

    inference = (
        _cnn_inference_model(keras, model, info) if side else _inference_model(keras, model, info)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.keras"
    inference.save(path)
    return trained_model(
        "keras",
        path,
        metrics,
        started,
        {
            "framework_version": f"keras {keras.__version__}, tensorflow {tf.__version__}",
            "n_parameters": str(inference.count_params()),
        },
        config,
    )


def export(
    trained: TrainedModel, info: DatasetInfo, config: ExportConfig, out_dir: Path
) -> ExportedModel:
    """Convert ``model.keras`` with ``tf2onnx.convert.from_function`` to ``out_dir/model.onnx``."""
    keras, tf = _import_keras(ExportError)
    from onnxflow.frameworks.tf_onnx import convert_function

    started = time.perf_counter()
    model = keras.models.load_model(trained.path, compile=False)
    signature = (tf.TensorSpec([None, info.n_features], tf.float32, name=INPUT_NAME),)
    serve = tf.function(lambda features: model(features, training=False))
    try:
        proto = convert_function(
            serve, signature, config.opset, output_names=[output_name(info.task)]
        )
    except ExportError:
        raise
    except Exception as exc:  # tf2onnx raises whatever TensorFlow or its handlers raise
        raise ExportError(f"tf2onnx could not convert {trained.path}: {exc}") from exc
    if len(proto.graph.output) != 1:
        raise ExportError(f"tf2onnx produced {len(proto.graph.output)} outputs, expected 1")
    if not name_batch_axis(proto):  # tf2onnx names the input's and output's batch axes apart
        raise ExportError("tf2onnx wrote a static batch axis, expected it dynamic")

    return save_exported(proto, info, config.opset, out_dir, EXPORTER, started)


def load_predictor(model_path: Path) -> Predictor:
    """float32 raw features -> the same output as the ONNX model, from ``model.keras``."""
    keras, tf = _import_keras(OnnxflowError)

    model = keras.models.load_model(model_path, compile=False)
    # one traced graph for every batch size: model.predict() costs ~20 ms per call
    forward = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec([None, model.input_shape[-1]], tf.float32)],
    )

    def predict(features: np.ndarray) -> np.ndarray:
        return forward(tf.convert_to_tensor(features, dtype=tf.float32)).numpy()

    return predict


def _import_keras(error: type[OnnxflowError]):
    # TensorFlow's C++ INFO lines drown the pipeline's log; a level the user chose wins
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise error(
            f"The keras adapter needs the TensorFlow backend (tf2onnx converts TF graphs); "
            f"KERAS_BACKEND is {keras.backend.backend()!r}."
        )
    return keras, tf


# -- training --------------------------------------------------------------------------


def _mlp(
    keras, n_features: int, hidden_sizes: tuple[int, ...], n_outputs: int, classification: bool
):
    layers = [keras.Input((n_features,), name=INPUT_NAME)]
    layers += [keras.layers.Dense(width, activation="relu") for width in hidden_sizes]
    layers.append(keras.layers.Dense(n_outputs, activation="softmax" if classification else None))
    return keras.Sequential(layers)


def _cnn(keras, side: int, hidden_sizes: tuple[int, ...], n_outputs: int, classification: bool):
    """The torch adapter's CNN in Keras: the flat features reshaped to ``side x side x 1``
    (channels last) inside the model, two 3x3 convolutions, a 2x2 max-pool, a dense head."""
    layers = [
        keras.Input((side * side,), name=INPUT_NAME),
        keras.layers.Reshape((side, side, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Flatten(),
    ]
    layers += [keras.layers.Dense(width, activation="relu") for width in hidden_sizes]
    layers.append(keras.layers.Dense(n_outputs, activation="softmax" if classification else None))
    return keras.Sequential(layers)


def _epoch_reporter(keras, info: DatasetInfo, config: TrainConfig, on_epoch: EpochCallback | None):
    """A callback that logs one line per epoch and hands the metrics to ``on_epoch``."""

    class EpochReporter(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.last_metrics: dict[str, float] = {}

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            metrics = {"train_loss": float(logs["loss"]), "val_loss": float(logs["val_loss"])}
            if info.task == "classification":
                metrics["val_accuracy"] = float(logs["val_accuracy"])
            else:  # fitted on standardised targets; rmse is in the target's units
                metrics["val_rmse"] = float(logs["val_rmse"]) * info.target_std
            if not np.isfinite(list(metrics.values())).all():
                raise TrainingError(
                    f"keras training diverged at epoch {epoch + 1}: {format_metrics(metrics)}; "
                    f"try a lower learning_rate than {config.learning_rate}."
                )
            self.last_metrics = metrics
            log.info("keras epoch %d/%d: %s", epoch + 1, config.epochs, format_metrics(metrics))
            if on_epoch is not None:
                on_epoch(epoch + 1, metrics)

    return EpochReporter()


def _inference_model(keras, model, info: DatasetInfo):
    """A copy of the trained model with the standardisation folded into its weights."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    folded = fold_standardization([tuple(layer.get_weights()) for layer in dense], info)
    inference = keras.models.clone_model(model)  # uncompiled: no optimizer state is saved
    cloned = [layer for layer in inference.layers if isinstance(layer, keras.layers.Dense)]
    for layer, (kernel, bias) in zip(cloned, folded, strict=True):
        layer.set_weights([kernel, bias])
    return inference


def _cnn_inference_model(keras, model, info: DatasetInfo):
    """The trained CNN's layers behind the standardisation (a per-pixel scale does not fold
    into a padded convolution), plus the target de-standardisation for regression.

    Both are ``Rescaling`` layers (``x * scale + offset``): their constants go into the
    traced graph. ``Normalization(mean=, variance=)`` keeps them as captured eager tensors,
    which tf2onnx turns into extra graph inputs.
    """
    mean = np.asarray(info.feature_mean, dtype=np.float64)
    inv_std = 1.0 / np.asarray(info.feature_std, dtype=np.float64)
    inputs = keras.Input((info.n_features,), name=INPUT_NAME)
    x = keras.layers.Rescaling(
        scale=inv_std.astype(np.float32).tolist(),
        offset=(-mean * inv_std).astype(np.float32).tolist(),
    )(inputs)
    for layer in model.layers:
        x = layer(x)
    if info.task == "regression":
        x = keras.layers.Rescaling(scale=info.target_std, offset=info.target_mean)(x)
    return keras.Model(inputs, x)


# -- export ----------------------------------------------------------------------------

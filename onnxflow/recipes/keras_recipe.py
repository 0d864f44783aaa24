"""A recipe's Keras model: check it against the data, train it, save and export it.

The saved ``model.keras`` is a new functional model over the trained one: fresh inputs
named and typed as the data's, a softmax on top (``probabilities``). It is converted with
tf2onnx through the same ``tf.function`` wrapper as an imported ``.keras`` file.

Data in memory (NamedArrays) goes to ``model.fit`` as arrays; streamed data (an image
folder or a Parquet table with ``data.stream``: :class:`~onnxflow.streaming.StreamedSplits`)
as :class:`onnxflow.recipes.keras_data.SplitBatches`, read lazily per batch. A recipe's
own torch datasets are refused before training (:mod:`onnxflow.recipes.steps`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from onnxflow.arrays import LABEL, ArrayDatasetInfo
from onnxflow.config import TrainConfig
from onnxflow.errors import RecipeError, TrainingError
from onnxflow.interface import output_name
from onnxflow.recipes import expected_output
from onnxflow.streaming import StreamedSplits, TrainingData, head

log = logging.getLogger(__name__)

EXPORTER = "tf2onnx"
_EVAL_BATCH = 256


def import_keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    return keras, tf


def resolve_device(requested: str) -> str:
    _, tf = import_keras()
    available = bool(tf.config.list_physical_devices("GPU"))
    if requested == "cuda" and not available:
        raise TrainingError("train.device is cuda but TensorFlow sees no GPU; use auto or cpu")
    return "cuda" if requested in ("auto", "cuda") and available else "cpu"


def device_scope(device: str):
    _, tf = import_keras()
    return tf.device("/GPU:0" if device == "cuda" else "/CPU:0")


def declared_inputs(model) -> list[str]:
    """The names of a functional model's ``keras.Input``s (none for a subclassed model)."""
    return [getattr(t, "name", "").split(":")[0] for t in getattr(model, "inputs", []) or []]


def bind_inputs(model, info: ArrayDatasetInfo, ref: str) -> None:
    """The data's inputs go to the model by ``Input(name=...)`` (a one-input model takes
    its one array whatever its name); RecipeError naming both sides otherwise."""
    names, declared = info.input_names, declared_inputs(model)
    if len(names) > 1 and declared and sorted(declared) != sorted(names):
        raise RecipeError(
            f"{ref}: build_model(info) returned a model whose inputs are named "
            f"({', '.join(declared)}), but the data's inputs are ({', '.join(names)}): "
            "give each keras.Input the name of a data input (they are passed by name)"
        )


def model_inputs(model, split: Mapping[str, np.ndarray], names: tuple[str, ...]):
    """The split's inputs as the model takes them: by name, or the one array of a
    one-input model."""
    if len(names) == 1 and declared_inputs(model) != list(names):
        return split[names[0]]
    return {n: split[n] for n in names}


def check_output(model, data: TrainingData, info: ArrayDatasetInfo, ref: str) -> None:
    """Two training rows through the untrained model: its output must be [2, n_classes]."""
    bind_inputs(model, info, ref)
    rows = head(data, "train", 2, info.input_names)
    try:
        out = model(model_inputs(model, rows, info.input_names), training=False)
        shape = tuple(int(d) for d in out.shape)
    except Exception as exc:
        raise RecipeError(
            f"{ref}: the model from build_model(info) fails on two training rows: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        ) from exc
    if shape != (2, info.n_outputs):
        raise RecipeError(
            f"{ref}: the model from build_model(info) returns shape {list(shape)} "
            f"for 2 rows; expected {expected_output(info)}"
        )


def fit(
    model,
    data: TrainingData,
    info: ArrayDatasetInfo,
    config: TrainConfig,
    device: str,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, float]:
    """Adam on sparse categorical cross-entropy (from logits), or mean squared error
    (regression), via ``model.fit``: arrays shuffled by Keras, or streamed batches
    (:func:`streamed_batches`)."""
    keras, _ = import_keras()
    names = info.input_names
    classification = info.task == "classification"
    score = "val_accuracy" if classification else "val_rmse"
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if classification
        else keras.losses.MeanSquaredError(),
        metrics=["accuracy"] if classification else [keras.metrics.RootMeanSquaredError("rmse")],
        jit_compile=False,
    )
    history: dict[str, float] = {}

    class Reporter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            metrics = {
                "train_loss": float(logs["loss"]),
                "val_loss": float(logs["val_loss"]),
                score: float(logs[score]),
            }
            if not np.isfinite(list(metrics.values())).all():
                raise TrainingError(f"training diverged at epoch {epoch + 1}: {metrics}")
            history.clear()
            history.update(metrics)
            if on_epoch is not None:
                on_epoch(epoch + 1, metrics)

    if isinstance(data, StreamedSplits):
        train, validation = streamed_batches(model, data, names, config)
        arrays: dict = {"x": train, "validation_data": validation, "shuffle": False}
    else:
        arrays = {
            "x": model_inputs(model, data.train, names),
            "y": data.train[LABEL],
            "validation_data": (
                model_inputs(model, data.validation, names),
                data.validation[LABEL],
            ),
            "batch_size": config.batch_size,
            "shuffle": True,
        }
    with device_scope(device):
        model.fit(**arrays, epochs=config.epochs, verbose=0, callbacks=[Reporter()])
    return history


def streamed_batches(model, data: StreamedSplits, names: tuple[str, ...], config: TrainConfig):
    """The training and validation splits as lazy Keras batches of ``train.batch_size``
    rows, read by ``train.loader_workers`` threads: training shuffled per epoch from
    ``train.seed`` (a Parquet split's row groups together), validation in order."""
    from onnxflow.recipes.keras_data import SplitBatches

    def feed(rows: Mapping[str, np.ndarray]):
        return model_inputs(model, rows, names)

    workers = config.loader_workers or 0
    return tuple(
        SplitBatches(
            data.split(split),
            config.batch_size,
            shuffle=split == "train",
            seed=config.seed,
            workers=workers,
            feed=feed,
        )
        for split in ("train", "validation")
    )


def owns(model) -> bool:
    """Whether ``model`` is a ``keras.Model`` (without importing keras when no recipe has)."""
    import sys

    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.Model)


def to_device(model, device: str):
    """Keras places by ``device_scope``."""
    return model


def check_exportable(
    model, info: ArrayDatasetInfo, data: TrainingData, ref: str, when: str
) -> None:
    """tf2onnx's problems only show at export (after training)."""


def save(model, info: ArrayDatasetInfo, data: TrainingData, out_dir: Path, ref: str) -> Path:
    """``model.keras``: data-named inputs -> the trained model -> softmax ``probabilities``."""
    keras, _ = import_keras()
    inputs = [
        keras.Input(shape=spec.shape, dtype=spec.dtype, name=spec.name) for spec in info.inputs
    ]
    fed = model_inputs(model, {i.name: i for i in inputs}, info.input_names)
    top = (
        keras.layers.Softmax(name=output_name(info.task))
        if info.task == "classification"
        else keras.layers.Identity(name=output_name(info.task))
    )
    outputs = top(model(fed))
    inference = keras.Model(inputs, outputs, name="inference")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.keras"
    inference.save(path)
    return path


def export(model_path: Path, info: ArrayDatasetInfo, opset: int, target: Path) -> None:
    from onnxflow.importing import _tf_to_onnx

    _tf_to_onnx(model_path, "keras", opset, target)


def reference(
    model_path: Path, names: tuple[str, ...]
) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    """The saved model on CPU as a function of the ONNX feeds -> [probabilities]."""
    from onnxflow.importing import _tf_function

    _, tf = import_keras()
    fn, input_names, _ = _tf_function(model_path, "keras")

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        parts = []
        with tf.device("/CPU:0"):
            for start in range(0, n, _EVAL_BATCH):
                result = fn(
                    *(
                        tf.convert_to_tensor(feeds[k][start : start + _EVAL_BATCH])
                        for k in input_names
                    )
                )
                result = result[0] if isinstance(result, list | tuple) else result
                parts.append(result.numpy())
        return [np.concatenate(parts)]

    return run


def count_parameters(model) -> int:
    return int(model.count_params())

"""Keras: a functional model with two inputs, numeric features and a categorical id.

``features`` (8 float32 values) and ``store`` (an int64 id among 40, through an
Embedding) come from an ``.npz`` read by onnxflow's .npz loader. The class depends on
both: a linear score of the features against a threshold that each store sets.

    onnxflow run --recipe examples/keras_tabular/recipe.py
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

STORES = 40
FEATURES = 8
ROWS = 6000
CLASSES = ("low", "medium", "high")

#: The recipe's own defaults; the YAML config and command-line options win over them.
DEFAULTS = {
    "train": {"epochs": 20, "batch_size": 64, "learning_rate": 3e-3},
    "register": {"model_name": "stores"},
}


def generate(path: Path, rows: int = ROWS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1, FEATURES)
    offsets = rng.normal(0, 1.5, STORES)
    features = rng.normal(0, 1, (rows, FEATURES)).astype(np.float32)
    store = rng.integers(0, STORES, rows).astype(np.int64)
    score = features @ weights / np.sqrt(FEATURES) + offsets[store]
    label = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3]))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.npz")
    np.savez(partial, features=features, store=store, label=np.asarray(CLASSES)[label])
    partial.replace(path)
    return path


def load_data(config):
    from onnxflow.arrays import load_npz

    path = Path(config.path) if config.path else Path(__file__).parent / "data" / "stores.npz"
    if not path.exists():
        generate(path)
    return load_npz(path, config)


def build_model(info):
    import keras

    shapes = {s.name: s for s in info.inputs}
    features = keras.Input(shape=shapes["features"].shape, name="features")
    store = keras.Input(shape=shapes["store"].shape, dtype="int64", name="store")
    embedded = keras.layers.Embedding(STORES, 4)(store)
    x = keras.layers.Concatenate()([features, keras.layers.Flatten()(embedded)])
    x = keras.layers.Dense(64, activation="relu")(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    return keras.Model([features, store], keras.layers.Dense(info.n_classes)(x))

"""Shared fixtures: a real MLflow store per test, tiny real ONNX models.

Creating an MLflow SQLite store runs all its migrations (about a second), so one
migrated database is made per session and copied into each test's own folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def _migrated_db(tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, _migrated_db) -> str:
    """A fresh SQLite tracking store and artifact root inside this test's tmp_path."""
    import mlflow

    shutil.copyfile(_migrated_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default artifact root ./mlruns lands here
    mlflow.set_tracking_uri(uri)
    yield uri
    leaked = mlflow.active_run()
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    assert leaked is None, f"test leaked an active MLflow run: {leaked.info.run_id}"


def make_linear_onnx(path: Path, n_in: int = 64, n_out: int = 10, seed: int = 0,
                     external_data: bool = False) -> Path:
    """A real softmax-regression model: features[batch, n_in] -> probabilities[batch, n_out]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    W = numpy_helper.from_array(rng.normal(size=(n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(n_out,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_out])],
        [W, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external_data,
                    location=f"{path.name}.data", size_threshold=0)
    return path


@pytest.fixture
def linear_onnx(tmp_path) -> Path:
    return make_linear_onnx(tmp_path / "linear" / "model.onnx")

"""The endpoint's download cache is keyed by the registered digest, not only NAME/VERSION."""

from __future__ import annotations

import shutil

import mlflow  # noqa: F401  (loads pandas before MlflowRegistry blocks it for the endpoint)
import numpy as np

from onnxflow.onnxfiles import onnx_digest
from onnxflow.registration import register_onnx
from onnxflow.serving.manager import fetch_version
from onnxflow.serving.registry_reader import MlflowRegistry
from tests.conftest import make_linear_onnx


def test_same_name_and_version_from_two_registries_do_not_share_a_cache_entry(
    mlflow_store, tmp_path, monkeypatch, _migrated_db
):
    cache = tmp_path / "cache"
    example = np.ones((1, 64), np.float32)
    served = {}
    for seed in (1, 2):  # two stores, each with its own "digits version 1"
        store = tmp_path / f"store{seed}"
        store.mkdir()
        shutil.copyfile(_migrated_db, store / "mlflow.db")
        monkeypatch.chdir(store)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
        model = make_linear_onnx(store / "m" / "model.onnx", seed=seed)
        version = register_onnx(model, model_name="digits", input_example=example)
        registry = MlflowRegistry()
        resolved, tags = registry.resolve("digits", "challenger", None)
        folder = fetch_version(registry, cache, "digits", resolved, tags["onnx_sha256"])
        assert (
            onnx_digest(folder / "model.onnx") == tags["onnx_sha256"] == version.tags["onnx_sha256"]
        )
        served[seed] = folder
    assert served[1] != served[2] and served[1].is_dir() and served[2].is_dir()


def test_building_a_registry_client_leaves_the_callers_imports_alone(mlflow_store):
    import sys

    MlflowRegistry()
    assert all(
        sys.modules.get(name, "absent") is not None
        for name in ("pandas", "pyarrow", "torch", "tensorflow")
    ), "only the endpoint's own processes block heavy imports"

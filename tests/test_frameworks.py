"""The framework adapters: train, export, load_predictor, on tiny real models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxflow.config import ExportConfig
from onnxflow.data import load_splits
from onnxflow.errors import ExportError, OnnxflowError
from onnxflow.frameworks import get_adapter
from onnxflow.onnxfiles import external_data_locations
from tests.fixtures_ml import FRAMEWORKS, TINY, Built, built, onnx_session

PARITY_ATOL = 1e-4


@pytest.fixture(scope="session", params=FRAMEWORKS)
def digits_model(request, tmp_path_factory) -> Built:
    return built(request.param, "classification", tmp_path_factory)


@pytest.fixture(scope="session", params=FRAMEWORKS)
def regression_model(request, tmp_path_factory) -> Built:
    return built(request.param, "regression", tmp_path_factory)


def _declared(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_unknown_framework_is_a_clear_error():
    with pytest.raises(
        OnnxflowError, match=r"Unknown framework 'jax'; expected one of: keras, sklearn, torch"
    ):
        get_adapter("jax")


def test_importing_the_steps_imports_no_framework():
    code = (
        "import sys, onnxflow.frameworks, onnxflow.frameworks.pytorch, "
        "onnxflow.frameworks.keras3, onnxflow.simplify, onnxflow.validation; "
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'onnxsim', 'matplotlib') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_train_reports_every_epoch(digits_model: Built):
    assert [epoch for epoch, _ in digits_model.epochs_seen] == list(range(1, TINY.epochs + 1))
    assert set(digits_model.epochs_seen[-1][1]) == {"train_loss", "val_loss", "val_accuracy"}
    assert digits_model.trained.metrics == digits_model.epochs_seen[-1][1]
    assert digits_model.trained.path.name in {"model.pt2", "model.keras"}


def test_export_has_the_onnxflow_interface(digits_model: Built):
    exported, info = digits_model.exported, digits_model.dataset.info
    model = onnx.load(str(exported.path), load_external_data=False)
    assert [(v.name, _declared(v)) for v in model.graph.input] == [("features", ["batch", 64])]
    assert [(v.name, _declared(v)) for v in model.graph.output] == [
        ("probabilities", ["batch", info.n_outputs])
    ]
    assert exported.opset == 18 and exported.fallback_reason is None
    assert (
        exported.exporter
        == {"torch": "torch.onnx.export(dynamo=True)", "keras": "tf2onnx"}[
            digits_model.trained.framework
        ]
    )


def test_predictor_matches_onnxruntime_on_raw_features(digits_model: Built):
    X = digits_model.X_test
    predict = get_adapter(digits_model.trained.framework).load_predictor(digits_model.trained.path)
    (onnx_out,) = onnx_session(digits_model.exported.path).run(None, {"features": X})
    framework_out = predict(X)
    assert onnx_out.shape == framework_out.shape == (len(X), 10)
    np.testing.assert_allclose(onnx_out, framework_out, atol=PARITY_ATOL, rtol=0)
    np.testing.assert_allclose(onnx_out.sum(axis=1), 1.0, atol=1e-5)  # softmax is in the model
    y = load_splits(digits_model.dataset)["y_test"]
    assert np.mean(onnx_out.argmax(axis=1) == y) > 0.6  # two epochs of a tiny net still learn


@pytest.mark.parametrize("batch", [1, 7])
def test_batch_axis_is_dynamic(digits_model: Built, batch: int):
    rows = digits_model.X_test[:batch]
    predict = get_adapter(digits_model.trained.framework).load_predictor(digits_model.trained.path)
    (onnx_out,) = onnx_session(digits_model.exported.path).run(None, {"features": rows})
    assert onnx_out.shape == (batch, 10)
    np.testing.assert_allclose(onnx_out, predict(rows), atol=PARITY_ATOL, rtol=0)


def test_training_is_deterministic_for_a_seed(digits_model: Built, tmp_path):
    adapter = get_adapter(digits_model.trained.framework)
    again = adapter.train(digits_model.dataset, TINY, tmp_path)
    X = digits_model.X_test
    first = adapter.load_predictor(digits_model.trained.path)(X)
    np.testing.assert_array_equal(adapter.load_predictor(again.path)(X), first)
    assert again.metrics == digits_model.trained.metrics


def test_torch_export_keeps_weights_in_external_data(tmp_path_factory):
    exported = built("torch", "classification", tmp_path_factory).exported
    assert external_data_locations(exported.path) == ["model.onnx.data"]
    assert (exported.path.parent / "model.onnx.data").stat().st_size > 1000


def test_torch_falls_back_to_the_legacy_exporter_with_its_reason(tmp_path_factory, tmp_path):
    # Below opset 18 the dynamo exporter converts down and keeps 18 when it cannot: a real
    # case where only the TorchScript exporter delivers what the config asks for.
    model = built("torch", "classification", tmp_path_factory)
    exported = get_adapter("torch").export(
        model.trained, model.dataset.info, ExportConfig(opset=13), tmp_path
    )
    assert exported.exporter == "torch.onnx.export(dynamo=False)"
    assert "opset 18, not the requested 13" in exported.fallback_reason
    proto = onnx.load(str(exported.path))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [13]
    X = model.X_test
    (onnx_out,) = onnx_session(exported.path).run(None, {"features": X[:5]})
    predict = get_adapter("torch").load_predictor(model.trained.path)
    np.testing.assert_allclose(onnx_out, predict(X[:5]), atol=PARITY_ATOL, rtol=0)


def test_keras_refuses_an_opset_tf2onnx_cannot_write(tmp_path_factory, tmp_path):
    model = built("keras", "classification", tmp_path_factory)
    with pytest.raises(ExportError, match=r"tf2onnx .* up to 18; .* asks for opset 21"):
        get_adapter("keras").export(
            model.trained, model.dataset.info, ExportConfig(opset=21), tmp_path
        )


def test_regression_folds_the_target_scaling_into_the_model(regression_model: Built):
    splits = load_splits(regression_model.dataset)
    X, y = splits["X_test"], splits["y_test"]
    info = regression_model.dataset.info
    model = onnx.load(str(regression_model.exported.path), load_external_data=False)
    assert [(v.name, _declared(v)) for v in model.graph.output] == [("prediction", ["batch", 1])]
    (onnx_out,) = onnx_session(regression_model.exported.path).run(None, {"features": X})
    predict = get_adapter(regression_model.trained.framework).load_predictor(
        regression_model.trained.path
    )
    np.testing.assert_allclose(onnx_out, predict(X), atol=PARITY_ATOL, rtol=1e-5)
    rmse = float(np.sqrt(np.mean((onnx_out[:, 0] - y) ** 2)))
    assert rmse < 0.5 * info.target_std, (rmse, info.target_mean, info.target_std)
    assert set(regression_model.trained.metrics) == {"train_loss", "val_loss", "val_rmse"}

"""The other direction: ONNX into a TensorFlow SavedModel and TFLite (onnx2tf in its own
venv), and the round trips torch -> ONNX -> TensorFlow, Keras -> ONNX -> PyTorch.

Tests that need the converter venv run when it exists (``make converter-env`` creates it)
and are reported as skipped, with where it was looked for, when it does not: a skip is
not a pass. ``-m slow`` adds one that builds the venv from nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxflow import converter_env
from onnxflow.convert import ConvertConfig, convert_model
from onnxflow.errors import ConversionError
from tests.fixtures_ml import built
from tests.test_convert import _load_in_fresh_process, _ml_scaler_model, _register_digits

needs_venv = pytest.mark.skipif(
    not converter_env.ready(),
    reason=(
        f"SKIPPED, NOT PASSED: no converter venv at {converter_env.venv_dir()} "
        "(`make converter-env` creates it; ONNXFLOW_CONVERTER_VENV moves it)"
    ),
)


def _source_predict(framework: str, model) -> np.ndarray:
    from onnxflow.frameworks import get_adapter

    return get_adapter(framework).load_predictor(model.trained.path)(model.X_test)


# -- without the converter venv (the Keras -> ONNX -> PyTorch round trip is last) -----------


def test_a_venv_that_cannot_be_created_says_why_in_one_line(tmp_path, monkeypatch):
    venv = tmp_path / "converter"
    monkeypatch.setenv("ONNXFLOW_CONVERTER_VENV", str(venv))
    monkeypatch.setenv("ONNXFLOW_CONVERTER_PYTHON", str(tmp_path / "no-such-python"))
    assert converter_env.venv_dir() == venv and not converter_env.ready()
    with pytest.raises(ConversionError) as caught:
        converter_env.ensure()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"Cannot create the converter venv at {venv}")
    assert "no-such-python" in message


def test_a_venv_built_from_other_pins_is_not_reused(tmp_path, monkeypatch):
    venv = tmp_path / "converter"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    monkeypatch.setenv("ONNXFLOW_CONVERTER_VENV", str(venv))
    (venv / converter_env.STAMP).write_text(json.dumps({"pins": "older"}))
    assert not converter_env.ready()
    (venv / converter_env.STAMP).write_text(json.dumps({"pins": converter_env._pins_digest()}))
    assert converter_env.ready()


def test_the_operator_onnx2tf_stopped_at_is_read_from_its_log():
    from onnxflow.converter_worker import failed_operator

    log = (
        "\x1b[32mINFO:\x1b[0m \x1b[32monnx_op_type: \x1b[0mGemm\x1b[35m onnx_op_name: "
        "\x1b[0m/fc/Gemm\nINFO: onnx_op_type: Scaler onnx_op_name: scale\n"
        "ERROR: The trace log is below.\nModuleNotFoundError: No module named 'onnx2tf.ops.Scaler'"
    )
    assert failed_operator(log) == "Scaler (node scale)"
    assert failed_operator("no operator here") is None


# -- with the converter venv ----------------------------------------------------------------


@needs_venv
def test_torch_to_onnx_to_tensorflow_and_tflite_equal_torch_and_are_logged_on_the_version(
    mlflow_store, tmp_path, tmp_path_factory
):
    from mlflow import MlflowClient

    model = built("torch", "classification", tmp_path_factory)
    version = _register_digits(model.exported.path, model.dataset)

    result = convert_model(
        "models:/digits@champion", ConvertConfig(to="tensorflow"), tmp_path / "out"
    )

    assert result.artifact_format == "savedmodel" and (result.path / "saved_model.pb").is_file()
    assert result.sample == "digits test split" and result.rows == len(model.X_test)
    assert result.parity_max_abs <= 1e-4 and result.figures["parity_max_abs"]["tflite"] <= 1e-4
    torch_out = _source_predict("torch", model)
    for kind in ("tensorflow", "tflite"):  # each as run from its file, on real data
        found = np.load(tmp_path / "out" / "tensorflow" / f"outputs_{kind}.npz")
        (name,) = found.files
        assert found[name].shape == torch_out.shape
        assert np.abs(found[name] - torch_out).max() <= 1e-4, kind
    report = json.loads(result.report_path.read_text())
    assert report["passed"] and report["inputs"] == ["features"]
    assert report["figures"]["tflite_bytes"] > 0

    client = MlflowClient()
    tags = client.get_model_version("digits", version).tags
    assert tags["tf_conversion"] == "passed"
    assert float(tags["tf_parity_max_abs"]) <= 1e-4 and float(tags["tflite_parity_max_abs"]) <= 1e-4
    run_id = client.get_model_version("digits", version).run_id
    logged = {a.path for a in client.list_artifacts(run_id, "converted/tensorflow")}
    assert "converted/tensorflow/report.json" in logged
    assert "converted/tensorflow/saved_model" in logged
    files = {
        Path(a.path).name for a in client.list_artifacts(run_id, "converted/tensorflow/saved_model")
    }
    assert {"saved_model.pb", "model_float32.tflite"} <= files


@needs_venv
@pytest.mark.slow  # ~1 min: one onnx2tf run that fails
def test_an_operator_onnx2tf_cannot_convert_is_named(tmp_path):
    model = _ml_scaler_model(tmp_path / "scaler.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((4, 2), np.float32))
    with pytest.raises(
        ConversionError,
        match=r"onnx2tf could not convert .*operator ai\.onnx\.ml::Scaler\(opset 3\)",
    ):
        convert_model(model, ConvertConfig(to="tflite"), tmp_path / "out", tmp_path / "x.npz")


@pytest.mark.slow  # minutes and ~1 GB of downloads: the venv built from nothing
def test_the_converter_venv_is_built_from_its_pins_and_reused(tmp_path, monkeypatch):
    venv = tmp_path / "converter"
    monkeypatch.setenv("ONNXFLOW_CONVERTER_VENV", str(venv))
    python = converter_env.ensure()
    assert converter_env.ready() and python == venv / "bin" / "python"
    stamp = (venv / converter_env.STAMP).stat().st_mtime_ns
    assert converter_env.ensure() == python  # reused, not rebuilt
    assert (venv / converter_env.STAMP).stat().st_mtime_ns == stamp
    assert os.access(python, os.X_OK)


def test_keras_to_onnx_to_torch_equals_keras_on_the_digits_test_split(
    mlflow_store, tmp_path, tmp_path_factory
):
    """Through the command line, NAME VERSION form; torch (with torchvision, which
    onnx2torch imports) runs in other processes: it crashes in one that has loaded
    TensorFlow."""
    model = built("keras", "classification", tmp_path_factory)
    version = _register_digits(model.exported.path, model.dataset)
    out = tmp_path / "out"
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("onnxflow")),
            "convert",
            "digits",
            version,
            "--to",
            "torch",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]
    assert "against onnxruntime" in done.stdout
    np.savez(tmp_path / "in.npz", features=model.X_test)
    _load_in_fresh_process(out / "model.pt2", tmp_path / "in.npz", tmp_path / "torch.npz")
    torch_out = np.load(tmp_path / "torch.npz")["arr_0"]
    keras_out = _source_predict("keras", model)
    assert torch_out.shape == keras_out.shape == (len(model.X_test), 10)
    assert np.abs(torch_out - keras_out).max() <= 1e-4

"""The endpoint's pieces in process: codecs, payload parsing, load-time refusals, settings."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxflow.serving.mlflow_format import parse_csv, parse_payload
from onnxflow.serving.model import ModelRefused, load_model
from onnxflow.serving.settings import ServingSettings, parse_model_reference
from onnxflow.serving.tensors import (
    RequestError, TensorSpec, array_from_binary, array_from_json, array_to_binary, check_shape,
)
from tests.serving import models

FEATURES = TensorSpec("features", "FP32", (-1, 64))


def test_model_reference():
    assert parse_model_reference("digits@champion") == ("digits", "champion", None)
    assert parse_model_reference("digits/3") == ("digits", None, "3")
    for bad in ("digits", "@champion", "digits@", "digits/x"):
        with pytest.raises(ValueError):
            parse_model_reference(bad)
    with pytest.raises(ValueError):
        ServingSettings(model="digits")
    with pytest.raises(ValueError, match="8 characters"):
        ServingSettings(token="short")


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("ONNXFLOW_SERVE_TOKEN", "s3cret-s3cret")
    monkeypatch.setenv("ONNXFLOW_SERVE_MAX_BATCH_SIZE", "16")
    settings = ServingSettings()
    assert settings.token.get_secret_value() == "s3cret-s3cret"
    assert "s3cret-s3cret" not in repr(settings)
    assert settings.batching and settings.host == "127.0.0.1"


@pytest.mark.parametrize("datatype,values", [
    ("FP32", [1.5, -2]), ("FP64", [1e300]), ("FP16", [0.5]), ("INT8", [-128, 127]),
    ("UINT64", [2**63]), ("INT64", [-(2**63)]), ("BOOL", [True, False]), ("BYTES", ["a", "é"]),
])
def test_json_and_binary_round_trip(datatype, values):
    spec = TensorSpec("t", datatype, (-1,))
    arr = array_from_json(spec, values, (len(values),))
    assert arr.tolist() == values
    again = array_from_binary(spec, memoryview(array_to_binary(datatype, arr)), arr.shape)
    assert again.tolist() == values


@pytest.mark.parametrize("datatype,values,message", [
    ("INT8", [128], "do not fit INT8"),
    ("UINT8", [-1], "do not fit UINT8"),
    ("INT32", [1.5], "must be integers"),
    ("FP32", ["1.5"], "must be numbers"),
    ("BOOL", [1], "true or false"),
    ("BYTES", [1], "must be strings"),
    ("FP32", [[1, 2], [3]], "rectangular"),
    ("INT64", [2**64], "beyond 64 bits"),
])
def test_json_values_refused(datatype, values, message):
    with pytest.raises(RequestError, match=message):
        array_from_json(TensorSpec("t", datatype, (-1,)), values, None)


def test_declared_shape_checked_before_allocation():
    with pytest.raises(RequestError) as info:
        check_shape(FEATURES, [10**12, 64], max_bytes=1 << 24)
    assert info.value.status == 413
    assert check_shape(FEATURES, [2, 64], max_bytes=1 << 24) == (2, 64)


def test_binary_bytes_and_bool_checks():
    spec = TensorSpec("s", "BYTES", (-1,))
    blob = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 10) + b"xy"
    with pytest.raises(RequestError, match="runs past"):
        array_from_binary(spec, memoryview(blob), (2,))
    with pytest.raises(RequestError, match="0 or 1"):
        array_from_binary(TensorSpec("b", "BOOL", (-1,)), memoryview(b"\x02"), (1,))


def test_parse_payload_formats_agree():
    rows = np.arange(128, dtype=np.float32).reshape(2, 64)
    forms = [
        {"inputs": rows.tolist()},
        {"instances": [{"features": r} for r in rows.tolist()]},
        {"dataframe_split": {"columns": [f"c{i}" for i in range(64)], "data": rows.tolist()}},
        {"dataframe_records": [{"features": r} for r in rows.tolist()]},
    ]
    for payload in forms:
        np.testing.assert_array_equal(parse_payload(payload, (FEATURES,))["features"], rows)


def test_unnamed_array_needs_a_single_input_model():
    specs = (FEATURES, TensorSpec("other", "FP32", (-1, 2)))
    with pytest.raises(RequestError, match="one input"):
        parse_payload({"inputs": [[0.0] * 64]}, specs)


# --- load-time refusals -------------------------------------------------------------------

def _version_folder(tmp_path: Path, *, external: bool = False) -> Path:
    """A minimal MLflow ONNX model folder, as the registry stores one."""
    folder = tmp_path / "version"
    source = models.mlp(tmp_path / "src" / "model.onnx")
    folder.mkdir()
    model = onnx.load(str(source))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=external,
                    location="model.onnx.data", size_threshold=0)
    (folder / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
    return folder


def _digest(folder: Path) -> dict[str, str]:
    from onnxflow.onnxfiles import onnx_digest

    return {"onnx_sha256": onnx_digest(folder / "model.onnx")}


def test_loads_and_synthesizes_an_example(tmp_path):
    folder = _version_folder(tmp_path, external=True)
    model = load_model(folder, name="m", version="1", tags=_digest(folder),
                       settings=ServingSettings())
    assert model.example["features"].shape == (1, 64)
    assert model.inline and not model.batchable


def test_refuses_missing_or_wrong_digest(tmp_path):
    folder = _version_folder(tmp_path)
    with pytest.raises(ModelRefused, match="no onnx_sha256"):
        load_model(folder, name="m", version="1", tags={}, settings=ServingSettings())
    with pytest.raises(ModelRefused, match="sha256 mismatch"):
        load_model(folder, name="m", version="1", tags={"onnx_sha256": "0" * 64},
                   settings=ServingSettings())


def test_refuses_external_data_outside_the_folder(tmp_path):
    folder = _version_folder(tmp_path, external=True)
    outside = tmp_path / "outside.data"
    shutil.move(folder / "model.onnx.data", outside)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save_model(model, str(folder / "model.onnx"))
    with pytest.raises(ModelRefused, match="outside"):
        load_model(folder, name="m", version="1", tags={}, settings=ServingSettings())


def test_refuses_non_onnx_flavor(tmp_path):
    folder = _version_folder(tmp_path)
    (folder / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: x\n")
    with pytest.raises(ModelRefused, match="not an ONNX model"):
        load_model(folder, name="m", version="1", tags=_digest(folder),
                   settings=ServingSettings())


def test_refuses_a_model_that_fails_its_example(tmp_path):
    folder = _version_folder(tmp_path)
    (folder / "input_example.json").write_text('{"features": [[1, 2, 3]]}')
    (folder / "MLmodel").write_text(
        "flavors:\n  onnx:\n    data: model.onnx\nsaved_input_example_info:\n"
        "  artifact_path: input_example.json\n  type: ndarray\n")
    with pytest.raises(ModelRefused, match="input example"):
        load_model(folder, name="m", version="1", tags=_digest(folder),
                   settings=ServingSettings())


@pytest.mark.parametrize("text", ["features\r1\r2", "a,b\n1,\"2\n", "x\n" + "1" * 200_000])
def test_malformed_csv_is_a_request_error_not_a_crash(text):
    """Found by the reliability fuzzer: csv.Error escaped as a 500."""
    spec = (TensorSpec("features", "FP32", (-1, 1)),)
    try:
        parse_csv(text, spec)
    except RequestError as exc:
        assert exc.status == 400


def test_a_refused_token_is_not_echoed_in_the_error():
    """Found by the reliability suite: pydantic printed input_value='<token>'."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as refused:
        ServingSettings(token="sh0rt")
    assert "sh0rt" not in str(refused.value) and "8 characters" in str(refused.value)

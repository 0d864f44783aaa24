"""The endpoint's pieces in process: codecs, payload parsing, load-time refusals, settings."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxflow.serving.mlflow_format import (
    content_type_parameters,
    decode_json,
    parse_body,
    parse_csv,
    parse_payload,
)
from onnxflow.serving.model import ModelRefused, load_model
from onnxflow.serving.settings import ServingSettings, parse_model_reference
from onnxflow.serving.tensors import (
    RequestError,
    TensorSpec,
    array_from_binary,
    array_from_json,
    array_to_binary,
    check_shape,
)
from tests.conftest import point_external_data, save_checked_onnx
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


@pytest.mark.parametrize(
    "datatype,values",
    [
        ("FP32", [1.5, -2]),
        ("FP64", [1e300]),
        ("FP16", [0.5]),
        ("INT8", [-128, 127]),
        ("UINT64", [2**63]),
        ("INT64", [-(2**63)]),
        ("BOOL", [True, False]),
        ("BYTES", ["a", "é"]),
    ],
)
def test_json_and_binary_round_trip(datatype, values):
    spec = TensorSpec("t", datatype, (-1,))
    arr = array_from_json(spec, values, (len(values),))
    assert arr.tolist() == values
    again = array_from_binary(spec, memoryview(array_to_binary(datatype, arr)), arr.shape)
    assert again.tolist() == values


@pytest.mark.parametrize(
    "datatype,values,message",
    [
        ("INT8", [128], "do not fit INT8"),
        ("UINT8", [-1], "do not fit UINT8"),
        ("INT32", [1.5], "must be integers"),
        ("FP32", ["1.5"], "must be numbers"),
        ("BOOL", [1], "true or false"),
        ("BYTES", [1], "must be strings"),
        ("FP32", [[1, 2], [3]], "rectangular"),
        ("INT64", [2**64], "beyond 64 bits"),
    ],
)
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
    save_checked_onnx(onnx.load(str(source)), folder / "model.onnx", external, "model.onnx.data")
    (folder / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
    return folder


def _digest(folder: Path) -> dict[str, str]:
    from onnxflow.onnxfiles import onnx_digest

    return {"onnx_sha256": onnx_digest(folder / "model.onnx")}


def test_loads_and_synthesizes_an_example(tmp_path):
    folder = _version_folder(tmp_path, external=True)
    model = load_model(
        folder, name="m", version="1", tags=_digest(folder), settings=ServingSettings()
    )
    assert model.example["features"].shape == (1, 64)
    assert model.inline and not model.batchable


def test_refuses_missing_or_wrong_digest(tmp_path):
    folder = _version_folder(tmp_path)
    with pytest.raises(ModelRefused, match="no onnx_sha256"):
        load_model(folder, name="m", version="1", tags={}, settings=ServingSettings())
    with pytest.raises(ModelRefused, match="sha256 mismatch"):
        load_model(
            folder,
            name="m",
            version="1",
            tags={"onnx_sha256": "0" * 64},
            settings=ServingSettings(),
        )


def test_refuses_external_data_outside_the_folder(tmp_path):
    folder = _version_folder(tmp_path, external=True)
    outside = tmp_path / "outside.data"
    shutil.move(folder / "model.onnx.data", outside)
    point_external_data(folder / "model.onnx", "../outside.data")
    with pytest.raises(ModelRefused, match="outside"):
        load_model(folder, name="m", version="1", tags={}, settings=ServingSettings())


def test_refuses_non_onnx_flavor(tmp_path):
    folder = _version_folder(tmp_path)
    (folder / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: x\n")
    with pytest.raises(ModelRefused, match="not an ONNX model"):
        load_model(folder, name="m", version="1", tags=_digest(folder), settings=ServingSettings())


def test_refuses_a_model_that_fails_its_example(tmp_path):
    folder = _version_folder(tmp_path)
    (folder / "input_example.json").write_text('{"features": [[1, 2, 3]]}')
    (folder / "MLmodel").write_text(
        "flavors:\n  onnx:\n    data: model.onnx\nsaved_input_example_info:\n"
        "  artifact_path: input_example.json\n  type: ndarray\n"
    )
    with pytest.raises(ModelRefused, match="input example"):
        load_model(folder, name="m", version="1", tags=_digest(folder), settings=ServingSettings())


@pytest.mark.parametrize("text", ["features\r1\r2", 'a,b\n1,"2\n', "x\n" + "1" * 200_000])
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


# --- MLflow's scoring format: rows kept, values converted as MLflow does -----------------

ROWS3 = np.random.default_rng(3).normal(size=(3, 64)).astype(np.float32)
HEADER = ",".join(f"f{i}" for i in range(64))
LINES = [",".join(repr(float(v)) for v in row) for row in ROWS3]
MULTI_SPECS = (
    TensorSpec("x", "FP32", (-1,)),
    TensorSpec("n", "INT32", (-1, 1)),
    TensorSpec("s", "BYTES", (-1,)),
)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize(
    ("header", "declared"), [(True, None), (False, None), (True, "present"), (False, "absent")]
)
def test_csv_answers_every_row(rows, header, declared):
    """The data-loss bug: a CSV without a header row lost its first row."""
    text = "\n".join(([HEADER] if header else []) + LINES[:rows])
    feeds = parse_csv(text, (FEATURES,), header=declared)
    np.testing.assert_allclose(feeds["features"], ROWS3[:rows])


def test_csv_header_is_detected_against_the_model_never_guessed():
    ambiguous = ",".join(map(str, range(64)))  # pandas' default names, or a row of data
    with pytest.raises(RequestError, match="could be pandas' default column names or data"):
        parse_csv("\n".join([ambiguous, *LINES]), (FEATURES,))
    as_header = parse_csv("\n".join([ambiguous, *LINES]), (FEATURES,), header="present")
    assert as_header["features"].shape == (3, 64)
    as_data = parse_csv("\n".join([ambiguous, *LINES]), (FEATURES,), header="absent")
    assert as_data["features"].shape == (4, 64)
    with pytest.raises(RequestError, match="mixes values and names"):
        parse_csv("\n".join(["a" + LINES[0][LINES[0].index(",") :], LINES[1]]), (FEATURES,))
    text_input = (TensorSpec("text", "BYTES", (-1,)),)
    with pytest.raises(RequestError, match="header or data for the string input"):
        parse_csv("hello\nworld", text_input)
    assert parse_csv("text\nhello\nworld", text_input)["text"].tolist() == ["hello", "world"]
    assert parse_csv("hello\nworld", text_input, header="absent")["text"].tolist() == [
        "hello",
        "world",
    ]


def test_csv_multi_input_needs_its_names_and_missing_values_fit_floats():
    feeds = parse_csv("n,s,x\n1,a,\n2,b,NaN\n3,c,2.5", MULTI_SPECS)
    assert feeds["n"].tolist() == [[1], [2], [3]]
    assert feeds["s"].tolist() == ["a", "b", "c"]
    assert np.isnan(feeds["x"][:2]).all() and feeds["x"][2] == 2.5
    with pytest.raises(RequestError, match="needs a header row naming them"):
        parse_csv("1,a,2.5", MULTI_SPECS)
    with pytest.raises(
        RequestError,
        match=r"line 2, column 'n': '' is not a INT32 value "
        r"\(missing values only fit float inputs\)",
    ):
        parse_csv("n,s,x\n,a,1", MULTI_SPECS)
    with pytest.raises(RequestError, match="CSV line 3 is blank"):
        parse_csv("\n".join([HEADER, LINES[0], "", LINES[1]]), (FEATURES,))
    assert parse_csv("\n".join([HEADER, *LINES, "", ""]), (FEATURES,))["features"].shape[0] == 3
    excel = "\ufeff" + "\r\n".join(LINES)  # a byte-order mark and CRLF, no header
    np.testing.assert_allclose(parse_csv(excel, (FEATURES,))["features"], ROWS3)
    with pytest.raises(RequestError, match="to_csv\\(index=False\\)"):
        parse_csv(
            "\n".join(["," + HEADER, *[f"{i},{r}" for i, r in enumerate(LINES)]]), (FEATURES,)
        )


def test_json_missing_values_and_numeric_strings_as_mlflow_reads_them():
    row = ROWS3[0].tolist()
    nan_body = json.dumps({"inputs": [[math.nan, *row[1:]]]}).encode()  # the bare NaN
    assert b"NaN" in nan_body
    assert np.isnan(parse_body(nan_body, "application/json", (FEATURES,))["features"][0, 0])
    nulls = parse_payload({"dataframe_split": {"data": [[None, *row[1:]]]}}, (FEATURES,))
    assert np.isnan(nulls["features"][0, 0]) and nulls["features"].shape == (1, 64)
    strings = parse_payload({"inputs": [[str(v) for v in row]]}, (FEATURES,))
    np.testing.assert_allclose(strings["features"][0], ROWS3[0])
    ints = TensorSpec("n", "INT32", (-1,))
    assert parse_payload({"inputs": ["3", 4.0, 5]}, (ints,))["n"].tolist() == [3, 4, 5]
    for bad, message in [
        ([1.5], "1.5 is not an integer"),
        ([None], "only fits float inputs"),
        (["3.0"], "'3.0' is not an integer"),
    ]:
        with pytest.raises(RequestError, match=re.escape(message)):
            parse_payload({"inputs": bad}, (ints,))
    with pytest.raises(RequestError, match="BOOL data must be true or false"):
        parse_payload({"inputs": ["false"]}, (TensorSpec("b", "BOOL", (-1,)),))
    with pytest.raises(RequestError, match="malformed JSON"):
        decode_json(b'{"inputs": [NaN')
    with pytest.raises(RequestError, match="malformed JSON"):  # orjson refuses lone surrogates
        decode_json(b'{"inputs": ["\\ud800"], "x": NaN}')


def test_dataframes_without_columns_with_gaps_and_typos():
    split = parse_payload(
        {"dataframe_split": {"index": [4, 5, 6], "data": ROWS3.tolist()}}, (FEATURES,)
    )
    np.testing.assert_allclose(split["features"], ROWS3)
    with pytest.raises(RequestError, match="unknown key 'column'"):
        parse_payload({"dataframe_split": {"column": ["a"], "data": [[1.0]]}}, (FEATURES,))
    with pytest.raises(RequestError, match="index is 2 labels for 3 rows"):
        parse_payload({"dataframe_split": {"index": [1, 2], "data": [[1], [2], [3]]}}, (FEATURES,))
    names = [f"f{i}" for i in range(64)]
    first, second = dict(zip(names, ROWS3[0].tolist())), dict(zip(names, ROWS3[1].tolist()))
    del second["f7"]
    gap = parse_payload({"dataframe_records": [first, second]}, (FEATURES,))["features"]
    assert np.isnan(gap[1, 7]) and gap[1, 8] == ROWS3[1, 8] and gap.shape == (2, 64)
    with pytest.raises(RequestError, match="record 1 has column 'f7' that record 0 lacks"):
        parse_payload({"dataframe_records": [second, first]}, (FEATURES,))


def test_content_type_parameters_as_mlflow_checks_them():
    assert content_type_parameters("application/json; charset=UTF-8") == ("application/json", {})
    assert content_type_parameters('text/csv; header="Absent"') == (
        "text/csv",
        {"header": "absent"},
    )
    for value, message in [
        ("application/json; something=x", "unrecognized"),
        ("application/json; header=present", "unrecognized"),
        ("text/csv; charset=latin-1", "UTF-8 only"),
        ("text/csv; header=maybe", "header=present or header=absent"),
    ]:
        with pytest.raises(RequestError, match=message) as refused:
            content_type_parameters(value)
        assert refused.value.status == 415

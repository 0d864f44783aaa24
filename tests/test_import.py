"""Bring your own model: every supported file type built here, imported through the flow on
a temporary SQLite store; any-typed ONNX models registered and served through V2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper, numpy_helper

from onnxflow.config import PipelineConfig
from onnxflow.errors import ModelImportError, ValidationError
from onnxflow.importing import detect_format
from tests.conftest import save_checked_onnx

FAST = PipelineConfig.model_validate({"validate": {"latency_repeats": 3}})


def import_model(source, name, sample, expected=None, *, config, out_dir):
    """The one chain with an imported file as its source, registered as ``name``."""
    from onnxflow.flows.pipeline import chain
    from onnxflow.sources import ImportSource

    config = config.model_copy(
        update={"register_": config.register_.model_copy(update={"model_name": name})}
    )
    imported = ImportSource(
        source=source, sample_path=sample, expected_path=expected, opset=config.export.opset
    )
    return chain(imported, config, out_dir)


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


# -- model files, built once per module ---------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """format -> (model path, sample path)."""
    # torch._dynamo before TensorFlow: triton's import (by torch.export) segfaults in a
    # process that already loaded TensorFlow; the statement between keeps the sorter away
    import torch
    import torch._dynamo  # noqa: F401

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    root = tmp_path_factory.mktemp("byom")
    rng = np.random.default_rng(0)
    x4 = root / "x4.npz"
    np.savez(x4, x=rng.normal(size=(10, 4)).astype(np.float32))

    # Keras: two inputs, two named outputs; the sample's float64 b is cast to float32
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    probs = keras.layers.Dense(4, activation="softmax", name="probs")(hidden)
    score = keras.layers.Dense(1, name="score")(hidden)
    keras.Model([a, b], [probs, score]).save(root / "multi.keras")
    np.savez(
        root / "ab.npz", a=rng.normal(size=(10, 3)).astype(np.float32), b=rng.normal(size=(10, 2))
    )

    class Projection(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(rng.normal(size=(4, 2)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.matmul(x, self.w), "z": tf.reduce_sum(x, axis=1)}

    module = Projection()
    tf.saved_model.save(
        module, str(root / "saved"), signatures={"serving_default": module.__call__}
    )

    torch.manual_seed(0)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.softmax(self.linear(x), -1)

    program = torch.export.export(
        Classifier().eval(),
        (torch.zeros(2, 4),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
    )
    torch.export.save(program, root / "model.pt2")

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = self.linear(x)
            return y, y.argmax(dim=1)

    torch.jit.save(torch.jit.script(TwoHeads().eval()), str(root / "script.pt"))

    onnx_dir = root / "onnx"
    onnx_model = _all_types_model(onnx_dir / "model.onnx", external_data=True)
    np.savez(root / "all_types.npz", **all_types_sample(5))
    return {
        "keras": (root / "multi.keras", root / "ab.npz"),
        "savedmodel": (root / "saved", x4),
        "torch_export": (root / "model.pt2", x4),
        "torchscript": (root / "script.pt", x4),
        "onnx": (onnx_model, root / "all_types.npz"),
    }


#: Every tensor type onnxruntime runs and V2 carries, with a symbolic non-batch axis too.
ALL_TYPES = {
    "f16": TensorProto.FLOAT16,
    "f32": TensorProto.FLOAT,
    "f64": TensorProto.DOUBLE,
    "i8": TensorProto.INT8,
    "i16": TensorProto.INT16,
    "i32": TensorProto.INT32,
    "i64": TensorProto.INT64,
    "u8": TensorProto.UINT8,
    "u16": TensorProto.UINT16,
    "u32": TensorProto.UINT32,
    "u64": TensorProto.UINT64,
    "flag": TensorProto.BOOL,
    "text": TensorProto.STRING,
}


def _all_types_model(path: Path, external_data: bool = False, batch="batch") -> Path:
    """13 inputs ``[batch, seq]``, one per type, passed through (Identity) as ``<name>_out``;
    plus ``total`` = mean over ``seq`` of f32 times a 1x1 weight (kept in external data)."""
    weight = numpy_helper.from_array(np.array([[3.0]], np.float32), "weight")
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in ALL_TYPES]
    nodes += [
        helper.make_node("Mul", ["f32", "weight"], ["scaled"]),
        helper.make_node("ReduceMean", ["scaled"], ["total"], axes=[1], keepdims=0),
        helper.make_node("Not", ["flag"], ["flag_not"]),
    ]
    inputs = [helper.make_tensor_value_info(n, t, [batch, "seq"]) for n, t in ALL_TYPES.items()]
    outputs = [
        helper.make_tensor_value_info(f"{n}_out", t, [batch, "seq"]) for n, t in ALL_TYPES.items()
    ]
    outputs += [
        helper.make_tensor_value_info("total", TensorProto.FLOAT, [batch]),
        helper.make_tensor_value_info("flag_not", TensorProto.BOOL, [batch, "seq"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "all_types", inputs, outputs, [weight]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    return save_checked_onnx(model, path, external_data, "model.onnx.data")


def all_types_sample(rows: int, seq: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (rows, seq)
    sample = {}
    for name, elem in ALL_TYPES.items():
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if name == "text":
            sample[name] = np.array([[f"w{r}-{c}-é" for c in range(seq)] for r in range(rows)])
        elif name == "flag":
            sample[name] = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.kind == "f":
            sample[name] = rng.normal(size=shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            sample[name] = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return sample


def _versions(name: str) -> list:
    return MlflowClient().search_model_versions(f"name='{name}'")


# -- detection and refusal ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["keras", "savedmodel", "torch_export", "torchscript", "onnx"])
def test_the_format_is_detected_from_the_content(files, fmt, tmp_path):
    path, _ = files[fmt]
    assert detect_format(path) == fmt
    if path.is_file():  # a misleading suffix changes nothing
        renamed = tmp_path / "model.bin"
        renamed.write_bytes(path.read_bytes())
        if fmt != "onnx":  # (external data must stay beside an ONNX model)
            assert detect_format(renamed) == fmt


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a model at all", "not a model file onnxflow knows"),
        (b"PK\x03\x04 truncated zip", "not a model file onnxflow knows"),
    ],
)
def test_an_unknown_or_broken_file_is_refused_and_nothing_registered(
    mlflow_store, tmp_path, files, content, message
):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(content)
    with pytest.raises(ModelImportError, match=message):
        import_model(bad, "byom", files["torch_export"][1], config=FAST, out_dir=tmp_path / "a")
    assert _versions("byom") == []
    assert (
        MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
        == []
    )


def test_an_onnx_model_missing_its_external_data_is_refused(files, tmp_path):
    source = files["onnx"][0]
    (tmp_path / "model.onnx").write_bytes(source.read_bytes())  # without model.onnx.data
    with pytest.raises(ModelImportError, match="external data file 'model.onnx.data' is missing"):
        detect_format(tmp_path / "model.onnx")
    with pytest.raises(ModelImportError, match="without saved_model.pb"):
        detect_format(tmp_path)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.zeros((2, 4), np.float32), "z": np.zeros(2)}, "no array for input(s) ['x']"),
        ({"x": np.zeros((2, 5), np.float32)}, "dimension 1 is 5, the model fixes it at 4"),
        ({"x": np.zeros((2, 4, 1), np.float32)}, "3 dimensions"),
        ({"x": np.full((2, 4), "a")}, "the sample has strings"),
    ],
)
def test_a_sample_that_does_not_fit_is_refused_before_any_run(
    mlflow_store, tmp_path, files, arrays, message
):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ModelImportError, match="does not match the model's inputs") as caught:
        import_model(
            files["torch_export"][0],
            "byom",
            tmp_path / "bad.npz",
            config=FAST,
            out_dir=tmp_path / "a",
        )
    assert message in str(caught.value)
    assert _versions("byom") == []


def test_integer_inputs_refuse_non_integer_values(files, tmp_path):
    from onnxflow.importing import bind_sample
    from onnxflow.runtime import open_session

    session = open_session(files["onnx"][0])
    sample = all_types_sample(2)
    sample["i32"] = sample["i32"].astype(np.float64) + 0.5
    with pytest.raises(ModelImportError, match="'i32' takes int32, the sample has non-integer"):
        bind_sample(sample, session.get_inputs())
    sample["i32"] = np.full((2, 3), 2.0**40)
    with pytest.raises(ModelImportError, match="do not fit int32"):
        bind_sample(sample, session.get_inputs())


# -- the flow, per format -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["keras", "savedmodel", "torch_export", "torchscript"])
def test_a_framework_model_is_imported_with_parity_against_its_framework(
    mlflow_store, tmp_path, files, fmt
):
    path, sample = files[fmt]
    result = import_model(path, "byom", sample, config=FAST, out_dir=tmp_path / "a")

    tags = result.version.tags
    assert result.validation.passed and result.validation.parity_max_abs <= 1e-4
    assert tags["source_format"] == fmt and tags["parity_checked"] == "true"
    assert tags["batch_axis"] == "dynamic" and tags["validation"] == "passed"
    assert {"onnx_sha256", "exporter", "opset", "git_commit", "flow_run_id"} <= set(tags)
    mv = MlflowClient().get_model_version_by_alias("byom", "challenger")
    assert str(mv.version) == result.version.version
    _assert_profiled(result.version.run_id, np.load(sample))
    report = json.loads((result.validation.report_dir / "report.json").read_text())
    assert report["parity_checked"] and report["batch_consistency"]["checked"]
    assert set(report["parity"]) == {o["name"] for o in report["model"]["outputs"]}
    assert all(o["shape"][0] == "batch" for o in report["model"]["outputs"])


def test_keras_outputs_keep_their_layer_names(mlflow_store, tmp_path, files):
    path, sample = files["keras"]
    result = import_model(path, "byom", sample, config=FAST, out_dir=tmp_path / "a")
    report = json.loads((result.validation.report_dir / "report.json").read_text())
    assert [o["name"] for o in report["model"]["outputs"]] == ["probs", "score"]
    assert [i["name"] for i in report["model"]["inputs"]] == ["a", "b"]


def test_a_bare_onnx_model_without_expected_outputs_says_parity_was_not_checked(
    mlflow_store, tmp_path, files
):
    path, sample = files["onnx"]
    result = import_model(path, "anytype", sample, config=FAST, out_dir=tmp_path / "a")
    tags = result.version.tags
    assert tags["parity_checked"] == "false" and tags["parity_max_abs"] == "not checked"
    assert "no expected outputs" in tags["parity_note"]
    report = json.loads((result.validation.report_dir / "report.json").read_text())
    assert report["parity_checked"] is False and report["parity"] == {}
    assert "Parity not checked" in (result.validation.report_dir / "report.md").read_text()
    _assert_profiled(result.version.run_id, np.load(sample))


def _assert_profiled(run_id: str, sample) -> None:
    """An imported version is profiled from its validation sample: the reference profile
    and the reference sample (every row of a small sample, a column per feature and the
    prediction) for the monitor."""
    import mlflow
    import pyarrow.parquet as pq

    from onnxflow.profile import row_features
    from onnxflow.registration import PROFILE_PATH, REFERENCE_SAMPLE_PATH

    profile = mlflow.artifacts.load_dict(f"runs:/{run_id}/{PROFILE_PATH}")
    table = pq.read_table(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_SAMPLE_PATH)
    )
    columns = set(row_features(dict(sample)))
    assert set(profile["features"]) == columns and "prediction" in profile
    assert set(table.column_names) == columns | {"prediction"}
    assert table.num_rows == len(next(iter(dict(sample).values())))


def test_a_bare_onnx_model_is_compared_with_expected_outputs(mlflow_store, tmp_path, files):
    import onnxruntime as ort

    model, sample = files["onnx"]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = dict(np.load(sample))
    feeds["text"] = feeds["text"].astype(object)
    names = [o.name for o in session.get_outputs()]
    expected = {
        k: v.astype(str) if v.dtype == object else v  # npz holds text as str
        for k, v in zip(names, session.run(names, feeds))
    }
    np.savez(tmp_path / "expected.npz", **expected)
    result = import_model(
        model, "anytype", sample, tmp_path / "expected.npz", config=FAST, out_dir=tmp_path / "a"
    )
    assert result.version.tags["parity_checked"] == "true"
    assert result.validation.parity_max_abs == 0.0

    expected["i64_out"] = expected["i64_out"] + 1
    expected["total"] = expected["total"] + 0.5
    np.savez(tmp_path / "wrong.npz", **expected)
    with pytest.raises(ValidationError) as caught:
        import_model(
            model, "anytype", sample, tmp_path / "wrong.npz", config=FAST, out_dir=tmp_path / "b"
        )
    failures = "\n".join(caught.value.failures)
    assert "output 'i64_out': int64 values: 15 of 15 differ" in failures
    assert "output 'total': max abs diff 0.5 > atol" in failures
    assert len(_versions("anytype")) == 1


# -- serving any-typed models ---------------------------------------------------------------


def _serve(model: str, root: Path):
    from onnxflow.processes import free_port
    from onnxflow.serving.launcher import start_background, wait_ready
    from onnxflow.serving.settings import ServingSettings

    settings = ServingSettings(model=model, port=free_port(), cache_dir=root / "cache")
    info = start_background(settings, root / "state")
    wait_ready(info, timeout_s=90)
    return info.url


def _v2_input(name: str, array: np.ndarray) -> dict:
    from onnxflow.serving.tensors import ONNX_TO_V2

    kind = {
        np.dtype(np.float16): "tensor(float16)",
        np.dtype(np.float32): "tensor(float)",
        np.dtype(np.float64): "tensor(double)",
        np.dtype(bool): "tensor(bool)",
    }
    if array.dtype.kind in "OU":
        datatype, data = "BYTES", [str(x) for x in array.reshape(-1)]
    else:
        datatype = ONNX_TO_V2[kind.get(array.dtype, f"tensor({array.dtype.name})")]
        data = array.reshape(-1).tolist()
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}


def test_any_typed_models_are_served_through_v2_with_onnxruntime_answers(
    mlflow_store, tmp_path, files
):
    """The all-types model (dynamic batch) and the same model with a fixed batch of 2."""
    import httpx
    import onnxruntime as ort

    from onnxflow.serving.launcher import stop_background

    model, sample = files["onnx"]
    import_model(model, "anytype", sample, config=FAST, out_dir=tmp_path / "a")
    fixed = _all_types_model(tmp_path / "fixed" / "model.onnx", batch=2)
    np.savez(tmp_path / "two.npz", **all_types_sample(2))
    static = import_model(
        fixed, "fixedbatch", tmp_path / "two.npz", config=FAST, out_dir=tmp_path / "b"
    )
    assert static.version.tags["batch_axis"] == "none"
    report = json.loads((static.validation.report_dir / "report.json").read_text())
    assert report["batch_consistency"]["checked"] is False

    for name, path, rows in (("anytype", model, 4), ("fixedbatch", fixed, 2)):
        root = tmp_path / f"serve-{name}"
        try:
            url = _serve(f"{name}@challenger", root)
            feeds = all_types_sample(rows, seed=7)
            body = {"inputs": [_v2_input(k, v) for k, v in feeds.items()]}
            with httpx.Client(base_url=url, timeout=30) as http:
                meta = http.get(f"/v2/models/{name}").json()
                answer = http.post(f"/v2/models/{name}/infer", json=body)
            assert answer.status_code == 200, answer.text
            assert meta["parameters"]["tags"]["batch_axis"] == ("dynamic" if rows == 4 else "none")
            if name == "fixedbatch":
                assert meta["parameters"]["dynamic_batching"] is False
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feeds["text"] = feeds["text"].astype(object)
            names = [o.name for o in session.get_outputs()]
            local = dict(zip(names, session.run(names, feeds)))
            served = {o["name"]: o for o in answer.json()["outputs"]}
            assert set(served) == set(local)
            for out_name, want in local.items():
                got = served[out_name]
                assert got["shape"] == list(want.shape), out_name
                if want.dtype == object:
                    assert got["data"] == [str(x) for x in want.reshape(-1)], out_name
                else:
                    values = np.array(got["data"], dtype=want.dtype).reshape(want.shape)
                    np.testing.assert_array_equal(values, want, err_msg=out_name)
        finally:
            stop_background(root / "state")


def test_the_v2_codec_reads_uint64_values_above_the_int64_range():
    """JSON integers up to 2**64 - 1 are valid UINT64 data; numpy alone would read a mix of
    them and smaller ones as float64 (and the codec then refused them as non-integers)."""
    from onnxflow.serving.tensors import TensorSpec, array_from_json

    spec = TensorSpec("u64", "UINT64", (-1, 3))
    values = [[2**64 - 1, 5, 2**63], [0, 1, 2]]
    array = array_from_json(spec, values, (2, 3))
    assert array.dtype == np.uint64 and array.tolist() == values

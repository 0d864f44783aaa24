"""The neutral request: REST and gRPC read into one ``InferRequest``, bound by one set of
V2 rules (plain functions, no server); the ``serve`` options derived from the settings."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2

from onnxflow.serving.errors import BadInput, RequestError
from onnxflow.serving.inference import InferRequest, bind, output_tensors
from onnxflow.serving.settings import ServingSettings
from onnxflow.serving.tensors import TensorSpec

INPUTS = (TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,)))
OUTPUTS = (TensorSpec("y", "FP32", (-1, 2)), TensorSpec("label", "INT64", (-1,)))
MODEL = SimpleNamespace(
    name="m",
    version="3",
    input_by_name={s.name: s for s in INPUTS},
    output_by_name={s.name: s for s in OUTPUTS},
    output_names=[s.name for s in OUTPUTS],
)
A = np.array([[1.5, 2.5]], np.float32)
B = np.array([7], np.int64)


def rest(inputs=None, outputs=None, parameters=None, binary=False) -> InferRequest:
    """A REST body with ``inputs`` as (name, datatype, shape, array) tuples."""
    items, blobs = [], []
    for name, datatype, shape, array in inputs:
        item = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blobs.append(array.tobytes())
            item["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            item["data"] = array.reshape(-1).tolist()
        items.append(item)
    body = {"inputs": items}
    if outputs is not None:
        body["outputs"] = [{"name": n, "parameters": p} for n, p in outputs]
    if parameters:
        body["parameters"] = parameters
    header = orjson.dumps(body)
    return InferRequest.from_rest(header + b"".join(blobs), str(len(header)) if binary else None)


def grpc(inputs=None, outputs=None, parameters=None, binary=True) -> InferRequest:
    """The same request as a ``ModelInferRequest`` (raw contents, or typed ones)."""
    message = service_pb2.ModelInferRequest(model_name="m")
    for name, datatype, shape, array in inputs:
        tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
        if binary:
            message.raw_input_contents.append(array.tobytes())
        elif datatype == "FP32":
            tensor.contents.fp32_contents.extend(array.reshape(-1).tolist())
        else:
            tensor.contents.int64_contents.extend(array.reshape(-1).tolist())
    for name, params in outputs or ():
        output = message.outputs.add(name=name)
        for key, value in params.items():
            output.parameters[key].bool_param = value
    for key, value in (parameters or {}).items():
        message.parameters[key].bool_param = value
    return InferRequest.from_grpc(
        service_pb2.ModelInferRequest.FromString(message.SerializeToString())
    )


GOOD = [("a", "FP32", [1, 2], A), ("b", "INT64", [1], B)]


@pytest.mark.parametrize("read", [rest, grpc])
@pytest.mark.parametrize("binary", [False, True])
def test_both_fronts_bind_to_the_same_feeds(read, binary):
    bound = bind(read(GOOD, binary=binary), MODEL, 1 << 20)
    assert set(bound.feeds) == {"a", "b"}
    np.testing.assert_array_equal(bound.feeds["a"], A)
    np.testing.assert_array_equal(bound.feeds["b"], B)
    assert [name for name, _ in bound.outputs] == ["y", "label"]  # every output by default


@pytest.mark.parametrize(
    "inputs, outputs, message",
    [
        ([("c", "FP32", [1, 2], A), GOOD[1]], None, "unknown input 'c'; model inputs: a, b"),
        ([GOOD[0]], None, "missing input(s) 'b'"),
        ([("a", "INT64", [1, 2], A.astype(np.int64)), GOOD[1]], None, "wrong datatype INT64"),
        ([("a", "FP32", [1, 3], np.zeros((1, 3), np.float32)), GOOD[1]], None, "dimension 1"),
        ([GOOD[0], GOOD[0], GOOD[1]], None, "input 'a' is given twice"),
        (GOOD, [("z", {})], "unknown output 'z'; model outputs: y, label"),
        (GOOD, [("y", {"classification": True})], "parameter 'classification' is not supported"),
        (GOOD, [("y", {"shared_memory_region": True})], "system shared-memory extension"),
    ],
)
def test_both_fronts_refuse_alike(inputs, outputs, message):
    """One rule, one message, whichever front: the V2 rules are written once."""
    answers = []
    for read in (rest, grpc):
        with pytest.raises(RequestError) as refused:  # a 400 / INVALID_ARGUMENT
            bind(read(inputs, outputs), MODEL, 1 << 20)
        answers.append(str(refused.value))
    assert message in answers[0]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("read", [rest, grpc])
def test_requested_outputs_in_order_once(read):
    bound = bind(read(GOOD, [("label", {}), ("y", {}), ("label", {})]), MODEL, 1 << 20)
    assert [name for name, _ in bound.outputs] == ["label", "y"]
    results = [np.ones((1, 2), np.float32), np.array([1], np.int64)]
    tensors = output_tensors(MODEL, bound, results)
    assert [(t.name, t.datatype) for t in tensors] == [("label", "INT64"), ("y", "FP32")]
    assert tensors[0].parameters is None  # not in shared memory


def test_rest_binary_data_rules_stay_with_rest():
    header = orjson.dumps({"inputs": [{**_item("a", A), "parameters": {"binary_data_size": 99}}]})
    with pytest.raises(BadInput, match="runs past"):
        InferRequest.from_rest(header + A.tobytes(), str(len(header)))
    message = service_pb2.ModelInferRequest(inputs=[{"name": "a", "datatype": "FP32"}])
    message.raw_input_contents.extend([b"", b""])
    with pytest.raises(BadInput, match="2 raw_input_contents for 1 inputs"):
        InferRequest.from_grpc(message)


def _item(name, array):
    return {"name": name, "datatype": "FP32", "shape": list(array.shape)}


def test_every_serve_option_comes_from_the_settings():
    """Declared once: the CLI's `serve` options are the settings' fields, no more, no less."""
    from onnxflow.cli import serve

    options = inspect.signature(serve).parameters
    assert list(options) == list(ServingSettings.model_fields)
    assert "tracking_uri" in options and "canary_alias" in options


def test_the_tracking_uri_is_read_once_into_the_settings(monkeypatch):
    monkeypatch.delenv("ONNXFLOW_SERVE_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///a.db")
    assert ServingSettings().tracking_uri == "sqlite:///a.db"
    monkeypatch.setenv("ONNXFLOW_SERVE_TRACKING_URI", "http://registry:5000")
    assert ServingSettings().tracking_uri == "http://registry:5000"
    assert ServingSettings(tracking_uri="sqlite:///b.db").tracking_uri == "sqlite:///b.db"

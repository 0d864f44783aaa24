"""KServe V2 over REST, through a real third-party client (tritonclient) and raw HTTP."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton

from tests.serving import models

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


#: The V2 datatype of each input of the ``multi`` model (:func:`models.multi_example`).
MULTI_DATATYPES = {
    "x": "FP32",
    "mask": "BOOL",
    "ids": "INT32",
    "half": "FP16",
    "small": "UINT8",
    "wide": "FP64",
    "names": "BYTES",
}


def _client(endpoint):
    return triton.InferenceServerClient(endpoint.url.removeprefix("http://"))


def test_health_and_server_metadata(digits):
    client = _client(digits)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "7")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata(digits):
    meta = _client(digits).get_model_metadata("digits")
    assert meta["name"] == "digits"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert len(meta["parameters"]["onnx_sha256"]) == 64
    assert meta["parameters"]["tags"]["source_framework"] == "onnx-helper"
    versioned = _client(digits).get_model_metadata("digits", "1")
    assert versioned["inputs"] == meta["inputs"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnxruntime(digits, local_session, binary):
    x = np.random.default_rng(3).normal(size=(5, 64)).astype(np.float32)
    expected = local_session("mlp").run(None, {"features": x})[0]
    inp = triton.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("logits", binary_data=binary)
    result = _client(digits).infer("digits", [inp], outputs=[out], request_id="req-1")
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["model_version"] == "1"
    assert response["id"] == "req-1"


def test_infer_default_outputs_are_binary(digits, local_session):
    """tritonclient asks for binary_data_output when no outputs are listed."""
    x = np.ones((2, 64), np.float32)
    inp = triton.InferInput("features", [2, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = _client(digits).infer("digits", [inp], model_version="1")
    assert result.get_output("logits")["parameters"]["binary_data_size"] == 2 * 10 * 4
    np.testing.assert_allclose(
        result.as_numpy("logits"), local_session("mlp").run(None, {"features": x})[0], rtol=1e-5
    )


def test_every_datatype_binary_and_json(multi, local_session):
    """Seven inputs of seven datatypes (BOOL, INT32, FP16, UINT8, FP64, FP32, BYTES)."""
    example = models.multi_example(rows=3, seed=5)
    expected = dict(
        zip(
            [o.name for o in local_session("multi").get_outputs()],
            local_session("multi").run(None, example),
        )
    )
    client = _client(multi)
    for binary in (True, False):
        inputs = []
        for name, value in example.items():
            inp = triton.InferInput(name, list(value.shape), MULTI_DATATYPES[name])
            inp.set_data_from_numpy(value, binary_data=binary)
            inputs.append(inp)
        outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in expected]
        result = client.infer("multi", inputs, outputs=outputs)
        for name, want in expected.items():
            got = result.as_numpy(name)
            if want.dtype == object:
                assert [g.decode() if isinstance(g, bytes) else g for g in got] == list(want)
            else:
                assert got.dtype == want.dtype, name
                np.testing.assert_array_equal(got, want, err_msg=name)


def test_requested_outputs_subset_and_mixed_encoding(multi):
    example = models.multi_example(rows=2)
    inputs = []
    for name, value in example.items():
        inp = triton.InferInput(name, list(value.shape), MULTI_DATATYPES[name])
        inp.set_data_from_numpy(value, binary_data=name != "x")
        inputs.append(inp)
    outputs = [
        triton.InferRequestedOutput("ids_doubled", binary_data=True),
        triton.InferRequestedOutput("masked", binary_data=False),
    ]
    result = _client(multi).infer("multi", inputs, outputs=outputs)
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["ids_doubled", "masked"]
    np.testing.assert_array_equal(
        result.as_numpy("ids_doubled"), example["ids"].astype(np.int64) * 2
    )
    assert result.as_numpy("inverted") is None


def test_raw_json_nested_data_and_headers(digits, local_session):
    """Plain JSON, data nested (row-major) instead of flat; the version header is set."""
    x = np.arange(128, dtype=np.float32).reshape(2, 64) / 100
    with digits.client() as http:
        response = http.post(
            "/v2/models/digits/infer",
            json={
                "inputs": [
                    {"name": "features", "datatype": "FP32", "shape": [2, 64], "data": x.tolist()}
                ]
            },
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == "1"
    assert response.headers["x-model-name"] == "digits"
    body = response.json()
    out = body["outputs"][0]
    assert out["shape"] == [2, 10] and out["datatype"] == "FP32"
    np.testing.assert_allclose(
        np.array(out["data"]).reshape(2, 10),
        local_session("mlp").run(None, {"features": x})[0],
        rtol=1e-5,
    )


def test_raw_binary_request_per_spec(digits):
    """A hand-built binary request: JSON header, then the tensor bytes (no tritonclient)."""
    x = np.full((1, 64), 0.25, np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    with digits.client() as http:
        response = http.post(
            "/v2/models/digits/versions/1/infer",
            content=header + x.tobytes(),
            headers={
                "Inference-Header-Content-Length": str(len(header)),
                "Content-Type": "application/octet-stream",
            },
        )
    assert response.status_code == 200, response.text
    n = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 40
    logits = np.frombuffer(response.content[n:], dtype="<f4")
    assert logits.shape == (10,)


def test_bytes_binary_encoding_is_length_prefixed(multi):
    example = models.multi_example(rows=2)
    names = [b"alpha", "βeta".encode()]
    blob = b"".join(struct.pack("<I", len(n)) + n for n in names)
    inputs = [
        {
            "name": k,
            "datatype": d,
            "shape": list(example[k].shape),
            "data": example[k].ravel().tolist(),
        }
        for k, d in [
            ("x", "FP32"),
            ("mask", "BOOL"),
            ("ids", "INT32"),
            ("half", "FP16"),
            ("small", "UINT8"),
            ("wide", "FP64"),
        ]
    ]
    inputs.append(
        {
            "name": "names",
            "datatype": "BYTES",
            "shape": [2],
            "parameters": {"binary_data_size": len(blob)},
        }
    )
    header = json.dumps({"inputs": inputs, "outputs": [{"name": "names_out"}]}).encode()
    with multi.client() as http:
        response = http.post(
            "/v2/models/multi/infer",
            content=header + blob,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == ["alpha", "βeta"]


def test_openapi_describes_every_route(digits):
    from starlette.routing import Route

    from onnxflow.serving.app import create_app
    from onnxflow.serving.settings import ServingSettings

    with digits.client() as http:
        document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    app = create_app(ServingSettings())
    routes = [r for r in app.app.routes if isinstance(r, Route)]
    for route in routes:
        for method in route.methods - {"HEAD"}:
            assert method.lower() in document["paths"].get(route.path, {}), (route.path, method)
    assert set(document["paths"]) == {r.path for r in routes}

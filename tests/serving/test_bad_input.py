"""Bad input: a 4xx JSON error that names the problem, never a 5xx; the server keeps serving."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from tests.serving.models import binary_header

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GOOD = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}


def _input(**changes):
    item = {**GOOD["inputs"][0], **changes}
    return {"inputs": [item]}


V2_CASES = {
    # case: (body or raw bytes, extra headers, status, words the message must contain)
    "malformed-json": (b'{"inputs": [', {}, 400, ["malformed JSON"]),
    "not-an-object": (b"[1, 2]", {}, 400, ["JSON object"]),
    "no-inputs": ({"outputs": []}, {}, 400, ["inputs"]),
    "missing-input": (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]},
        {},
        400,
        ["unknown input 'x'"],
    ),
    "extra-input": (
        {
            "inputs": [
                GOOD["inputs"][0],
                {"name": "extra", "datatype": "FP32", "shape": [1], "data": [1]},
            ]
        },
        {},
        400,
        ["unknown input 'extra'"],
    ),
    "duplicate-input": (
        {"inputs": [GOOD["inputs"][0], GOOD["inputs"][0]]},
        {},
        400,
        ["given twice"],
    ),
    "wrong-datatype": (
        _input(datatype="INT64", data=[1] * 64),
        {},
        400,
        ["wrong datatype INT64", "FP32"],
    ),
    "unknown-datatype": (_input(datatype="FLOAT"), {}, 400, ["unknown datatype 'FLOAT'"]),
    "shape-vs-data": (_input(shape=[2, 64]), {}, 400, ["needs 128 values", "has 64"]),
    "shape-vs-model": (_input(shape=[1, 63], data=[0.5] * 63), {}, 400, ["dimension 1 must be 64"]),
    "rank-vs-model": (_input(shape=[64]), {}, 400, ["expected 2 dimensions"]),
    "negative-dim": (_input(shape=[-1, 64]), {}, 400, ["negative"]),
    "shape-not-ints": (_input(shape=["1", 64]), {}, 400, ["list of integers"]),
    "non-numeric": (_input(data=["a"] * 64), {}, 400, ["must be numbers", "strings"]),
    "null-values": (_input(data=[None] * 64), {}, 400, ["must be numbers"]),
    "ragged-data": (_input(data=[[0.5] * 64, [0.5]]), {}, 400, ["rectangular"]),
    "no-data": (
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 64]}]},
        {},
        400,
        ["neither data nor"],
    ),
    "unknown-output": ({**GOOD, "outputs": [{"name": "nope"}]}, {}, 400, ["unknown output 'nope'"]),
    "huge-declared-shape": (
        _input(shape=[1_000_000_000, 64]),
        {},
        413,
        ["needs 256000000000 bytes", "limit"],
    ),
    "shared-memory": (_input(parameters={"shared_memory_region": "r"}), {}, 400, ["not supported"]),
    "wrong-content-type": (GOOD, {"content-type": "text/plain"}, 415, ["Content-Type"]),
    "bad-header-length": (
        GOOD,
        {"inference-header-content-length": "99999"},
        400,
        ["Inference-Header-Content-Length"],
    ),
}


@pytest.mark.parametrize("case", list(V2_CASES), ids=list(V2_CASES))
def test_v2_bad_input(digits, case):
    body, headers, status, words = V2_CASES[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **headers}
    with digits.client() as http:
        response = http.post("/v2/models/digits/infer", content=content, headers=headers)
        assert response.status_code == status, response.text
        message = response.json()["error"]
        for word in words:
            assert word in message, message
        assert http.post("/v2/models/digits/infer", json=GOOD).status_code == 200


def test_binary_size_mismatch(digits):
    header = binary_header("features", [1, 64], 100)
    with digits.client() as http:
        short = http.post(
            "/v2/models/digits/infer",
            content=header + bytes(100),
            headers={"inference-header-content-length": str(len(header))},
        )
        header = header.replace(b"100", b"256")
        extra = http.post(
            "/v2/models/digits/infer",
            content=header + bytes(300),
            headers={"inference-header-content-length": str(len(header))},
        )
    assert short.status_code == 400 and "needs 256 bytes" in short.json()["error"]
    assert extra.status_code == 400 and "belong to no input" in extra.json()["error"]


def test_unknown_model_and_version_are_404(digits):
    with digits.client() as http:
        unknown = http.post("/v2/models/nope/infer", json=GOOD)
        version = http.post("/v2/models/digits/versions/9/infer", json=GOOD)
        meta = http.get("/v2/models/nope")
        route = http.get("/v3/whatever")
    assert (
        unknown.status_code == 404
        and "Request for unknown model: 'nope'" in unknown.json()["error"]
    )
    assert version.status_code == 404 and "version 9" in version.json()["error"]
    assert meta.status_code == 404
    assert route.status_code == 404 and "error" in route.json()


def test_wrong_method_is_405(digits):
    with digits.client() as http:
        infer = http.get("/v2/models/digits/infer")
        invocations = http.get("/invocations")
        health = http.post("/v2/health/live")
    for response in (infer, invocations, health):
        assert response.status_code == 405, response.text
        assert "not allowed" in response.json()["error"]


def test_body_over_limit_is_413(digits):
    big = b"[" + b"0," * (9 << 20) + b"0]"  # 18 MiB > 16 MiB default
    with digits.client() as http:
        response = http.post(
            "/invocations", content=big, headers={"content-type": "application/json"}
        )
        chunked = http.post(
            "/invocations",
            content=iter([big[: 1 << 20], big[1 << 20 :]]),
            headers={"content-type": "application/json"},
        )
        assert http.post("/v2/models/digits/infer", json=GOOD).status_code == 200
    assert response.status_code == 413, response.text
    assert "limit" in response.json()["error"]
    assert chunked.status_code == 413, chunked.text


def test_gzip_bomb_is_413(digits):
    bomb = gzip.compress(b" " * (40 << 20))
    with digits.client() as http:
        response = http.post(
            "/v2/models/digits/infer", content=bomb, headers={"content-encoding": "gzip"}
        )
    assert response.status_code == 413, response.text


def test_gzip_request_is_accepted(digits):
    with digits.client() as http:
        response = http.post(
            "/v2/models/digits/infer",
            content=gzip.compress(json.dumps(GOOD).encode()),
            headers={"content-encoding": "gzip"},
        )
    assert response.status_code == 200, response.text


INVOCATION_CASES = {
    "malformed-json": (b"{", "application/json", 400, ["malformed JSON"]),
    "no-format-key": (b'{"data": [1]}', "application/json", 400, ["exactly one of"]),
    "two-format-keys": (
        json.dumps({"inputs": [[0.5] * 64], "instances": [[0.5] * 64]}),
        "application/json",
        400,
        ["exactly one of"],
    ),
    "wrong-width": (
        json.dumps({"inputs": [[0.5] * 63]}),
        "application/json",
        400,
        ["expected shape [-1, 64]"],
    ),
    "non-numeric": (
        json.dumps({"inputs": [["x"] * 64]}),
        "application/json",
        400,
        ["'x' is not a number"],
    ),
    "missing-named": (
        json.dumps({"inputs": {"other": [[0.5] * 64]}}),
        "application/json",
        400,
        ["missing 'features'", "unknown 'other'"],
    ),
    "wrong-columns": (
        json.dumps({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}),
        "application/json",
        400,
        ["2 dataframe columns"],
    ),
    "no-content-type": (json.dumps({"inputs": [[0.5] * 64]}), None, 415, ["Content-Type"]),
    "form-content-type": (b"a=1", "application/x-www-form-urlencoded", 415, ["Content-Type"]),
    "csv-text": (
        ",".join(f"f{i}" for i in range(64)) + "\n" + ",".join("x" * 64),
        "text/csv",
        400,
        ["line 2, column 'f0': 'x' is not a FP32 value"],
    ),
}


@pytest.mark.parametrize("case", list(INVOCATION_CASES), ids=list(INVOCATION_CASES))
def test_invocations_bad_input(digits, case):
    body, ctype, status, words = INVOCATION_CASES[case]
    headers = {"content-type": ctype} if ctype else {}
    with digits.client() as http:
        response = http.post("/invocations", content=body, headers=headers)
        assert response.status_code == status, response.text
        for word in words:
            assert word in response.json()["error"], response.json()["error"]
        assert http.post("/invocations", json={"inputs": [[0.5] * 64]}).status_code == 200


def test_out_of_range_integers_and_bool_bytes(multi):
    example = {
        "x": [[0.0] * 3],
        "mask": [[True] * 3],
        "ids": [[1, 2]],
        "half": [[1.0, 2.0]],
        "small": [[300, 1]],
        "wide": [[1.0]],
        "names": ["a"],
    }
    with multi.client() as http:
        too_big = http.post("/invocations", json={"inputs": example})
        bools = http.post(
            "/invocations", json={"inputs": {**example, "small": [[1, 2]], "mask": [[1, 0, 1]]}}
        )
        strings = http.post(
            "/invocations", json={"inputs": {**example, "small": [[1, 2]], "names": [3]}}
        )
    assert too_big.status_code == 400 and "do not fit UINT8" in too_big.json()["error"]
    assert bools.status_code == 400 and "true or false" in bools.json()["error"]
    assert strings.status_code == 400 and "must be strings" in strings.json()["error"]


def test_no_5xx_in_metrics(digits):
    with digits.client() as http:
        text = http.get("/metrics").text
    lines = [
        line
        for line in text.splitlines()  # (readiness is 503 until loaded)
        if line.startswith("onnxflow_requests_total")
        and 'status="5' in line
        and "/health/ready" not in line
    ]
    assert lines == [], lines
    assert (
        'onnxflow_requests_total{method="POST",route="/v2/models/{name}/infer",status="400"}'
    ) in text


def test_server_still_answers_correctly(digits, local_session):
    x = np.full((1, 64), 0.5, np.float32)
    with digits.client() as http:
        body = http.post("/v2/models/digits/infer", json=GOOD).json()
    np.testing.assert_allclose(
        body["outputs"][0]["data"], local_session("mlp").run(None, {"features": x})[0][0], rtol=1e-5
    )

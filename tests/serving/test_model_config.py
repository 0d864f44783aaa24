"""Triton's model config: ``GET /v2/models/NAME/config`` and gRPC ``ModelConfig``, and the
config override a load may carry (``max_batch_size``, enforced per request and by the
dynamic batcher; other fields and model files refused by name), against a real endpoint
process serving ``digits`` (features[batch, 64] -> logits[batch, 10]) with a token,
dynamic batching (up to 32 rows) and gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import re

import numpy as np
import pytest

from onnxflow.serving.batching import Batcher, _Pending
from onnxflow.serving.errors import BadInput
from onnxflow.serving.model_config import ConfigOverride, parse_load_parameters
from tests.serving.conftest import TOKEN, serving


def auth() -> dict[str, str]:
    """The token header, fresh per call (tritonclient.http adds its own to the dict)."""
    return {"authorization": f"Bearer {TOKEN}"}


# --- the parsing, as plain functions ---------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({}, None),
        ({"config": "{}"}, ConfigOverride(0)),
        ({"config": '{"max_batch_size": 16}'}, ConfigOverride(16)),
        ({"config": '{"max_batch_size":"16"}'}, ConfigOverride(16)),  # protobuf JSON int64
    ],
)
def test_load_parameters_accepted(parameters, expected):
    assert parse_load_parameters("m", parameters) == expected


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            {"config": '"parameters": {"config": {{"max_batch_size": "16"}}}'},
            "failed to load 'm': the config is not valid JSON: Extra data",
        ),
        ({"config": "[16]"}, "failed to load 'm': the config is not valid JSON: expected an"),
        (
            {"config": '{"max_batch_size": 4, "instance_group": [], "name": "m"}'},
            "failed to load 'm': config fields not supported: ['instance_group', 'name'] "
            "(supported: max_batch_size)",
        ),
        ({"config": '{"max_batch_size": -1}'}, "max_batch_size must be a whole number >= 0"),
        ({"config": '{"max_batch_size": "x"}'}, "max_batch_size must be a whole number >= 0"),
        ({"config": "{}", "file:" + "A" * 256: b"a"}, "Invalid file path: 'AAAA"),
        ({"file:1/../../etc/passwd": b"a"}, "Invalid file path: '1/../../etc/passwd'"),
        (
            {"config": "{}", "file:1/model.onnx": b"a"},
            "failed to load 'm': model files cannot be uploaded: models come from the registry",
        ),
        ({"unload_dependents": True}, "load parameters not supported: ['unload_dependents']"),
    ],
)
def test_load_parameters_refused(parameters, message):
    with pytest.raises(BadInput) as refused:
        parse_load_parameters("m", parameters)
    assert str(refused.value).startswith(message) or message in str(refused.value), refused.value


def test_batcher_never_merges_past_a_models_own_limit():
    async def take() -> list[int]:
        loop = asyncio.get_running_loop()
        batcher = Batcher(32, 10, metrics=None, executor=None)
        for limit in (8, 8, 8, 0, 0):  # three requests under a limit of 8, two without
            future = loop.create_future()
            batcher._queue.append(_Pending(None, {}, 4, ("m", limit), future, limit or 32))
        sizes = []
        while batcher._queue:
            sizes.append(sum(p.rows for p in batcher._take()))
        return sizes

    assert asyncio.run(take()) == [8, 4, 8]


# --- against a real endpoint --------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint(registry, registered, tmp_path_factory):
    root = tmp_path_factory.mktemp("model-config")
    with serving(
        registry,
        root,
        "digits",
        model="digits@champion",
        token=TOKEN,
        max_batch_size=32,
        max_batch_delay_ms=50,
        inference_threads=1,
    ) as running:
        yield running


def _clients(endpoint):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(endpoint.url.removeprefix("http://"), concurrency=8)
    return http, grpcclient.InferenceServerClient(endpoint.grpc)


def _features(rows: int) -> list:
    import tritonclient.http as httpclient

    features = httpclient.InferInput("features", [rows, 64], "FP32")
    features.set_data_from_numpy(np.ones((rows, 64), np.float32))
    return [features]


def _infer(http, rows: int):
    return http.infer("digits", _features(rows), headers=auth())


def _runs_over(endpoint, rows: int) -> float:
    """onnxruntime runs (merged batches included) of more than ``rows`` rows so far."""
    with endpoint.client() as http:
        text = http.get("/metrics").text
    buckets = dict(re.findall(r'onnxflow_batch_rows_bucket\{le="([^"]+)"\} (\S+)', text))
    return float(buckets["+Inf"]) - float(buckets[f"{float(rows)}"])


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_config_route_rest_and_grpc(endpoint):
    _, grpc = _clients(endpoint)
    with endpoint.client() as http:
        config = http.get("/v2/models/digits/config")
        assert config.status_code == 200, config.text
        assert http.get("/v2/models/digits/versions/1/config").json() == config.json()
        assert (
            http.get("/v2/models/digits/config", headers={"authorization": ""}).status_code == 401
        )
        assert http.get("/v2/models/nope/config").status_code == 404
    assert config.json() == {
        "name": "digits",
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 0,
        "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [-1, 64]}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [-1, 10]}],
    }
    over_grpc = grpc.get_model_config("digits", headers=auth()).config
    assert over_grpc.max_batch_size == 0 and over_grpc.backend == "onnxruntime"
    assert [(t.name, list(t.dims)) for t in over_grpc.input] == [("features", [-1, 64])]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_override_is_enforced_until_unload(endpoint):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    http, grpc = _clients(endpoint)
    with pytest.raises(InferenceServerException, match="missing or wrong bearer token"):
        http.load_model("digits", config='{"max_batch_size": 16}')
    http.load_model("digits", config='{"max_batch_size":"16"}', headers=auth())
    config = http.get_model_config("digits", headers=auth())
    assert config["max_batch_size"] == 16
    assert config["input"][0]["dims"] == [64]  # the batch dimension left out, as Triton does
    assert grpc.get_model_config("digits", headers=auth()).config.max_batch_size == 16
    assert _infer(http, 16).as_numpy("logits").shape == (16, 10)
    with pytest.raises(InferenceServerException) as refused:
        _infer(http, 17)
    assert (
        "a batch of 17 rows is over max_batch_size 16 of model 'digits'" in refused.value.message()
    )
    assert refused.value.status() == "400"
    features = grpcclient.InferInput("features", [17, 64], "FP32")
    features.set_data_from_numpy(np.ones((17, 64), np.float32))
    with pytest.raises(InferenceServerException, match="over max_batch_size 16") as refused:
        grpc.infer("digits", [features], headers=auth())
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"

    # the batcher merges at most 8 rows for digits now (32 for the endpoint)
    grpc.load_model("digits", config='{"max_batch_size": 8}', headers=auth())
    before = _runs_over(endpoint, 8)
    pending = [http.async_infer("digits", _features(4), headers=auth()) for _ in range(32)]
    shapes = [p.get_result().as_numpy("logits").shape for p in pending]
    assert shapes == [(4, 10)] * 32
    assert _runs_over(endpoint, 8) == before
    assert _runs_over(endpoint, 4) > 0  # and it did merge

    http.unload_model("digits", headers=auth())
    http.load_model("digits", headers=auth())
    assert http.get_model_config("digits", headers=auth())["max_batch_size"] == 0
    assert _infer(http, 17).as_numpy("logits").shape == (17, 10)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_refused_loads_name_the_problem_and_change_nothing(endpoint):
    from tritonclient.utils import InferenceServerException

    http, grpc = _clients(endpoint)
    refusals = [
        ('"parameters": {"config": {{"max_batch_size": "16"}}}', {}, "not valid JSON"),
        ('{"max_batch_size": 4, "dynamic_batching": {}}', {}, "config fields not supported"),
        ("{}", {"file:" + "A" * 256: b"a"}, "Invalid file path"),
        ("{}", {"file:../model.onnx": b"a"}, "Invalid file path"),
        ("{}", {"file:1/model.onnx": b"a"}, "model files cannot be uploaded"),
    ]
    for config, files, message in refusals:
        with pytest.raises(InferenceServerException) as refused:
            grpc.load_model("digits", config=config, files=files or None, headers=auth())
        assert message in refused.value.message(), refused.value
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        # REST: the same body tritonclient.http builds (its load_model cannot send files:
        # it puts base64 bytes into json.dumps)
        parameters = {"config": config}
        parameters |= {k: base64.b64encode(v).decode() for k, v in files.items()}
        with endpoint.client() as raw:
            answer = raw.post("/v2/repository/models/digits/load", json={"parameters": parameters})
        assert answer.status_code == 400 and message in answer.json()["error"], answer.text
        if message != "Invalid file path":
            assert answer.json()["error"].startswith("failed to load 'digits': ")
    assert http.is_server_live() and http.is_model_ready("digits", headers=auth())
    assert http.get_model_config("digits", headers=auth())["max_batch_size"] == 0
    with endpoint.client() as raw:
        body = raw.post("/v2/repository/models/digits/load", content=b"[1]")
    assert body.status_code == 400 and "JSON object" in body.json()["error"]

"""V2 gRPC (Triton's / KServe's GRPCInferenceService) against a real endpoint process,
with ``tritonclient.grpc``: health, metadata, inference (raw and typed contents), the
token as ``authorization`` metadata, the size limit, errors as gRPC status codes.

The endpoint serves Triton's example models ``simple``, ``simple_string`` and
``simple_identity`` (built with onnx.helper, registered in the session registry) and
``digits``, over REST and gRPC; a second one serves ``simple`` with a token.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.serving import models
from tests.serving.conftest import TOKEN, serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRITON_MODELS = ("simple", "simple_string", "simple_identity")


@pytest.fixture(scope="session")
def triton_registered(registry, registered, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("triton-models")
    examples = models.triton_examples()
    return {
        name: registry.register(
            name, getattr(models, f"triton_{name}")(root / name / "model.onnx"), examples[name]
        )
        for name in TRITON_MODELS
    }


@pytest.fixture(scope="session")
def triton_endpoint(registry, triton_registered, tmp_path_factory):
    """One endpoint, no token: every Triton example model plus digits, REST and gRPC."""
    root = tmp_path_factory.mktemp("triton-endpoint")
    refs = ",".join(f"{n}@champion" for n in (*TRITON_MODELS, "digits"))
    with serving(registry, root, "simple", model=refs) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def guarded(registry, triton_registered, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-guarded")
    with serving(
        registry,
        root,
        "simple",
        model="simple@champion",
        token=TOKEN,
        max_body_bytes=4096,
        shared_memory=True,
    ) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def batching(registry, registered, tmp_path_factory):
    """digits with dynamic batching: a batch of 8 rows, waiting up to 2 s to fill."""
    root = tmp_path_factory.mktemp("grpc-batching")
    with serving(
        registry,
        root,
        "digits",
        model="digits@champion",
        max_batch_size=8,
        max_batch_delay_ms=2000,
        inference_threads=1,
    ) as endpoint:
        yield endpoint


def test_health_and_metadata(triton_endpoint):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_endpoint.grpc)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("simple") and not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server.name == "onnxflow" and "binary_tensor_data" in server.extensions
    meta = client.get_model_metadata("simple", as_json=True)
    assert meta["name"] == "simple" and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT0", "INT32", ["1", "16"]),
        ("INPUT1", "INT32", ["1", "16"]),
    ]
    config = client.get_model_config("simple", as_json=True)["config"]
    assert config["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in config["input"]] == ["INPUT0", "INPUT1"]
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {m["name"] for m in index} == {*TRITON_MODELS, "digits"}
    assert all(m["state"] == "READY" for m in index)


def test_infer_raw_and_typed_contents(triton_endpoint):
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2

    client = grpcclient.InferenceServerClient(triton_endpoint.grpc)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    result = client.infer(
        "simple",
        models.simple_inputs(grpcclient, a, b),
        request_id="r1",
        outputs=[grpcclient.InferRequestedOutput("OUTPUT1")],
    )
    assert result.get_response().id == "r1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None  # only what was asked for
    both = client.infer("simple", models.simple_inputs(grpcclient, a, b))
    np.testing.assert_array_equal(both.as_numpy("OUTPUT0"), a + b)
    assert both.get_response().model_version == "1"

    # typed contents instead of raw bytes (what other KServe clients send)
    request = service_pb2.ModelInferRequest(model_name="simple")
    for name, values in (("INPUT0", a), ("INPUT1", b)):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend(values.ravel().tolist())
    response = client._client_stub.ModelInfer(request)
    sums = np.frombuffer(response.raw_output_contents[0], dtype="<i4").reshape(1, 16)
    np.testing.assert_array_equal(sums, a + b)


def test_strings_over_grpc(triton_endpoint):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_endpoint.grpc)
    a = np.array([[str(i) for i in range(16)]], dtype=object)
    b = np.array([["1"] * 16], dtype=object)
    inputs = [
        grpcclient.InferInput("INPUT0", [1, 16], "BYTES"),
        grpcclient.InferInput("INPUT1", [1, 16], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("simple_string", inputs)
    assert [int(x) for x in result.as_numpy("OUTPUT0").ravel()] == [i + 1 for i in range(16)]
    identity = grpcclient.InferInput("INPUT0", [1, 2], "BYTES")
    identity.set_data_from_numpy(np.array([[b"hello", "wörld".encode()]], dtype=object))
    echoed = client.infer("simple_identity", [identity]).as_numpy("OUTPUT0")
    assert echoed.tolist() == [[b"hello", "wörld".encode()]]


def test_errors_are_grpc_status_codes_naming_the_problem(triton_endpoint):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(triton_endpoint.grpc)
    a = np.zeros((1, 16), np.int32)
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", models.simple_inputs(grpcclient, a, a))
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'nope'" in unknown.value.message()
    wrong = grpcclient.InferInput("INPUT0", [2, 16], "INT32")
    wrong.set_data_from_numpy(np.zeros((2, 16), np.int32))
    with pytest.raises(InferenceServerException) as shape:
        client.infer("simple", [wrong, models.simple_inputs(grpcclient, a, a)[1]])
    assert shape.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT0" in shape.value.message() and "dimension 0 must be 1" in shape.value.message()
    floats = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as datatype:
        client.infer("simple", [floats, models.simple_inputs(grpcclient, a, a)[1]])
    assert "wrong datatype FP32" in datatype.value.message()
    with pytest.raises(InferenceServerException) as missing:
        client.infer("simple", models.simple_inputs(grpcclient, a, a)[:1])
    assert "missing input(s) 'INPUT1'" in missing.value.message()
    assert client.is_server_live()  # and it keeps serving


def test_token_as_metadata_and_the_size_limit(guarded):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(guarded.grpc)
    a = np.ones((1, 16), np.int32)
    assert client.is_server_ready()  # probes stay open, as over REST
    with pytest.raises(InferenceServerException) as refused:
        client.infer("simple", models.simple_inputs(grpcclient, a, a))
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as wrong:
        client.infer(
            "simple",
            models.simple_inputs(grpcclient, a, a),
            headers={"authorization": "Bearer not-the-token"},
        )
    assert wrong.value.status() == "StatusCode.UNAUTHENTICATED"
    ok = client.infer(
        "simple",
        models.simple_inputs(grpcclient, a, a),
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    np.testing.assert_array_equal(ok.as_numpy("OUTPUT0"), a + a)

    big = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    big._raw_content = b"\0" * 200_000  # far over the 4096-byte limit of this endpoint
    with pytest.raises(InferenceServerException) as too_big:
        client.infer(
            "simple",
            [big, models.simple_inputs(grpcclient, a, a)[1]],
            headers={"authorization": f"Bearer {TOKEN}"},
        )
    assert too_big.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.is_server_live()


def test_shared_memory_registration_needs_the_token(guarded):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    auth = {"authorization": f"Bearer {TOKEN}"}
    http = httpclient.InferenceServerClient(guarded.url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(guarded.grpc)
    for client in (http, grpc):
        for call, args in (
            (client.register_system_shared_memory, ("r", "/onnxflow-any", 8)),
            (client.unregister_system_shared_memory, ()),
            (client.get_system_shared_memory_status, ()),
        ):
            with pytest.raises(InferenceServerException, match="bearer token"):
                call(*args)
        client.unregister_system_shared_memory(headers=auth)
        with pytest.raises(InferenceServerException, match="no shared-memory object"):
            client.register_system_shared_memory("r", "/onnxflow-no-such-object", 8, headers=auth)


# --- Triton's extensions, as its example clients use them (simple_http_model_control.py,
# --- simple_http_health_metadata.py's statistics, and their gRPC twins) -------------------


def test_statistics_count_successes_and_failures_per_version(triton_endpoint):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(triton_endpoint.url.removeprefix("http://"))
    before = http.get_inference_statistics("simple")["model_stats"][0]
    a = np.ones((1, 16), np.int32)
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "INT32"),
        httpclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    for tensor in inputs:
        tensor.set_data_from_numpy(a)
    for _ in range(3):
        http.infer("simple", inputs)
    bad = httpclient.InferInput("INPUT0", [1, 16], "INT32")
    bad.set_data_from_numpy(a)
    with pytest.raises(InferenceServerException):
        http.infer("simple", [bad])  # INPUT1 missing: a failure of version 1
    after = http.get_inference_statistics("simple", "1")["model_stats"][0]
    assert after["name"] == "simple" and after["version"] == "1"
    stats, old = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - old["success"]["count"] == 3
    assert stats["fail"]["count"] - old["fail"]["count"] == 1
    assert after["inference_count"] - before["inference_count"] == 3  # rows
    assert stats["compute_infer"]["ns"] > old["compute_infer"]["ns"]
    assert after["last_inference"] > 0
    every = {s["name"] for s in http.get_inference_statistics()["model_stats"]}
    assert {"simple", "digits"} <= every
    grpc_stats = grpcclient.InferenceServerClient(triton_endpoint.grpc).get_inference_statistics(
        "simple", as_json=True
    )["model_stats"][0]
    assert int(grpc_stats["inference_stats"]["success"]["count"]) >= 3
    with pytest.raises(InferenceServerException, match="Request for unknown model"):
        http.get_inference_statistics("nope")


def test_grpc_calls_answered_in_its_threads_are_counted_in_order(triton_endpoint):
    """An inline model's gRPC calls are answered in grpcio's threads and noted on the loop
    afterwards: a statistics call that follows them still sees every one of them."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(triton_endpoint.grpc)

    def counts():
        entry = client.get_inference_statistics("simple", "1", as_json=True)["model_stats"][0]
        stats = entry["inference_stats"]
        return (
            int(stats.get("success", {}).get("count", 0)),
            int(stats.get("fail", {}).get("count", 0)),
            int(entry.get("inference_count", 0)),
        )

    before = counts()
    inputs = [grpcclient.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in (0, 1)]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 16), np.int32))
    for _ in range(5):
        client.infer("simple", inputs)
    with pytest.raises(InferenceServerException, match="INPUT1"):
        client.infer("simple", inputs[:1])
    after = counts()
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (5, 1, 5)


def test_model_control_unload_and_load(triton_endpoint):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(triton_endpoint.url.removeprefix("http://"))
    assert http.is_model_ready("simple_identity")
    http.unload_model("simple_identity")
    assert not http.is_model_ready("simple_identity")
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index["simple_identity"]["state"] == "UNAVAILABLE"
    assert index["simple"]["state"] == "READY"
    assert http.is_server_ready()  # the others serve on
    http.load_model("simple_identity")
    assert http.is_model_ready("simple_identity")
    grpc = grpcclient.InferenceServerClient(triton_endpoint.grpc)
    grpc.unload_model("simple_identity")
    assert not grpc.is_model_ready("simple_identity")
    grpc.load_model("simple_identity")
    assert grpc.is_model_ready("simple_identity")
    with pytest.raises(InferenceServerException, match="failed to load 'no_such_model'"):
        http.load_model("no_such_model")
    extensions = http.get_server_metadata()["extensions"]
    assert {"statistics", "model_repository"} <= set(extensions)


def test_triton_http_example_clients_logic(triton_endpoint):
    """What simple_http_infer_client.py, simple_http_async_infer_client.py and
    simple_http_string_infer_client.py do, against the same process."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(
        triton_endpoint.url.removeprefix("http://"), concurrency=4
    )
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "INT32"),
        httpclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a, binary_data=False)
    inputs[1].set_data_from_numpy(b, binary_data=True)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=False),
    ]
    result = client.infer("simple", inputs, outputs=outputs, request_id="1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.get_response()["id"] == "1"

    pending = [client.async_infer("simple", inputs, request_id=str(i)) for i in range(8)]
    for request in pending:
        np.testing.assert_array_equal(request.get_result().as_numpy("OUTPUT0"), a + b)

    words = np.array([[str(i) for i in range(16)]], dtype=object)
    ones = np.array([["1"] * 16], dtype=object)
    strings = [
        httpclient.InferInput("INPUT0", [1, 16], "BYTES"),
        httpclient.InferInput("INPUT1", [1, 16], "BYTES"),
    ]
    strings[0].set_data_from_numpy(words, binary_data=True)
    strings[1].set_data_from_numpy(ones, binary_data=False)
    answer = client.infer("simple_string", strings)
    assert [int(x) for x in answer.as_numpy("OUTPUT0").ravel()] == list(range(1, 17))
    assert [int(x) for x in answer.as_numpy("OUTPUT1").ravel()] == list(range(-1, 15))
    client.close()


def _batches(endpoint) -> tuple[float, float]:
    """Merged runs so far and the requests they answered (``onnxflow_batch_requests``)."""
    with endpoint.client() as http:
        text = http.get("/metrics").text
    count = float(re.search(r"onnxflow_batch_requests_count (\S+)", text).group(1))
    total = float(re.search(r"onnxflow_batch_requests_sum (\S+)", text).group(1))
    return count, total


def test_concurrent_calls_wait_on_the_loop_together_and_share_a_batch(batching, local_session):
    """Eight gRPC calls at once are all in flight on the endpoint's loop and merge into
    full batches: grpcio's threads, each waiting for its call's coroutine, do not cap the
    calls in flight below a batch (a cap of 2 would need at least 4 runs)."""
    import tritonclient.grpc as grpcclient

    session = local_session("mlp")
    rows = [np.random.default_rng(i).normal(size=(1, 64)).astype(np.float32) for i in range(8)]
    clients = [grpcclient.InferenceServerClient(batching.grpc) for _ in rows]
    for client in clients:  # connected before the calls, so that they start together
        assert client.is_server_ready()
    runs_before, requests_before = _batches(batching)
    start = threading.Barrier(len(rows))

    def call(i: int) -> np.ndarray:
        tensor = grpcclient.InferInput("features", [1, 64], "FP32")
        tensor.set_data_from_numpy(rows[i])
        start.wait()
        return clients[i].infer("digits", [tensor]).as_numpy("logits")

    with ThreadPoolExecutor(len(rows)) as pool:
        answers = list(pool.map(call, range(len(rows))))
    for x, logits in zip(rows, answers, strict=True):
        np.testing.assert_allclose(
            logits, session.run(None, {"features": x})[0], rtol=1e-4, atol=1e-5
        )
    runs, requests = _batches(batching)
    assert requests - requests_before == len(rows)
    assert runs - runs_before < 4, f"{runs - runs_before:.0f} runs for 8 concurrent calls"

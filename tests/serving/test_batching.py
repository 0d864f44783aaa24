"""Dynamic batching: concurrent requests share runs and each caller gets exactly its rows."""

from __future__ import annotations

import concurrent.futures
import re

import numpy as np
import pytest
import tritonclient.http as triton

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _merged_runs(endpoint) -> float:
    """Sum of requests in runs that merged more than one request."""
    with endpoint.client() as http:
        text = http.get("/metrics").text
    buckets = dict(re.findall(r'onnxflow_batch_requests_bucket\{le="([^"]+)"\} (\S+)', text))
    total = float(re.search(r"onnxflow_batch_requests_count (\S+)", text).group(1))
    return total - float(buckets["1.0"])


def test_model_is_batchable(batchy):
    with batchy.client() as http:
        meta = http.get("/v2/models/digits").json()
    assert meta["parameters"]["dynamic_batching"] is True


def test_each_caller_gets_its_own_rows(batchy, local_session):
    session = local_session("mlp")
    rng = np.random.default_rng(11)
    # callers send 1 to 3 rows each, so merged batches have uneven boundaries
    requests = [rng.normal(size=(1 + i % 3, 64)).astype(np.float32) for i in range(96)]
    expected = [session.run(None, {"features": x})[0] for x in requests]
    before = _merged_runs(batchy)

    def call(i: int):
        x = requests[i]
        client = triton.InferenceServerClient(batchy.url.removeprefix("http://"))
        inp = triton.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=i % 2 == 0)
        result = client.infer("digits", [inp], request_id=str(i))
        assert result.get_response()["id"] == str(i)
        return i, result.as_numpy("logits")

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        for i, logits in pool.map(call, range(len(requests))):
            assert logits.shape == expected[i].shape
            np.testing.assert_allclose(logits, expected[i], rtol=1e-4, atol=1e-5)
    assert _merged_runs(batchy) > before, "no requests were merged into a batch"


def test_mixed_formats_and_a_bad_request_in_the_crowd(batchy, local_session):
    session = local_session("mlp")
    x = np.full((2, 64), 0.1, np.float32)
    want = session.run(None, {"features": x})[0]

    def good(_):
        with batchy.client() as http:
            response = http.post("/invocations", json={"inputs": x.tolist()})
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["predictions"]["logits"], want, rtol=1e-4)

    def bad(_):
        with batchy.client() as http:
            response = http.post("/invocations", json={"inputs": [[0.1] * 63]})
        assert response.status_code == 400

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(good if i % 4 else bad, i) for i in range(64)]
        for future in futures:
            future.result()

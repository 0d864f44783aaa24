"""Bad input at scale: every route fuzzed from the endpoint's own /openapi.json, then
hand-made hostile payloads. What must hold: no 5xx, no crash (same process throughout),
memory bounded.

The endpoint serves ``multi`` (seven inputs of seven datatypes), so generated requests
reach every decoder. Cases run with the token, positive and negative generation; the
model name path parameter is mostly pinned to the served model so requests get past the
404 and into the codec.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import Unsatisfiable

from tests.reliability.conftest import (
    PROFILE,
    TOKEN,
    RssSampler,
    endpoint_pid,
    finish,
    models,
    rss_mb,
    server_errors,
    start_endpoint,
)
from tests.serving.models import binary_header

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(900)]

#: RSS may grow this much over the start-up figure across everything this file sends
#: (bodies up to the 16 MiB limit are read; nothing larger may be buffered).
MEMORY_BOUND_MB = 256
AUTH = {"authorization": f"Bearer {TOKEN}"}
CASES = {"run": 0}


@pytest.fixture(scope="module")
def fuzzy(registry, tmp_path_factory, report):
    registry.register(
        "multi",
        models.multi_io(tmp_path_factory.mktemp("multi") / "model.onnx"),
        models.multi_example(),
    )
    endpoint = start_endpoint(
        registry,
        tmp_path_factory.mktemp("fuzzy"),
        model="multi@champion",
        poll_interval_s=2,
    )
    endpoint.pid = endpoint_pid(endpoint)
    endpoint.rss_start = rss_mb(endpoint.pid)
    yield endpoint
    finish(endpoint, report)


def _operations() -> dict:
    """The endpoint's operations, from the document it serves (checked equal below).

    Built from :func:`onnxflow.serving.openapi.openapi_document` so pytest can list one test per
    operation before the endpoint runs; schemathesis's own pytest loader does not work
    with pytest 9 (it reads ``Function._nodeid``), so cases are drawn with Hypothesis.
    """
    from onnxflow.serving.openapi import openapi_document

    schema = schemathesis.openapi.from_dict(openapi_document("multi"))
    return {op.ok().label: op.ok() for op in schema.get_all_operations()}


OPERATIONS = _operations()


def test_fuzzed_document_is_the_one_the_endpoint_serves(fuzzy):
    from onnxflow.serving.openapi import openapi_document

    assert httpx.get(f"{fuzzy.url}/openapi.json").json() == openapi_document("multi")


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_generated_requests_never_get_a_5xx(label, mode, fuzzy, report):
    from hypothesis import given
    from schemathesis import GenerationMode

    operation = OPERATIONS[label]
    strategy = operation.as_strategy(GenerationMode(mode))
    errors = []

    @given(case=strategy)
    @settings(
        max_examples=PROFILE.fuzz_per_route,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        database=None,
    )
    def run(case):
        CASES["run"] += 1
        if case.path_parameters and "name" in case.path_parameters and CASES["run"] % 5:
            case.path_parameters["name"] = fuzzy.name  # mostly past the 404, into the codec
        try:
            response = case.call(base_url=fuzzy.url, headers=AUTH, timeout=30)
        except Exception as exc:  # requests refuses some generated headers/URLs itself
            if "Invalid" in type(exc).__name__ or "InvalidHeader" in str(type(exc)):
                return
            raise
        report.count("fuzz_cases")
        if response.status_code >= 500:
            errors.append((response.status_code, response.text[:300], case.as_curl_command()))
        if label.endswith("/unload") and response.status_code == 200:  # serve on for the rest
            loaded = httpx.post(
                f"{fuzzy.url}/v2/repository/models/{fuzzy.name}/load", headers=AUTH, timeout=60
            )
            assert loaded.status_code == 200, loaded.text

    try:
        run()
    except Unsatisfiable:  # negative mode on a route with no inputs: nothing to break
        assert mode == "negative"
    assert not errors, errors[:3]


# --- hostile payloads, by hand ---------------------------------------------------------


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"1.0" + b"]" * depth


def _v2(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


X = {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}


def _hostile() -> list[tuple[str, str, dict, bytes, set[int]]]:
    """(name, path, headers, body, acceptable statuses)."""
    infer = "/v2/models/multi/infer"
    js = {"content-type": "application/json"}
    huge = 2**62
    cases = [
        (
            "nested JSON 100k deep",
            "/invocations",
            js,
            b'{"inputs": ' + _nested(100_000) + b"}",
            {400},
        ),
        (
            "nested JSON 500 deep",
            "/invocations",
            js,
            b'{"inputs": ' + _nested(500) + b"}",
            {400, 422},
        ),
        ("nested V2 data", infer, js, _v2([{**X, "data": json.loads(_nested(200))}]), {400}),
        ("huge declared shape", infer, js, _v2([{**X, "shape": [huge, 3]}]), {400, 413}),
        (
            "shape product overflows int64",
            infer,
            js,
            _v2([{**X, "shape": [huge, huge]}]),
            {400, 413},
        ),
        (
            "shape beyond 64 bits",
            infer,
            js,
            b'{"inputs":[{"name":"x","datatype":"FP32","shape":[99999999999999999999999,3],'
            b'"data":[1,2,3]}]}',
            {400, 413},
        ),
        ("negative shape", infer, js, _v2([{**X, "shape": [-1, 3]}]), {400}),
        ("NaN literal", "/invocations", js, b'{"inputs": {"x": [[NaN, 1, 2]]}}', {400}),
        ("Infinity literal", "/invocations", js, b'{"inputs": {"x": [[Infinity, 1, 2]]}}', {400}),
        (
            "1e999 overflows to inf",
            infer,
            js,
            b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":[1e999,1,2]}]}',
            {400, 422},
        ),
        ("NaN as a string", infer, js, _v2([{**X, "data": ["NaN", 1, 2]}]), {400}),
        (
            "int beyond UINT8",
            infer,
            js,
            _v2([{"name": "small", "datatype": "UINT8", "shape": [1, 2], "data": [300, -1]}]),
            {400},
        ),
        (
            "FP16 overflow",
            infer,
            js,
            _v2([{"name": "half", "datatype": "FP16", "shape": [1, 2], "data": [1e10, 1]}]),
            {400, 422},
        ),
    ]
    # The binary tensor data extension with lying header lengths.
    header = binary_header("x", [1, 3], 12)
    blob = b"\0" * 12
    octet = {"content-type": "application/octet-stream"}
    for label, value in [
        ("zero", "0"),
        ("negative", "-5"),
        ("past the body", "999999"),
        ("not a number", "abc"),
        ("short by one", str(len(header) - 1)),
        ("long by one", str(len(header) + 1)),
        ("huge", str(2**70)),
        ("empty", ""),
        ("float", "12.5"),
    ]:
        cases.append(
            (
                f"binary header length {label}",
                infer,
                {**octet, "inference-header-content-length": value},
                header + blob,
                {400},
            )
        )
    short_blob = binary_header("x", [1, 3], 1 << 40)
    cases.append(
        (
            "binary_data_size past the body",
            infer,
            {**octet, "inference-header-content-length": str(len(short_blob))},
            short_blob + blob,
            {400},
        )
    )
    cases.append(
        (
            "gzip bomb",
            "/invocations",
            {**js, "content-encoding": "gzip"},
            gzip.compress(b" " * (200 << 20)),
            {413},
        )
    )
    cases.append(
        (
            "CSV with a bare carriage return",
            "/invocations",
            {"content-type": "text/csv"},
            b"x\r1\r2",
            {400},
        )
    )
    cases.append(
        (
            "CSV field over the csv module's limit",
            "/invocations",
            {"content-type": "text/csv"},
            b"x\n" + b"1" * 200_000,
            {400},
        )
    )
    cases.append(
        ("invalid UTF-8 CSV", "/invocations", {"content-type": "text/csv"}, b"x\n\xff\xfe\n", {400})
    )
    return cases


def test_hostile_payloads_get_a_4xx_that_names_the_problem(fuzzy, report):
    with httpx.Client(base_url=fuzzy.url, headers=AUTH, timeout=60) as http:
        for name, path, headers, body, expected in _hostile():
            response = http.post(path, content=body, headers=headers)
            report.count("hostile_cases")
            assert response.status_code in expected, (
                name,
                response.status_code,
                response.text[:300],
            )
            assert response.json().get("error"), name
            assert http.get("/v2/health/live").status_code == 200, name


def test_100_mb_bodies_are_refused_without_being_buffered(fuzzy, report):
    body = b"[" + b"1.0," * (25 << 20) + b"1.0]"  # ~100 MB
    with RssSampler(fuzzy.pid, interval=0.05) as rss:
        with httpx.Client(base_url=fuzzy.url, headers=AUTH, timeout=60) as http:
            declared = http.post(
                "/invocations", content=body, headers={"content-type": "application/json"}
            )
            assert declared.status_code == 413, declared.text
            # Chunked (no Content-Length): read only up to the limit, then refused.
            try:
                streamed = http.post(
                    "/invocations",
                    content=iter([body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)]),
                    headers={"content-type": "application/json"},
                )
                assert streamed.status_code == 413, streamed.text
            except httpx.TransportError:
                pass  # the server may close the socket while we still send: that is fine
        report.count("hostile_cases", 2)
    assert rss.peak - fuzzy.rss_start < MEMORY_BOUND_MB, (fuzzy.rss_start, rss.peak)
    report.peak("peak_rss_mb", rss.peak)


def test_slow_clients_do_not_starve_the_others(fuzzy, report):
    """Clients that trickle their headers or body hold sockets, not the event loop."""
    stop = threading.Event()
    host, port = fuzzy.url.removeprefix("http://").split(":")

    def trickle(i: int) -> None:
        try:
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                head = (
                    f"POST /invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    f"{TOKEN}\r\nContent-Type: application/json\r\n"
                )
                if i % 2:  # slow body: full headers, then a byte at a time
                    sock.sendall((head + "Content-Length: 100000\r\n\r\n").encode())
                    chunk = b"["
                else:  # slow headers
                    chunk = b"X-Slow: y\r\n"
                while not stop.is_set():
                    sock.sendall(chunk)
                    stop.wait(0.5)
        except OSError:
            pass  # the server may drop a slow client: allowed

    threads = [
        threading.Thread(target=trickle, args=(i,), daemon=True)
        for i in range(PROFILE.slow_clients)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        latencies = []
        with httpx.Client(base_url=fuzzy.url, headers=AUTH, timeout=10) as http:
            example = http.get("/v2/models/multi/example").json()
            for _ in range(50):
                started = time.perf_counter()
                response = http.post("/invocations", json=example)
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    report.count("hostile_cases", PROFILE.slow_clients)
    assert sorted(latencies)[len(latencies) // 2] < 0.1, latencies


def test_after_all_that_the_same_process_serves_with_no_5xx(fuzzy, report):
    assert endpoint_pid(fuzzy) == fuzzy.pid
    assert httpx.get(f"{fuzzy.url}/v2/health/ready").status_code == 200
    assert server_errors(fuzzy) == 0
    rss = rss_mb(fuzzy.pid)
    report.peak("peak_rss_mb", rss)
    assert rss - fuzzy.rss_start < MEMORY_BOUND_MB

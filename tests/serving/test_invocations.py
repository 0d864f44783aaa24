"""MLflow's scoring format on /invocations: every payload shape `mlflow models serve` takes."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serving import models

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROWS = np.random.default_rng(7).normal(size=(3, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def expected(local_session):
    return local_session("mlp").run(None, {"features": ROWS})[0]


@pytest.mark.parametrize(
    "payload",
    [
        {"inputs": ROWS.tolist()},
        {"inputs": {"features": ROWS.tolist()}},
        {"instances": ROWS.tolist()},
        {"instances": [{"features": r} for r in ROWS.tolist()]},
        {"dataframe_split": {"columns": ["features"], "data": [[r] for r in ROWS.tolist()]}},
        {
            "dataframe_split": {
                "columns": [f"f{i}" for i in range(64)],
                "data": ROWS.tolist(),
                "index": [0, 1, 2],
            }
        },
        {"dataframe_records": [{f"f{i}": v for i, v in enumerate(r)} for r in ROWS.tolist()]},
        {"dataframe_records": [{"features": r} for r in ROWS.tolist()]},
        {"inputs": ROWS.tolist(), "params": {"ignored": True}},
    ],
    ids=[
        "inputs",
        "inputs-named",
        "instances",
        "instances-named",
        "split-named",
        "split-columns",
        "records-columns",
        "records-named",
        "params",
    ],
)
def test_payload_formats(digits, expected, payload):
    with digits.client() as http:
        response = http.post("/invocations", json=payload)
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == "1"
    logits = np.array(response.json()["predictions"]["logits"], dtype=np.float32)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_csv(digits, expected):
    header = ",".join(f"f{i}" for i in range(64))
    lines = [",".join(repr(float(v)) for v in row) for row in ROWS]
    with digits.client() as http:
        response = http.post(
            "/invocations",
            content="\n".join([header, *lines]),
            headers={"content-type": "text/csv"},
        )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["predictions"]["logits"], expected, rtol=1e-5)


def test_multi_input_model(multi, local_session):
    example = models.multi_example(rows=2, seed=9)
    session = local_session("multi")
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, example)))
    payload = {"inputs": {k: v.tolist() for k, v in example.items()}}
    with multi.client() as http:
        response = http.post("/invocations", json=payload)
        records = http.post(
            "/invocations",
            json={
                "dataframe_records": [
                    {k: v.tolist()[i] for k, v in example.items()} for i in range(2)
                ]
            },
        )
    assert response.status_code == 200, response.text
    assert records.status_code == 200, records.text
    for body in (response.json(), records.json()):
        got = body["predictions"]
        assert got["names_out"] == list(want["names_out"])
        assert got["inverted"] == want["inverted"].tolist()
        assert got["ids_doubled"] == want["ids_doubled"].tolist()
        np.testing.assert_allclose(got["half_doubled"], want["half_doubled"].astype(np.float32))


def test_example_route_is_the_registered_example(digits):
    with digits.client() as http:
        example = http.get("/v2/models/digits/example").json()
        response = http.post("/invocations", json=example)
    assert list(example) == ["inputs"]
    assert np.array(example["inputs"]).shape == (1, 64)
    assert response.status_code == 200


def test_errors_also_speak_mlflow(digits):
    with digits.client() as http:
        body = http.post("/invocations", json={"nope": 1}).json()
    assert body["error"] == body["message"]
    assert body["error_code"] == "BAD_REQUEST"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_same_answers_as_mlflow_models_serve(digits, registry, tmp_path):
    """Every payload format, sent to `mlflow models serve` and to us: same predictions."""
    import os

    import httpx

    from onnxflow.mlflow_servers import start_scoring_server
    from onnxflow.processes import free_port
    from tests.serving.conftest import answers, wait_for

    port = free_port()
    env = {"MLFLOW_TRACKING_URI": registry.uri}
    log_path = tmp_path / "mlflow-serve.log"
    proc = start_scoring_server("models:/digits@champion", port, log_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{url}/ping"), timeout=240, interval=0.5)
        payloads = {
            "inputs": {"inputs": ROWS.tolist()},
            "instances": {"instances": ROWS.tolist()},
            "split": {
                "dataframe_split": {"columns": [f"f{i}" for i in range(64)], "data": ROWS.tolist()}
            },
            "records": {
                "dataframe_records": [{f"f{i}": v for i, v in enumerate(r)} for r in ROWS.tolist()]
            },
        }
        with digits.client() as ours:
            for key, payload in payloads.items():
                theirs = httpx.post(f"{url}/invocations", json=payload, timeout=60)
                mine = ours.post("/invocations", json=payload)
                assert theirs.status_code == mine.status_code == 200, (key, theirs.text)
                assert theirs.json().keys() == mine.json().keys()
                np.testing.assert_allclose(
                    mine.json()["predictions"]["logits"],
                    theirs.json()["predictions"]["logits"],
                    rtol=1e-5,
                    err_msg=key,
                )
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

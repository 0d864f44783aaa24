"""A client of ``mlflow models serve`` must not have to change: the endpoint against MLflow.

* every case of :mod:`tests.serving.mlflow_cases` (payloads from MLflow's docs and its
  scoring-server tests) sent to the endpoint and to MLflow's own scoring code, on the same
  registered versions: same status class and predictions, except the listed differences;
* MLflow's own client (``ScoringServerClient``) against the endpoint;
* slow: the same table against a real ``mlflow models serve`` process per model.

``mlflow.deployments.get_deploy_client("http://...")`` is the client of MLflow's AI
gateway (``/endpoints/NAME/invocations``), not of ``mlflow models serve``; the scoring
server's client is ``mlflow.pyfunc.scoring_server.client.ScoringServerClient``.
"""

from __future__ import annotations

import json
import os
import signal
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from onnxflow.mlflow_servers import start_scoring_server
from onnxflow.serving.launcher import free_port
from tests.serving import mlflow_cases
from tests.serving.conftest import answers, wait_for
from tests.serving.mlflow_cases import CASES, DIFFERENCES, compare, row_count

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _send(http: httpx.Client, case) -> httpx.Response:
    return http.post("/invocations", content=case.body, headers={"content-type": case.content_type})


def _check_table(answer_of_mlflow, endpoints) -> None:
    """Every case to both; the differences must be exactly the documented ones."""
    differences, problems = {}, []
    for case in CASES:
        with endpoints[case.model].client() as http:
            ours = _send(http, case)
        status, body = answer_of_mlflow(case)
        if ours.status_code >= 500:
            problems.append(f"{case.id}: the endpoint answered {ours.status_code}: {ours.text}")
        elif ours.status_code >= 400:
            if not ours.json().get("error"):
                problems.append(f"{case.id}: a {ours.status_code} without an error message")
        else:
            if case.rows is None:
                problems.append(f"{case.id}: answered 200 to a request it should refuse")
            elif row_count(ours.text) != case.rows:
                problems.append(
                    f"{case.id}: {row_count(ours.text)} answers for {case.rows} rows sent"
                )
        difference = compare(case, status, body, ours.status_code, ours.text)
        if difference:
            differences[case.id] = difference
    assert not problems, "\n".join(problems)
    undocumented = {k: v for k, v in differences.items() if k not in DIFFERENCES}
    assert not undocumented, f"differences from MLflow not in DIFFERENCES: {undocumented}"
    gone = sorted(set(DIFFERENCES) - set(differences))
    assert not gone, f"documented differences that no longer differ: {gone}"


@pytest.fixture(scope="module")
def mlflow_scoring(registry, registered):
    """MLflow's scoring-server function on the registered versions, in this process."""
    from mlflow.pyfunc import load_model, scoring_server

    with registry.active():
        loaded = {
            name: load_model(f"models:/{name}/{registered[name]}") for name in ("digits", "multi")
        }

    def answer(case) -> tuple[int, str]:
        model = loaded[case.model]
        try:
            result = scoring_server.invocations(
                case.body, case.content_type, model, model.metadata.get_input_schema()
            )
        except Exception as exc:  # what the server's exception handler turns into a response
            return exc.get_http_status_code(), json.dumps({"message": str(exc)})
        return result.status, result.response

    return answer


def test_every_case_means_what_it_means_to_mlflow(mlflow_scoring, digits, multi):
    _check_table(mlflow_scoring, {"digits": digits, "multi": multi})


def test_the_data_loss_case_is_gone(digits):
    """A CSV without a header row: 3 rows sent, 3 answered (was 2: row 1 taken as header)."""
    with digits.client() as http:
        case = next(c for c in CASES if c.id == "csv-no-header")
        response = _send(http, case)
        with_header = _send(http, next(c for c in CASES if c.id == "csv-header"))
    assert response.status_code == 200, response.text
    assert row_count(response.text) == 3
    assert response.json() == with_header.json()


def test_version_route(digits):
    import mlflow

    with digits.client() as http:
        response = http.get("/version")
    assert response.status_code == 200
    assert response.text == mlflow.__version__  # the scoring protocol spoken: MLflow's


def test_mlflow_scoring_server_client(digits, local_session):
    """MLflow's own client, unchanged: DataFrame, ndarray, a missing value, /version."""
    import mlflow
    import pandas as pd
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    url = urlparse(digits.url)
    client = ScoringServerClient(url.hostname, url.port)
    client.wait_server_ready(timeout=30)
    rows = mlflow_cases.ROWS
    want = local_session("mlp").run(None, {"features": rows})[0]
    frame = client.invoke(pd.DataFrame(rows))  # dataframe_split, integer columns, index
    array = client.invoke(rows)  # {"inputs": [...]}
    for response in (frame, array):
        np.testing.assert_allclose(
            np.array(response["predictions"]["logits"]), want, rtol=1e-5, atol=1e-6
        )
    gap = pd.DataFrame(rows)
    gap.iloc[1, 5] = np.nan  # the client writes the bare NaN literal
    answered = np.array(client.invoke(gap)["predictions"]["logits"], dtype=float)
    assert np.isnan(answered[1]).all()
    np.testing.assert_allclose(answered[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-6)
    assert client.get_version() == mlflow.__version__


@pytest.fixture(scope="module")
def mlflow_models_serve(registry, registered, tmp_path_factory):
    """A real ``mlflow models serve`` per model, on the same registered versions."""
    root = tmp_path_factory.mktemp("mlflow-models-serve")
    env = {"MLFLOW_TRACKING_URI": registry.uri}
    procs, urls = [], {}
    try:
        for name in ("digits", "multi"):
            port = free_port()
            model_uri = f"models:/{name}/{registered[name]}"
            procs.append(start_scoring_server(model_uri, port, root / f"{name}.log", env))
            urls[name] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            wait_for(lambda url=url: answers(f"{url}/ping"), timeout=240, interval=0.5)
        yield urls
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


@pytest.mark.slow
def test_every_case_against_a_real_mlflow_models_serve(mlflow_models_serve, digits, multi):
    def answer(case) -> tuple[int, str]:
        response = httpx.post(
            f"{mlflow_models_serve[case.model]}/invocations",
            content=case.body,
            headers={"content-type": case.content_type},
            timeout=60,
        )
        return response.status_code, response.text

    _check_table(answer, {"digits": digits, "multi": multi})
    with httpx.Client(base_url=mlflow_models_serve["digits"]) as theirs, digits.client() as ours:
        assert theirs.get("/version").text == ours.get("/version").text

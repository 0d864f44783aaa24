"""The challenger in shadow: live requests mirrored off the request path, compared per pair
of versions, the figures in /metrics and on the challenger's MLflow version.

One endpoint process serves two models with ``--shadow challenger``:

* ``shadow_a``: champion version 1 and challenger version 2 are different MLPs (they
  disagree on some rows); then champion moves to 2 and challenger to 3 (2's weights).
* ``shadow_b``: champion version 1 (dynamic batch) and challenger version 2, the same
  weights with a fixed batch of 1: it agrees on 1-row requests and fails on 2-row ones,
  which must never fail the champion's answer. Then the aliases swap places.
"""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from onnxflow.processes import free_port
from onnxflow.serving.comparison import ShadowMismatch, compare
from onnxflow.serving.launcher import start_background, stop_background, wait_ready
from onnxflow.serving.settings import ServingSettings
from onnxflow.serving.shadow import REPORT_PATH
from tests.serving import models
from tests.serving.conftest import TOKEN, Endpoint, _example, serving, wait_for
from tests.serving.models import v2_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


# --- the comparison, on its own -----------------------------------------------------------


def test_compare_counts_agreeing_rows_and_differences():
    served = [np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.6]], np.float32)]
    shadow = {"p": np.array([[0.2, 0.8], [0.3, 0.7], [0.5, 0.6]], np.float32)}
    result = compare(["p"], served, shadow)
    assert (result.rows, result.agreed) == (3, 2)
    assert result.max_abs["p"] == pytest.approx(0.5)
    assert result.mean_abs["p"] == pytest.approx((0.1 + 0.1 + 0.5 + 0.5) / 6)


def test_compare_reads_labels_and_skips_agreement_for_regressors():
    labels = compare(["y"], [np.array([1, 2, 3])], {"y": np.array([1, 0, 3])})
    assert (labels.rows, labels.agreed) == (3, 2)
    regression = compare(["y"], [np.zeros((4, 1), np.float32)], {"y": np.ones((4, 1))})
    assert regression.agreed is None and regression.max_abs == {"y": 1.0}


def test_compare_refuses_missing_or_reshaped_outputs():
    with pytest.raises(ShadowMismatch, match="no output 'p'"):
        compare(["p"], [np.zeros((1, 2))], {"q": np.zeros((1, 2))})
    with pytest.raises(ShadowMismatch, match=r"shadow shape \[2, 2\], served \[1, 2\]"):
        compare(["p"], [np.zeros((1, 2))], {"p": np.zeros((2, 2))})


# --- a real endpoint with two models and their challengers in shadow ----------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("shadow-models")
    return {
        "a1": models.mlp(root / "a1" / "model.onnx", seed=10),
        "a2": models.mlp(root / "a2" / "model.onnx", seed=11),
        "b1": models.mlp(root / "b1" / "model.onnx", seed=12),
        "b2_fixed": models.mlp(root / "b2" / "model.onnx", seed=12, batch=1),
    }


@pytest.fixture(scope="module")
def shadowed(registry, files, tmp_path_factory):
    register = registry.register
    versions = {
        "a1": register("shadow_a", files["a1"], _example()),
        "a2": register("shadow_a", files["a2"], _example(), aliases=("challenger",)),
        "a3": register("shadow_a", files["a2"], _example(), aliases=()),
        "b1": register("shadow_b", files["b1"], _example()),
        "b2": register("shadow_b", files["b2_fixed"], _example(), aliases=("challenger",)),
    }
    assert [versions[k] for k in ("a1", "a2", "a3", "b1", "b2")] == ["1", "2", "3", "1", "2"]
    root = tmp_path_factory.mktemp("shadow-endpoint")
    with serving(
        registry,
        root,
        "shadow_a",
        model="shadow_a@champion,shadow_b@champion",
        shadow="challenger",
        shadow_flush_interval_s=0,  # only on /admin/shadow/flush
        token=TOKEN,
        poll_interval_s=0.5,
    ) as endpoint:
        yield endpoint


def _local(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _shadow_versions(http) -> dict:
    status = http.get("/admin/status").json()
    return {
        name: (status["models"][name]["serving"] or {}).get("version")
        for name in ("shadow_a", "shadow_b")
    }, {name: m["shadow"] for name, m in status["shadow"]["models"].items()}


def _wait_for_pairs(http, served: dict, shadow: dict) -> None:
    def settled():
        return _shadow_versions(http) == (served, shadow)

    try:
        wait_for(settled, timeout=120, interval=0.25)
    except AssertionError:
        raise AssertionError(
            f"endpoint at {_shadow_versions(http)}, expected {served}, {shadow}"
        ) from None


def _send(endpoint, plan: list[tuple[str, int]], expected: dict) -> list[float]:
    """Send (model, rows) requests from 8 threads; every answer must be the champion's.
    Returns each request's latency in seconds."""
    rng = np.random.default_rng(7)
    features = [rng.normal(size=(rows, 64)).astype(np.float32) for _, rows in plan]

    with endpoint.client() as http:

        def one(i: int):
            name, rows = plan[i]
            begin = time.perf_counter()
            response = http.post(
                f"/v2/models/{name}/infer",
                json=v2_request(features=features[i]),
            )
            return i, response, time.perf_counter() - begin

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(len(plan))))
    for i, response, _ in answers:
        name, rows = plan[i]
        assert response.status_code == 200, response.text
        version, session = expected[name]
        assert response.headers["x-model-version"] == version
        got = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(rows, 10)
        want = session.run(None, {"features": features[i]})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return [seconds for _, _, seconds in answers]


def _send_grpc(endpoint, name: str, count: int, expected: dict) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(endpoint.grpc)
    version, session = expected[name]
    for i in range(count):
        features = np.random.default_rng(100 + i).normal(size=(1, 64)).astype(np.float32)
        tensor = grpcclient.InferInput("features", [1, 64], "FP32")
        tensor.set_data_from_numpy(features)
        result = client.infer(name, [tensor], headers={"authorization": f"Bearer {TOKEN}"})
        assert result.get_response().model_version == version
        np.testing.assert_allclose(
            result.as_numpy("logits"), session.run(None, {"features": features})[0], atol=1e-5
        )


def _shadow_metrics(http) -> dict:
    """{(metric, model, version, shadow_version[, output]): value} of the shadow's families."""
    figures = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        if not family.name.startswith("onnxflow_shadow_"):
            continue
        for sample in family.samples:
            labels = sample.labels
            key = (sample.name, labels["model"], labels["version"], labels["shadow_version"])
            if "output" in labels:
                key += (labels["output"],)
            if "le" not in labels:
                figures[key] = sample.value
    return figures


def _settled_counts(http, model: str, version: str, shadow: str, total: int) -> dict:
    """Wait until the shadow has dealt with ``total`` mirrored requests of the pair."""
    key = (model, version, shadow)

    def done():
        figures = _shadow_metrics(http)
        seen = sum(
            figures.get((f"onnxflow_shadow_{kind}_total", *key), 0)
            for kind in ("requests", "errors", "dropped")
        )
        return figures if seen >= total else None

    return wait_for(done, timeout=120, interval=0.25)


def _tags(registry, name: str, version: str) -> tuple[dict, str]:
    import mlflow
    from mlflow import MlflowClient

    with registry.active():
        mv = MlflowClient().get_model_version(name, version)
        report = mlflow.artifacts.load_text(f"runs:/{mv.run_id}/{REPORT_PATH}")
    return dict(mv.tags), report


def test_champion_answers_stay_right_and_the_shadow_compares(shadowed, files, registry):
    endpoint = shadowed
    with endpoint.client() as http:
        _wait_for_pairs(
            http, {"shadow_a": "1", "shadow_b": "1"}, {"shadow_a": "2", "shadow_b": "2"}
        )
    plan = [("shadow_a", 1 + i % 2) for i in range(60)] + [
        ("shadow_b", 1 + i % 2) for i in range(60)
    ]
    plan = [plan[i] for i in np.random.default_rng(0).permutation(len(plan))]
    expected = {"shadow_a": ("1", _local(files["a1"])), "shadow_b": ("1", _local(files["b1"]))}
    _send(endpoint, plan, expected)  # every answer 200, from version 1, the champion's values
    _send_grpc(endpoint, "shadow_a", 10, expected)  # the gRPC front is mirrored alike

    with endpoint.client() as http:
        _settled_counts(http, "shadow_a", "1", "2", 70)
        figures = _settled_counts(http, "shadow_b", "1", "2", 60)
        status = http.get("/admin/status").json()["shadow"]
    a = ("shadow_a", "1", "2")
    assert figures[("onnxflow_shadow_requests_total", *a)] == 70
    assert figures[("onnxflow_shadow_errors_total", *a)] == 0
    assert figures[("onnxflow_shadow_dropped_total", *a)] == 0
    assert 0 <= figures[("onnxflow_shadow_agreement", *a)] < 1  # two different MLPs
    assert figures[("onnxflow_shadow_abs_diff_max", *a, "logits")] > 0.01
    assert figures[("onnxflow_shadow_duration_seconds_count", *a)] == 70
    b = ("shadow_b", "1", "2")
    # the fixed-batch challenger: same weights, so 1-row requests agree exactly ...
    assert figures[("onnxflow_shadow_requests_total", *b)] == 30
    assert figures[("onnxflow_shadow_agreement", *b)] == 1.0
    assert figures[("onnxflow_shadow_abs_diff_max", *b, "logits")] < 1e-5
    # ... and every 2-row request failed in the shadow, never in the champion's answer
    assert figures[("onnxflow_shadow_errors_total", *b)] == 30
    pair_b = next(p for p in status["pairs"] if p["model"] == "shadow_b")
    assert "run:" in pair_b["last_error"]


def test_flush_writes_the_figures_onto_the_challenger_version(shadowed, registry):
    with shadowed.client() as http:
        assert http.post("/admin/shadow/flush", headers={"authorization": ""}).status_code == 401
        response = http.post("/admin/shadow/flush")
        assert response.status_code == 200, response.text
        written = {(w["model"], w["version"]) for w in response.json()["written"]}
        assert written == {("shadow_a", "2"), ("shadow_b", "2")}
        again = http.post("/admin/shadow/flush")  # nothing new: nothing written
        assert again.status_code == 200 and again.json()["written"] == []

    tags, report = _tags(registry, "shadow_a", "2")
    assert tags["shadow_champion_version"] == "1"
    assert tags["shadow_requests"] == "70"
    assert tags["shadow_errors"] == "0" and tags["shadow_dropped"] == "0"
    assert 0 <= float(tags["shadow_agreement"]) < 1
    assert float(tags["shadow_max_abs_diff"]) > 0.01
    assert float(tags["shadow_latency_p99_ms"]) >= float(tags["shadow_latency_p50_ms"]) > 0
    assert "# shadow_a version 2 in shadow (`challenger`)" in report
    assert "## against version 1" in report and "| requests compared | 70 (100 rows) |" in report

    tags, report = _tags(registry, "shadow_b", "2")
    assert tags["shadow_requests"] == "30" and tags["shadow_errors"] == "30"
    assert tags["shadow_agreement"] == "1.0000"
    assert "Last error: `run:" in report


def test_the_shadow_follows_both_aliases_when_they_move(shadowed, files, registry):
    registry.set_alias("shadow_a", "champion", "2")
    registry.set_alias("shadow_a", "challenger", "3")
    registry.set_alias("shadow_b", "champion", "2")  # the fixed-batch version now answers
    registry.set_alias("shadow_b", "challenger", "1")
    with shadowed.client() as http:
        _wait_for_pairs(
            http, {"shadow_a": "2", "shadow_b": "2"}, {"shadow_a": "3", "shadow_b": "1"}
        )
    plan = [("shadow_a", 1 + i % 2) for i in range(20)] + [("shadow_b", 1)] * 20
    expected = {
        "shadow_a": ("2", _local(files["a2"])),
        "shadow_b": ("2", _local(files["b2_fixed"])),
    }
    _send(shadowed, plan, expected)
    with shadowed.client() as http:
        _settled_counts(http, "shadow_a", "2", "3", 20)
        figures = _settled_counts(http, "shadow_b", "2", "1", 20)
        response = http.post("/admin/shadow/flush")
        assert response.status_code == 200, response.text
    for model in ("shadow_a", "shadow_b"):
        pair = (model, "2", "3" if model == "shadow_a" else "1")
        assert figures[("onnxflow_shadow_requests_total", *pair)] == 20
        assert figures[("onnxflow_shadow_agreement", *pair)] == 1.0  # the same weights
        assert figures[("onnxflow_shadow_errors_total", *pair)] == 0
    # the old pairs keep their counts; they are not mixed into the new ones
    assert figures[("onnxflow_shadow_requests_total", "shadow_a", "1", "2")] == 70

    tags, report = _tags(registry, "shadow_a", "3")
    assert tags["shadow_champion_version"] == "2"
    assert tags["shadow_requests"] == "20" and tags["shadow_agreement"] == "1.0000"
    assert float(tags["shadow_max_abs_diff"]) == 0.0
    assert "## against version 2" in report
    tags, report = _tags(registry, "shadow_b", "1")
    assert tags["shadow_champion_version"] == "2" and tags["shadow_requests"] == "20"


def test_the_champion_outlives_the_shadow_worker(shadowed, files):
    """A worker that goes away (a challenger crashing onnxruntime, a kill) fails no
    champion answer; another worker starts, loads the challengers and compares again."""
    import os
    import signal

    with shadowed.client() as http:
        status = http.get("/admin/status").json()["shadow"]
        assert status["worker_running"] and status["worker_restarts"] == 0
        killed = status["worker_pid"]
        os.kill(killed, signal.SIGKILL)
    expected = {
        "shadow_a": ("2", _local(files["a2"])),
        "shadow_b": ("2", _local(files["b2_fixed"])),
    }
    _send(shadowed, [("shadow_a", 2), ("shadow_b", 1)] * 10, expected)  # while it is down

    with shadowed.client() as http:

        def restarted():
            status = http.get("/admin/status").json()["shadow"]
            return (
                status["worker_restarts"] == 1
                and status["worker_running"]
                and status["worker_pid"] != killed
                and all(m["shadow"] for m in status["models"].values())
            )

        wait_for(restarted, timeout=120, interval=0.25)
        _send(shadowed, [("shadow_a", 1)] * 10, expected)

        def compared_afresh():
            figures = _shadow_metrics(http)
            return figures.get(("onnxflow_shadow_requests_total", "shadow_a", "2", "3")) == 10

        wait_for(compared_afresh, timeout=120, interval=0.25)


def test_a_tracking_server_gets_the_figures_over_its_rest_api(mlflow_server, registry):
    """The production set-up: tags through the REST API, the report through the server's
    artifact proxy (the run's artifacts are ``mlflow-artifacts:/``): no MLflow, no helper."""
    import httpx
    import mlflow
    from mlflow import MlflowClient

    from onnxflow.serving.registry_reader import Annotation, RestRegistry

    def up():
        try:
            return httpx.get(f"{mlflow_server}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout=180, interval=0.5)  # it may still boot
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.create_experiment("shadow-rest")
    run = client.create_run(experiment)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    client.create_registered_model("shadow_rest")
    version = client.create_model_version(
        "shadow_rest", f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    ).version

    RestRegistry(mlflow_server).annotate(
        [Annotation("shadow_rest", version, {"shadow_requests": "5"}, {REPORT_PATH: "# seen\n"})]
    )
    assert client.get_model_version("shadow_rest", version).tags["shadow_requests"] == "5"
    mlflow.set_tracking_uri(mlflow_server)
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{REPORT_PATH}")
    finally:
        mlflow.set_tracking_uri(None)
    assert text == "# seen\n"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_under_load_the_shadow_fails_and_slows_no_champion_answer(registry, tmp_path):
    """Two models, their challengers in shadow, thousands of concurrent requests: every
    champion answer right, and its p99 within a generous bound of an endpoint without the
    shadow, driven in alternating rounds on the same machine (the bench has the figures)."""
    root = tmp_path
    files = {
        "1": models.mlp(root / "m1" / "model.onnx", seed=30),
        "2": models.mlp(root / "m2" / "model.onnx", seed=31),
    }
    for name in ("load_a", "load_b"):
        registry.register(name, files["1"], _example())
        registry.register(name, files["2"], _example(), aliases=("challenger",))
    started = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registry.uri)
        for key, options in (("off", {}), ("on", {"shadow": "challenger"})):
            settings = ServingSettings(
                model="load_a@champion,load_b@champion",
                port=free_port(),
                cache_dir=root / "cache",
                token=TOKEN,
                **options,
            )
            started[key] = start_background(settings, root / key)
    try:
        for info in started.values():
            wait_ready(info, timeout_s=240)
        off, on = (Endpoint(started[k].url, "load_a", root / k, TOKEN) for k in ("off", "on"))
        with on.client() as http:
            wait_for(
                lambda: all(
                    m["shadow"] == "2"
                    for m in http.get("/admin/status").json()["shadow"]["models"].values()
                ),
                timeout=120,
            )
        session = _local(files["1"])
        expected = {"load_a": ("1", session), "load_b": ("1", session)}
        plan = [("load_a" if i % 2 else "load_b", 1 + i % 3) for i in range(1000)]
        latencies = {"off": [], "on": []}
        for _ in range(2):
            for key, endpoint in (("off", off), ("on", on)):
                begin = time.perf_counter()
                latencies[key] += _send(endpoint, plan, expected)
                assert time.perf_counter() - begin < 300
        with on.client() as http:
            total = 0
            for name in ("load_a", "load_b"):
                figures = _settled_counts(http, name, "1", "2", 1000)
                pair = (name, "1", "2")
                total += figures[("onnxflow_shadow_requests_total", *pair)]
                assert figures[("onnxflow_shadow_errors_total", *pair)] == 0
        assert (
            total
            + sum(
                figures.get(("onnxflow_shadow_dropped_total", n, "1", "2"), 0)
                for n in ("load_a", "load_b")
            )
            >= 2000
        )
        p99 = {k: sorted(v)[int(0.99 * len(v)) - 1] for k, v in latencies.items()}
        assert p99["on"] <= max(3 * p99["off"], p99["off"] + 0.05), p99
    finally:
        for key in started:
            stop_background(root / key)

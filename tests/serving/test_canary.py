"""The canary: a share of requests answered by the challenger, stopped when it does worse.

One endpoint process serves two models with ``canary_percent=50``:

* ``canary_a``: challenger version 2 is a good MLP: about half the answers come from it
  (and say so), each with that version's values; it is never stopped.
* ``canary_b``: challenger version 2 has a fixed batch of 1, so every 2-row request it
  answers fails: after ``canary_min_requests`` it is stopped, tagged ``canary_stopped``
  in the registry, and the champion answers everything again.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from onnxflow.processes import free_port
from onnxflow.serving.canary import Side, Trial
from onnxflow.serving.launcher import start_background, stop_background, wait_ready
from onnxflow.serving.settings import ServingSettings
from tests.serving import models
from tests.serving.conftest import TOKEN, Endpoint, _example, wait_for
from tests.serving.models import v2_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _side(ok: int, errors: int, seconds: float) -> Side:
    side = Side()
    for _ in range(ok):
        side.add(True, seconds)
    for _ in range(errors):
        side.add(False, seconds)
    return side


def test_the_verdict_compares_the_canary_with_the_served_version():
    trial = Trial("m", "1", "2", served=_side(100, 2, 0.001), canary=_side(48, 1, 0.001))
    assert trial.verdict(0.02, 2.0, 50) is None  # 49 answers: too young to judge
    trial.canary.add(True, 0.001)
    assert trial.verdict(0.02, 2.0, 50) is None  # 2% errors against 2%: fine
    trial.canary = _side(45, 5, 0.001)
    assert "error rate 0.100 over 50 requests" in trial.verdict(0.02, 2.0, 50)
    trial.canary = _side(50, 0, 0.003)
    assert "p99 3.00 ms against 1.00 ms" in trial.verdict(0.02, 2.0, 50)
    assert trial.verdict(0.02, 4.0, 50) is None


@pytest.fixture(scope="module")
def canaried(registry, tmp_path_factory):
    root = tmp_path_factory.mktemp("canary")
    files = {
        "a1": models.mlp(root / "m" / "a1" / "model.onnx", seed=20),
        "a2": models.mlp(root / "m" / "a2" / "model.onnx", seed=21),
        "b1": models.mlp(root / "m" / "b1" / "model.onnx", seed=22),
        "b2": models.mlp(root / "m" / "b2" / "model.onnx", seed=22, batch=1),
    }
    registry.register("canary_a", files["a1"], _example())
    registry.register("canary_a", files["a2"], _example(), aliases=("challenger",))
    registry.register("canary_b", files["b1"], _example())
    registry.register("canary_b", files["b2"], _example(), aliases=("challenger",))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registry.uri)
        settings = ServingSettings(
            model="canary_a@champion,canary_b@champion",
            canary_percent=50,
            canary_min_requests=20,
            canary_max_p99_ratio=1000,  # latency is judged in the unit test, not on this machine
            port=free_port(),
            cache_dir=root / "cache",
            token=TOKEN,
            poll_interval_s=0.5,
        )
        info = start_background(settings, root / "endpoint")
    try:
        wait_ready(info, timeout_s=240)
        endpoint = Endpoint(info.url, "canary_a", root / "endpoint", TOKEN)
        with endpoint.client() as http:

            def loaded():
                canary = http.get("/admin/status").json()["canary"]
                return canary["models"] == {"canary_a": "2", "canary_b": "2"}

            wait_for(loaded, timeout=120, interval=0.25)
        yield endpoint, files
    finally:
        stop_background(root / "endpoint")


def _infer(http, name: str, features: np.ndarray):
    return http.post(
        f"/v2/models/{name}/infer",
        json=v2_request(features=features),
    )


def _local(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_canary_answers_its_share_with_its_own_values(canaried):
    endpoint, files = canaried
    sessions = {"1": _local(files["a1"]), "2": _local(files["a2"])}
    rng = np.random.default_rng(1)
    versions = collections.Counter()
    with endpoint.client() as http:
        for _ in range(80):
            features = rng.normal(size=(2, 64)).astype(np.float32)
            response = _infer(http, "canary_a", features)
            assert response.status_code == 200, response.text
            version = response.headers["x-model-version"]
            versions[version] += 1
            got = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(2, 10)
            want = sessions[version].run(None, {"features": features})[0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # a version asked for by number is never the canary's to answer
        for _ in range(10):
            pinned = http.post(
                "/v2/models/canary_a/versions/1/infer",
                json=v2_request(features=np.full((1, 64), 0.5, np.float32)),
            )
            assert pinned.status_code == 200 and pinned.headers["x-model-version"] == "1"
        status = http.get("/admin/status").json()["canary"]
    assert set(versions) == {"1", "2"} and min(versions.values()) >= 15, versions
    assert status["stopped"] == {}
    trial = next(t for t in status["trials"] if t["model"] == "canary_a")
    assert trial["canary"]["errors"] == 0 and trial["canary"]["requests"] == versions["2"]


def test_a_failing_canary_is_stopped_and_tagged(canaried, registry):
    from mlflow import MlflowClient

    endpoint, files = canaried
    rng = np.random.default_rng(2)
    failures = 0
    with endpoint.client() as http:

        def stopped():
            nonlocal failures
            response = _infer(http, "canary_b", rng.normal(size=(2, 64)).astype(np.float32))
            if response.status_code != 200:
                # the challenger's own failure: its fixed batch refuses the request
                assert response.status_code == 400, response.text
                assert "dimension 0 must be 1" in response.json()["error"]
                failures += 1
            return "canary_b/2" in http.get("/admin/status").json()["canary"]["stopped"]

        wait_for(stopped, timeout=120, interval=0)
        assert failures >= 20  # judged after canary_min_requests answers
        for _ in range(30):  # stopped: the champion answers everything
            response = _infer(http, "canary_b", rng.normal(size=(2, 64)).astype(np.float32))
            assert response.status_code == 200, response.text
            assert response.headers["x-model-version"] == "1"
        metrics = http.get("/metrics").text
    assert 'onnxflow_canary_stopped{model="canary_b",version="2"} 1.0' in metrics

    def tagged():
        with registry.active():
            return MlflowClient().get_model_version("canary_b", "2").tags.get("canary_stopped")

    reason = wait_for(tagged, timeout=120, interval=0.5)
    assert reason.startswith("error rate 1.000 over")

"""Live drift at the endpoint: a real endpoint process serving two versions registered in a
real SQLite MLflow store, one with its reference profile and one without. Traffic whose
first 8 of 64 features are shifted raises those features' Jensen-Shannon gauges past their
thresholds, the unshifted ones stay under; the version without a profile has no figures."""

from __future__ import annotations

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_linear_onnx
from tests.serving.conftest import TOKEN, serving
from tests.serving.models import v2_request

SHIFTED = 8


def _infer(http: httpx.Client, name: str, x: np.ndarray) -> None:
    response = http.post(f"/v2/models/{name}/infer", json=v2_request(features=x))
    assert response.status_code == 200, response.text


def _gauges(http: httpx.Client) -> dict[str, dict[tuple, float]]:
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


def test_shifted_inputs_raise_their_drift_gauges_and_unshifted_ones_stay_under(
    mlflow_store, tmp_path
):
    from onnxflow.profile import profile_model
    from onnxflow.registration import register_onnx

    rng = np.random.default_rng(7)
    path = make_linear_onnx(tmp_path / "m" / "model.onnx")
    train = rng.normal(size=(3000, 64)).astype(np.float32)
    profile = profile_model(path, train, train[:500])
    register_onnx(
        path, model_name="live", input_example=train[:1], aliases=("champion",), profile=profile
    )
    register_onnx(path, model_name="bare", input_example=train[:1], aliases=("champion",))

    with (
        serving(
            mlflow_store,
            tmp_path / "endpoint",
            "live",
            model="live@champion,bare@champion",
            token=TOKEN,
            poll_interval_s=0,
        ) as endpoint,
        endpoint.client() as http,
    ):
        for _ in range(20):  # 500 rows of the training distribution
            _infer(http, "live", rng.normal(size=(25, 64)).astype(np.float32))
            _infer(http, "bare", rng.normal(size=(25, 64)).astype(np.float32))
        calm = _gauges(http)
        for _ in range(20):  # then 500 rows with the first 8 features shifted
            x = rng.normal(size=(25, 64)).astype(np.float32)
            x[:, :SHIFTED] += 1.5
            _infer(http, "live", x)
        shifted = _gauges(http)
        status = http.get("/admin/status").json()

    def figures(gauges, name):
        return {
            dict(k)["input"]: v
            for k, v in gauges.get(name, {}).items()
            if dict(k)["model"] == "live" and dict(k)["version"] == "1"
        }

    key = (("model", "live"), ("version", "1"))
    assert calm["onnxflow_drift_rows"][key] == 500
    js, limit = figures(calm, "onnxflow_drift_js"), figures(calm, "onnxflow_drift_threshold")
    assert len(js) == 64 and all(js[f] < limit[f] for f in js), max(js.values())
    assert calm["onnxflow_prediction_drift_js"][key] < 0.1

    assert shifted["onnxflow_drift_rows"][key] == 1000
    js, limit = figures(shifted, "onnxflow_drift_js"), figures(shifted, "onnxflow_drift_threshold")
    over = sorted((f for f in js if js[f] > limit[f]), key=lambda f: int(f[9:-1]))
    assert over == [f"features[{j}]" for j in range(SHIFTED)], over

    # the version without a profile is served without drift figures
    assert all(dict(k)["model"] == "live" for k in shifted["onnxflow_drift_rows"])
    live = status["drift"]["live"]["1"]
    assert live["rows"] == 1000 and live["drifted"] == over
    assert "bare" not in status["drift"] and status["heavy_modules_loaded"] == []

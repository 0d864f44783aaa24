"""The shadow's evidence, which promotion rests on: non-finite values counted apart (never a
NaN figure, never an agreeing row), and both versions timed the same way, so two identical
files show equal figures.

The comparison on its own first, then a real endpoint whose champion and challenger are the
same ONNX file, asked over REST and gRPC (one gRPC request carries a NaN).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from onnxflow.serving.comparison import PairStats, compare, markdown_report
from tests.serving import models
from tests.serving.conftest import TOKEN, _example, serving, wait_for

# --- the comparison, on its own -----------------------------------------------------------


def test_a_nan_row_never_agrees_and_never_poisons_the_differences():
    served = np.array([[np.nan, np.nan], [0.1, 0.9], [0.8, 0.2]], np.float32)
    shadow = {"p": np.array([[np.nan, np.nan], [0.2, 0.8], [0.3, 0.7]], np.float32)}
    result = compare(["p"], [served], shadow)
    assert (result.rows, result.agreed, result.nonfinite_rows) == (3, 1, 1)
    assert result.nonfinite == {"p": 2} and result.finite == {"p": 4}
    assert result.max_abs["p"] == pytest.approx(0.5)
    assert result.mean_abs["p"] == pytest.approx((0.1 + 0.1 + 0.5 + 0.5) / 4)

    # one side NaN, the other finite: a disagreement, and still no NaN figure
    one_sided = compare(["p"], [served[:1]], {"p": np.array([[0.5, 0.5]], np.float32)})
    assert (one_sided.agreed, one_sided.nonfinite_rows, one_sided.nonfinite["p"]) == (0, 1, 2)
    assert one_sided.max_abs == {"p": 0.0} and one_sided.mean_abs == {}


def test_the_running_figures_stay_finite_after_a_nan_request():
    pair = PairStats("m", "1", "2")
    ok = np.array([[0.1, 0.9]], np.float32)
    pair.record(compare(["p"], [ok], {"p": ok + 0.25}), 1e-4, 1e-4)
    nan = np.full((1, 2), np.nan, np.float32)
    pair.record(compare(["p"], [nan], {"p": nan}), 1e-4, 1e-4)
    pair.record(compare(["p"], [ok], {"p": ok + 0.25}), 1e-4, 1e-4)
    report = pair.report()
    assert report.agreement == pytest.approx(2 / 3)  # the NaN row does not agree
    assert report.mean_abs["p"] == pytest.approx(0.25) and report.max_abs["p"] == 0.25
    assert report.nonfinite == {"p": 2} and report.nonfinite_rows == 1
    tags = report.tags()
    assert not any("nan" in value.lower() for value in tags.values()), tags
    assert tags["shadow_nonfinite_values"] == "2" and tags["shadow_nonfinite_rows"] == "1"
    text = markdown_report([report], "challenger")
    figures = text.split("## against", 1)[1]
    assert "nan" not in figures.lower() and "| rows with non-finite scores | 1 |" in figures


def test_batched_requests_leave_the_served_latency_out_not_mixed_in():
    pair = PairStats("m", "1", "2")
    same = np.array([[0.1, 0.9]], np.float32)
    pair.record(compare(["p"], [same], {"p": same}), 2e-4, None)
    report = pair.report()
    assert report.served_ms == (None, None) and report.shadow_ms[0] == pytest.approx(0.2)


# --- a real endpoint: champion and challenger are the same file ---------------------------


@pytest.fixture(scope="module")
def twins(registry, tmp_path_factory):
    path = models.mlp(tmp_path_factory.mktemp("twins") / "model.onnx", seed=21)
    assert registry.register("twins", path, _example()) == "1"
    assert registry.register("twins", path, _example(), aliases=("challenger",)) == "2"
    root = tmp_path_factory.mktemp("twins-endpoint")
    with serving(
        registry,
        root,
        "twins",
        model="twins@champion",
        shadow="challenger",
        shadow_flush_interval_s=0,
        token=TOKEN,
        poll_interval_s=0.5,
    ) as endpoint:
        yield endpoint


def _pair(http) -> dict | None:
    pairs = http.get("/admin/status").json()["shadow"]["pairs"]
    return next((p for p in pairs if (p["version"], p["shadow_version"]) == ("1", "2")), None)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_identical_files_show_equal_figures_and_a_nan_poisons_nothing(twins):
    import tritonclient.grpc as grpcclient

    with twins.client() as http:

        def shadow_loaded():
            models_ = http.get("/admin/status").json()["shadow"]["models"]
            return models_.get("twins", {}).get("shadow") == "2"

        wait_for(shadow_loaded, timeout=120, interval=0.25)
        rng = np.random.default_rng(3)
        for _ in range(300):
            x = rng.normal(size=(1, 64)).astype(np.float32)
            body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 64]}]}
            body["inputs"][0]["data"] = x.ravel().tolist()
            assert http.post("/v2/models/twins/infer", json=body).status_code == 200

        def compared(n):
            pair = _pair(http)
            return pair if pair and pair["compared"] + pair["errors"] >= n else None

        pair = wait_for(lambda: compared(300), timeout=120, interval=0.25)
        assert pair["errors"] == 0 and pair["agreement"] == 1.0
        assert pair["max_abs_diff"] == {"logits": 0.0} and pair["mean_abs_diff"] == {"logits": 0.0}
        shadow_p50 = pair["shadow_latency_ms"]["p50"]
        served_p50 = pair["served_latency_ms"]["p50"]
        # the same measurement on both sides (the bare onnxruntime run): the same order of
        # magnitude for the same file, where it was 17x apart at p99 before. The two sides
        # run in two processes: on a busy 2-core machine one of them is descheduled more
        # often (3.1x seen at load 9), so the bound is an order of magnitude, not a ratio.
        assert 1 / 10 < shadow_p50 / served_p50 < 10, pair

        client = grpcclient.InferenceServerClient(twins.grpc)
        x = rng.normal(size=(2, 64)).astype(np.float32)
        x[0, 5] = np.nan
        tensor = grpcclient.InferInput("features", [2, 64], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("twins", [tensor], headers={"authorization": f"Bearer {TOKEN}"})
        assert np.isnan(result.as_numpy("logits")[0]).all()

        pair = wait_for(lambda: compared(301), timeout=120, interval=0.25)
        assert pair["nonfinite_rows"] == 1 and pair["nonfinite_values"] == {"logits": 10}
        assert pair["agreement"] == pytest.approx(301 / 302)  # the NaN row never agrees
        assert pair["mean_abs_diff"] == {"logits": 0.0} and pair["max_abs_diff"]["logits"] == 0

        metrics = http.get("/metrics").text
        flushed = http.post("/admin/shadow/flush")
        assert flushed.status_code == 200, flushed.text
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    for name in ("onnxflow_shadow_abs_diff_mean", "onnxflow_shadow_abs_diff_max"):
        assert all(math.isfinite(s.value) for s in families[name].samples)
    nonfinite = families["onnxflow_shadow_nonfinite_values"].samples
    assert [s.value for s in nonfinite if s.labels["model"] == "twins"] == [10.0]
    tags = flushed.json()["written"][0]["tags"]
    assert tags["shadow_mean_abs_diff"] == "0" and tags["shadow_nonfinite_values"] == "10"
    assert not any(v.lower() == "nan" for v in tags.values()), tags

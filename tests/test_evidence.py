"""Retrain on evidence, end to end on a temporary SQLite MLflow store under Prefect's test
harness: a small table model (scikit-learn) trained by the pipeline serves as champion;
traffic with two of its four features shifted is captured (the endpoint's own capture
writer) and labelled (its feedback store); ``monitor(retrain=True)`` then registers a new
version as ``challenger`` (champion unchanged: review mode), trained on the original table
plus the labelled captured rows, with the lineage to the capture window in its tags."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from onnxflow.config import PipelineConfig
from onnxflow.monitor import RetrainPolicy

FEATURES = 4


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def _table(path: Path, rows: int, rng) -> Path:
    x = rng.normal(size=(rows, FEATURES))
    y = (x[:, 0] - x[:, 2] > 0).astype(int)
    header = ",".join([*(f"f{j}" for j in range(FEATURES)), "label"])
    np.savetxt(
        path,
        np.column_stack([x, y]),
        delimiter=",",
        header=header,
        comments="",
        fmt=["%.6f"] * FEATURES + ["%d"],  # integer labels: a classifier
    )
    return path


def _serve_and_capture(folder: Path, name: str, version: str, x: np.ndarray, y: np.ndarray):
    """Answer ``x`` with the registered version's file, capture each request, feed back ``y``."""
    import mlflow
    import onnxruntime as ort

    from onnxflow.serving.capture import Capture
    from onnxflow.serving.feedback import FeedbackStore, Label
    from onnxflow.serving.settings import ServingSettings

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    session = ort.InferenceSession(str(next(local.rglob("*.onnx"))))
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    model = type("M", (), {"name": name, "version": version, "output_names": outputs})()
    capture = Capture(ServingSettings(model=f"{name}@champion", capture=str(folder)))
    capture.start()
    for i, row in enumerate(x.astype(np.float32)):
        feeds = {inputs[0]: row[None]}
        capture.offer(model, f"r{i}", feeds, session.run(None, feeds), 0.001)
    capture.stopping()
    capture.stop()
    FeedbackStore(capture).submit(name, [Label(f"r{i}", 0, str(int(v))) for i, v in enumerate(y)])


def _dataset_rows(client: MlflowClient, name: str, version: str) -> int:
    import json

    run = client.get_run(client.get_model_version(name, version).run_id)
    profile = json.loads(run.inputs.dataset_inputs[0].dataset.profile)
    return int(profile["features_shape"][0])


@pytest.mark.slow  # ~75 s: two pipeline runs under Prefect's harness
def test_shifted_labelled_traffic_retrains_a_challenger_on_the_captured_rows(
    mlflow_store, tmp_path
):
    from onnxflow.flows.monitor import monitor
    from onnxflow.flows.pipeline import run

    rng = np.random.default_rng(3)
    config = PipelineConfig.model_validate(
        {
            "data": {"path": str(_table(tmp_path / "table.csv", 400, rng)), "target": "label"},
            "register": {"model_name": "tab"},
            "validate": {"latency_repeats": 3},
        }
    )
    first = run(["sklearn"], config, tmp_path / "first")
    assert first.promotion.decision == "promoted"
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("tab", "champion").version) == "1"

    x = rng.normal(size=(300, FEATURES))
    x[:, :2] += 2.5  # a sensor offset on two of the four features; the label follows
    y = ((x[:, 0] - 2.5) - x[:, 2] > 0).astype(int)  # the recalibrated value
    capture = tmp_path / "captured"
    _serve_and_capture(capture, "tab", "1", x, y)

    since = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)).isoformat()
    policy = RetrainPolicy(max_drift_share=0.3, min_labels=50, min_rows=100)
    report = monitor("tab", str(capture), since, policy, out_dir=tmp_path / "report-only")
    assert report.retrain and report.retrained == []  # report only without retrain=True
    assert len(client.search_model_versions("name='tab'")) == 1

    # config without data: the served version's own table (its run's params)
    figures = monitor(
        "tab",
        str(capture),
        since,
        policy,
        retrain=True,
        config=PipelineConfig.model_validate({"validate": {"latency_repeats": 3}}),
        out_dir=tmp_path / "retrain",
    )
    assert (
        figures.retrain
        and set(figures.drifted) == {"float_input[0]", "float_input[1]"}
        or (figures.drift_share >= 0.5)
    ), figures
    assert figures.retrained == ["2"]
    assert str(client.get_model_version_by_alias("tab", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("tab", "challenger").version) == "2"

    new = client.get_model_version("tab", "2")
    assert new.tags["retrain_capture_window"] == figures.window
    # 30% of the labelled captured rows and the original test split (80 of 400) are held
    # out of the training table: the common evaluation set neither version trained on
    assert new.tags["retrain_rows_captured"] == "210"
    assert new.tags["retrain_rows_original"] == "320"
    assert new.tags["retrain_of_version"] == "1" and "drift share" in new.tags["retrain_reason"]
    assert client.get_run(new.run_id).data.tags["retrain_rows_captured"] == "210"
    run_inputs = client.get_run(new.run_id).inputs.dataset_inputs
    assert run_inputs[0].dataset.name == "tab-retrain"
    assert _dataset_rows(client, "tab", "2") == 320 + 210

    # both versions measured on that set by the pipeline: the retrained one is better on
    # the shifted rows, though its own accuracy tag (its own test split) is not comparable
    assert new.tags["common_eval_rows"] == "80 original test + 90 held-out captured"
    assert new.tags["common_eval_metric"] == "accuracy"
    assert new.tags["common_eval_champion_version"] == "1"
    on_shifted = float(new.tags["common_eval_captured_value"])
    assert on_shifted > float(new.tags["common_eval_champion_captured_value"]) + 0.1, new.tags
    assert float(new.tags["common_eval_value"]) > float(new.tags["common_eval_champion_value"])

    # the next monitor run: no second retrain while v2 is pending; the gate waits for the
    # shadow's evidence (no endpoint mirrored a request to v2 here) ...
    again = monitor("tab", str(capture), since, policy, retrain=True, out_dir=tmp_path / "again")
    assert again.retrained == [] and "waits for its shadow evidence: 0 of 100" in again.promotion
    assert str(client.get_model_version_by_alias("tab", "champion").version) == "1"
    # ... and, with none required, promotes on the common evaluation (auto mode)
    policy = policy.model_copy(update={"min_shadow_requests": 0})
    gated = monitor("tab", str(capture), since, policy, retrain=True, out_dir=tmp_path / "gate")
    assert "promoted" in gated.promotion and gated.retrained == [], gated.promotion
    assert str(client.get_model_version_by_alias("tab", "champion").version) == "2"
    decided = client.get_model_version("tab", "2").tags
    assert decided["retrain_gate"] == "promoted" and decided["promotion_decision"] == "promoted"

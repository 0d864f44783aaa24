"""register and promote against a real MLflow SQLite store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from onnxflow.config import PromoteConfig, RegisterConfig
from onnxflow.errors import PromotionError, RegistryError
from onnxflow.onnxfiles import onnx_digest
from onnxflow.promote import promote
from onnxflow.registration import register_onnx, register_validated, set_alias
from tests.conftest import make_linear_onnx, validation_summary

EXAMPLE = np.ones((1, 64), np.float32)


def _versions(name="digits"):
    return MlflowClient().search_model_versions(f"name='{name}'")


def _register(path: Path, **tags) -> str:
    return register_onnx(
        path, model_name="digits", input_example=EXAMPLE, tags={k: str(v) for k, v in tags.items()}
    ).version


def test_register_logs_files_signature_tags_and_alias(mlflow_store, tmp_path):
    path = make_linear_onnx(tmp_path / "m" / "model.onnx", external_data=True)
    registered = register_onnx(
        path, model_name="digits", input_example=EXAMPLE, tags={"source_framework": "torch"}
    )
    client = MlflowClient()
    mv = client.get_model_version_by_alias("digits", "challenger")
    assert str(mv.version) == registered.version == "1"
    assert mv.tags["source_framework"] == "torch"

    local = Path(
        mlflow.artifacts.download_artifacts(registered.model_uri, dst_path=str(tmp_path / "dl"))
    )
    assert {"model.onnx", "model.onnx.data", "MLmodel", "input_example.json"} <= {
        p.name for p in local.iterdir()
    }
    assert mv.tags["onnx_sha256"] == onnx_digest(local / "model.onnx")
    info = mlflow.models.get_model_info(registered.model_uri)
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 64]
    loaded = mlflow.pyfunc.load_model(registered.model_uri)
    np.testing.assert_allclose(
        loaded.predict(EXAMPLE)["probabilities"], _onnx(path, EXAMPLE), rtol=1e-6
    )


def _onnx(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"features": x}
    )[0]


def test_retried_register_reuses_the_version_of_its_run(mlflow_store, linear_onnx):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    first = register_onnx(linear_onnx, model_name="digits", input_example=EXAMPLE, run_id=run_id)
    again = register_onnx(
        linear_onnx,
        model_name="digits",
        input_example=EXAMPLE,
        run_id=run_id,
        tags={"note": "retry"},
    )
    assert first.version == again.version and len(_versions()) == 1
    assert client.get_model_version("digits", first.version).tags["note"] == "retry"


def test_unvalidated_model_is_never_registered(mlflow_store, linear_onnx, tmp_path):
    failed = validation_summary(
        tmp_path, passed=False, onnx_metric=0.5, parity_max_abs=0.5, parity_max_rel=1.0
    )
    with pytest.raises(RegistryError, match="validation failed"):
        register_validated(
            linear_onnx,
            summary=failed,
            lineage={},
            sample=None,
            config=RegisterConfig(),
            run_id="x",
        )
    assert _versions() == []


def test_set_alias_refuses_an_unknown_version(mlflow_store, linear_onnx):
    _register(linear_onnx)
    with pytest.raises(RegistryError, match="no version 7"):
        set_alias("digits", "champion", 7)
    set_alias("digits", "champion", 1)
    assert _champion() == "1"


def _champion():
    return str(MlflowClient().get_model_version_by_alias("digits", "champion").version)


def test_auto_promotion_moves_champion_only_when_better(mlflow_store, linear_onnx):
    v1 = _register(linear_onnx, metric_name="accuracy", accuracy=0.95)
    first = promote("digits", [v1], PromoteConfig())
    assert (first.decision, _champion()) == ("promoted", v1) and "no champion" in first.reason

    v2, v3 = _register(linear_onnx, accuracy=0.97), _register(linear_onnx, accuracy=0.96)
    best = promote("digits", [v2, v3], PromoteConfig())
    assert (best.candidate, best.decision, _champion()) == (v2, "promoted", v2)
    assert str(MlflowClient().get_model_version_by_alias("digits", "challenger").version) == v2

    v4 = _register(linear_onnx, accuracy=0.97)  # a tie does not dethrone the champion
    tie = promote("digits", [v4], PromoteConfig())
    assert (tie.decision, _champion()) == ("kept_champion", v2)
    tags = MlflowClient().get_model_version("digits", v4).tags
    assert (
        tags["promotion_decision"] == "kept_champion"
        and "does not beat" in tags["promotion_reason"]
    )


def test_review_mode_leaves_champion_for_a_reviewer(mlflow_store, linear_onnx):
    v1 = _register(linear_onnx, accuracy=0.9)
    promote("digits", [v1], PromoteConfig())
    v2 = _register(linear_onnx, accuracy=0.99)
    decision = promote("digits", [v2], PromoteConfig(mode="review"))
    assert (decision.decision, decision.champion_after, _champion()) == ("awaiting_review", v1, v1)
    assert (
        MlflowClient().get_model_version("digits", v2).tags["promotion_decision"]
        == "awaiting_review"
    )


def test_lower_is_better_metrics(mlflow_store, linear_onnx):
    v1 = _register(linear_onnx, metric_name="rmse", rmse=3.0)
    v2 = _register(linear_onnx, metric_name="rmse", rmse=2.0)
    assert promote("digits", [v1, v2], PromoteConfig()).candidate == v2


def test_promotion_names_a_missing_metric(mlflow_store, linear_onnx):
    v1 = _register(linear_onnx)
    with pytest.raises(PromotionError, match="no numeric 'f1' tag"):
        promote("digits", [v1], PromoteConfig(metric="f1"))


def test_runs_left_running_by_an_ended_flow_run_are_closed(mlflow_store):
    from onnxflow.tracking import close_abandoned_runs

    client = MlflowClient()
    exp = client.create_experiment("onnxflow")
    crashed = client.create_run(exp, tags={"flow_run_id": "crashed-flow-run"}).info.run_id
    going = client.create_run(exp, tags={"flow_run_id": "running-flow-run"}).info.run_id
    local = client.create_run(exp).info.run_id  # no flow run: never touched

    closed = close_abandoned_runs("onnxflow", lambda flow_run_id: flow_run_id.startswith("crashed"))

    assert closed == [crashed]
    assert client.get_run(crashed).info.status == "FAILED"
    assert "crashed-flow-run" in client.get_run(crashed).data.tags["abandoned"]
    assert client.get_run(going).info.status == client.get_run(local).info.status == "RUNNING"
    assert close_abandoned_runs("onnxflow", lambda _: True) == [going]
    assert close_abandoned_runs("no-such-experiment", lambda _: True) == []

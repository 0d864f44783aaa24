"""The flows end to end under prefect_test_harness, on a temporary SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from mlflow import MlflowClient
from onnx import helper, numpy_helper

from onnxflow.config import PipelineConfig
from onnxflow.errors import DataError, ValidationError

DESIGN_TAGS = {
    "source_framework",
    "exporter",
    "opset",
    "onnx_sha256",
    "parity_max_abs",
    "parity_max_rel",
    "accuracy",
    "validation",
    "dataset_digest",
    "git_commit",
    "flow_run_id",
}


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def small_config(**promote) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "train": {"epochs": 4, "hidden_sizes": [32]},
            "validate": {"latency_repeats": 3, "max_accuracy_drop": 0.01},
            "promote": promote,
        }
    )


def test_run_both_frameworks_registers_and_promotes_the_better(mlflow_store, tmp_path):
    from onnxflow.flows.pipeline import run

    result = run(["torch", "keras"], small_config(), tmp_path / "art")
    client = MlflowClient()
    versions = {str(v.version): v for v in client.search_model_versions("name='digits'")}
    assert sorted(versions) == ["1", "2"] and len(result.chains) == 2 and not result.failures
    for mv in versions.values():
        assert DESIGN_TAGS <= set(mv.tags), DESIGN_TAGS - set(mv.tags)
        assert mv.tags["validation"] == "passed" and float(mv.tags["parity_max_abs"]) <= 1e-4
    assert {v.tags["source_framework"] for v in versions.values()} == {"torch", "keras"}

    best = max(float(v.tags["accuracy"]) for v in versions.values())
    champion = client.get_model_version_by_alias("digits", "champion")
    assert float(champion.tags["accuracy"]) == best
    assert str(champion.version) == result.promotion.champion_after
    assert champion.tags["promotion_decision"] == "promoted"

    run_info = client.get_run(champion.run_id)
    assert run_info.data.params["train.epochs"] == "4"
    assert run_info.info.status == "FINISHED"
    history = client.get_metric_history(champion.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4], "one val_loss point per epoch"
    artifacts = {a.path for a in client.list_artifacts(champion.run_id, "validation")}
    assert {"validation/report.json", "validation/report.md"} <= artifacts
    assert run_info.inputs.dataset_inputs[0].dataset.digest == champion.tags["dataset_digest"]
    assert [row["version"] for row in result.table] == ["2", "1"]
    assert "champion" in {a for row in result.table for a in row["aliases"].split(", ")}


def test_review_mode_leaves_champion_for_the_reviewer(mlflow_store, tmp_path):
    from onnxflow.flows.pipeline import run

    first = run(["torch"], small_config(), tmp_path / "a")
    second = run(["torch"], small_config(mode="review"), tmp_path / "b")
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("digits", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("digits", "challenger").version) == "2"
    assert first.promotion.decision == "promoted"
    assert second.promotion.decision in {"awaiting_review", "kept_champion"}


def _tamper(model_path: Path, out_dir: Path) -> Path:
    """Add 0.5 to the output, as a broken exporter or a bad edit would."""
    model = onnx.load(str(model_path))
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_orig" if o == output else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "tamper"))
    model.graph.node.append(helper.make_node("Add", [f"{output}_orig", "tamper"], [output]))
    out_dir.mkdir(parents=True)
    path = out_dir / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
    return path


def test_tampered_onnx_output_fails_validation_and_registry_is_unchanged(mlflow_store, tmp_path):
    from onnxflow import tracking
    from onnxflow.data import prepare_data
    from onnxflow.flows.pipeline import export_and_register
    from onnxflow.frameworks import get_adapter
    from onnxflow.sources import TableSource

    cfg = small_config()
    dataset = prepare_data(cfg.data, tmp_path / "data")
    adapter = get_adapter("torch")
    trained = adapter.train(dataset, cfg.train, tmp_path / "train")
    exported = adapter.export(trained, dataset.info, cfg.export, tmp_path / "export")
    tampered = exported.model_copy(update={"path": _tamper(exported.path, tmp_path / "tampered")})
    run_id = tracking.start_run("onnxflow", "tampered", {}, {}, dataset)

    with pytest.raises(ValidationError) as err:
        source = TableSource(framework="torch", dataset=dataset, train_config=cfg.train)
        model = source.sourced(trained, tampered, tmp_path / "chain")
        export_and_register(source, trained, cfg, tmp_path / "chain", run_id, model)
    assert "probabilities" in str(err.value) and "max abs diff" in str(err.value)
    assert MlflowClient().search_model_versions("name='digits'") == []
    assert MlflowClient().get_run(run_id).data.tags["validation"] == "failed"
    report = json.loads((tmp_path / "chain" / "validate" / "report.json").read_text())
    assert report["passed"] is False


def test_bad_data_fails_before_any_run_is_created(mlflow_store, tmp_path):
    from onnxflow.flows.pipeline import run

    cfg = PipelineConfig.model_validate(
        {"data": {"path": str(tmp_path / "gone.csv"), "target": "y"}}
    )
    with pytest.raises(DataError, match="not found"):
        run(["torch"], cfg, tmp_path / "art")
    assert (
        MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
        == []
    )

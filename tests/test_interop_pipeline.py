"""The CNN and scikit-learn paths through the whole flow, and the quantize step's gate."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from onnxflow.config import PipelineConfig, QuantizeConfig
from onnxflow.errors import QuantizationError
from tests.fixtures_ml import built


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def test_sklearn_and_a_torch_cnn_run_end_to_end_with_a_quantized_version(mlflow_store, tmp_path):
    from onnxflow.flows.pipeline import run

    config = PipelineConfig.model_validate(
        {
            "train": {"epochs": 3, "hidden_sizes": [32], "model": "cnn"},
            "validate": {"latency_repeats": 3},
            "quantize": {"mode": "dynamic", "latency_repeats": 3, "max_accuracy_drop": 0.05},
        }
    )
    result = run(["sklearn", "torch"], config, tmp_path / "art")

    assert not result.failures and len(result.chains) == 2
    client = MlflowClient()
    versions = {v.version: v for v in client.search_model_versions("name='digits'")}
    frameworks = sorted(v.tags["source_framework"] for v in versions.values())
    quantized = [v for v in versions.values() if "quantized" in v.tags]
    assert frameworks.count("sklearn") >= 1 and frameworks.count("torch") >= 1
    assert quantized and all(v.tags["quantized"] == "dynamic" for v in quantized)
    for v in versions.values():
        assert v.tags["validation"] == "passed"
        if "quantized" not in v.tags:
            assert float(v.tags["parity_max_abs"]) <= 1e-4
    torch_chain = next(c for c in result.chains if c.framework == "torch")
    assert torch_chain.trained.params["model"] == "cnn"
    sk = next(c for c in result.chains if c.framework == "sklearn")
    assert sk.validation.onnx_metric > 0.9  # logistic regression on digits
    assert {row["framework"] for row in result.table} == {"sklearn", "torch"}


def test_a_quantized_model_that_loses_too_much_is_refused_with_a_report(tmp_path_factory, tmp_path):
    from onnxflow.quantize import quantize_model

    model = built("torch", "regression", tmp_path_factory)
    strict = QuantizeConfig(mode="dynamic", max_accuracy_drop=0.0, latency_repeats=3)
    with pytest.raises(QuantizationError, match="more than the allowed 0; not registered"):
        quantize_model(model.exported.path, model.dataset, strict, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False and report["bytes"]["quantized"] > 0
    assert set(report["latency_ms"]) == {"float_b1", "quantized_b1", "float_b32", "quantized_b32"}

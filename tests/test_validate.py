"""validate: checks on the held-out split, the report, and one typed error naming failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import pytest

from onnxflow.config import ValidateConfig
from onnxflow.errors import ValidationError
from onnxflow.results import ExportedModel
from onnxflow.sources import TableSource, validate_sourced
from tests.fixtures_ml import FRAMEWORKS, Built, built

FAST = ValidateConfig(latency_repeats=5)


def validate_model(model_path, trained, dataset, config, out_dir):
    """The one validate step, with a built-in table model as the source."""
    source = TableSource(framework=trained.framework, dataset=dataset)
    exported = ExportedModel(path=model_path, exporter="test", opset=18, export_seconds=0.0)
    model = source.sourced(trained, exported, out_dir.parent / f"{out_dir.name}-source")
    return validate_sourced(source, model, model_path, config, out_dir)


@pytest.fixture(scope="module")
def torch_digits(tmp_path_factory) -> Built:
    return built("torch", "classification", tmp_path_factory)


def _tamper(model_path, out_dir, delta: float = 0.5):
    """The same model with ``delta`` added to its output, under the same output name."""
    proto = onnx.load(str(model_path))  # weights inline from here on
    final = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = ["untampered" if name == final else name for name in node.output]
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array(delta, np.float32), "delta")
    )
    proto.graph.node.append(onnx.helper.make_node("Add", ["untampered", "delta"], [final]))
    out_dir.mkdir()
    onnx.save(proto, str(out_dir / "model.onnx"))
    return out_dir / "model.onnx"


def _report(out_dir) -> dict:
    return json.loads((out_dir / "report.json").read_text())


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_faithful_export_passes(framework, tmp_path_factory, tmp_path):
    model = built(framework, "classification", tmp_path_factory)
    summary = validate_model(model.exported.path, model.trained, model.dataset, FAST, tmp_path)

    assert summary.passed and summary.report_dir == tmp_path
    assert summary.metric_name == "accuracy"
    assert summary.onnx_metric == pytest.approx(summary.framework_metric, abs=1e-9)
    assert summary.parity_max_abs <= FAST.atol and summary.parity_max_rel <= FAST.rtol
    assert set(summary.latency_ms) == {"framework_b1", "onnx_b1", "framework_b32", "onnx_b32"}
    assert all(v > 0 for v in summary.latency_ms.values())
    exported = onnx.load(str(model.exported.path), load_external_data=False)
    assert (summary.opset, summary.ir_version) == (18, exported.ir_version)

    report = _report(tmp_path)
    assert report["passed"] and report["failures"] == []
    assert report["dataset"]["rows"] == model.dataset.info.n_test
    assert report["parity"]["probabilities"]["max_abs"] == summary.parity_max_abs
    assert {c["name"] for c in report["checks"]} >= {
        "output names",
        "output 'probabilities' shape",
        "batch 1 vs batch 32",
        "accuracy",
        "onnxruntime loads the model",
    }
    assert report["plots"] == ["parity.png", "latency.png", "confusion_matrix.png"]
    for plot in report["plots"]:
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert "# Validation report: PASSED" in (tmp_path / "report.md").read_text()


def test_a_tampered_model_fails_naming_the_output_and_its_difference(
    torch_digits, tmp_path, caplog
):
    tampered = _tamper(torch_digits.exported.path, tmp_path / "tampered")
    out_dir = tmp_path / "report"

    with pytest.raises(ValidationError) as caught:
        validate_model(tampered, torch_digits.trained, torch_digits.dataset, FAST, out_dir)

    error = caught.value
    assert "output 'probabilities': max abs diff 0.5 > atol 0.0001" in str(error)
    assert any(f.startswith("output 'probabilities': max rel diff") for f in error.failures)
    assert error.report_path == str(out_dir / "report.json")
    assert "✗ output 'probabilities': max abs diff 0.5 > atol 0.0001" in caplog.text

    report = _report(out_dir)  # the report was written before the error was raised
    assert not report["passed"] and report["failures"] == error.failures
    assert report["parity"]["probabilities"]["max_abs"] == pytest.approx(0.5, abs=1e-6)
    markdown = (out_dir / "report.md").read_text()
    assert "# Validation report: FAILED" in markdown
    assert "| ✗ | output 'probabilities' | max abs diff 0.5 > atol 0.0001 |" in markdown
    for plot in ("parity.png", "latency.png", "confusion_matrix.png"):
        assert (out_dir / plot).is_file()


def _failures_of_edited(model, proto, folder: Path) -> list[str]:
    """Validate ``proto``, an edited copy of ``model``'s export, against ``model``: the
    failures of the ValidationError it must raise (the report goes to ``folder/report``)."""
    (folder / "edited").mkdir()
    onnx.save(proto, str(folder / "edited" / "model.onnx"))
    with pytest.raises(ValidationError) as caught:
        validate_model(
            folder / "edited" / "model.onnx", model.trained, model.dataset, FAST, folder / "report"
        )
    return caught.value.failures


def test_a_model_onnxruntime_cannot_load_is_reported(torch_digits, tmp_path):
    proto = onnx.load(str(torch_digits.exported.path))
    for opset in proto.opset_import:
        if opset.domain == "":
            opset.version = 99  # an opset no onnxruntime knows
    failures = _failures_of_edited(torch_digits, proto, tmp_path)

    assert any("opset 99, IR" in f and "exceeds max opset" in f for f in failures)
    assert any(f.startswith("onnxruntime loads the model:") for f in failures)
    assert _report(tmp_path / "report")["model"]["opset"] == 99


def test_regression_is_judged_on_rmse(tmp_path_factory, tmp_path):
    model = built("torch", "regression", tmp_path_factory)
    summary = validate_model(model.exported.path, model.trained, model.dataset, FAST, tmp_path)
    assert summary.passed and summary.metric_name == "rmse"
    assert summary.onnx_metric == pytest.approx(summary.framework_metric, rel=1e-5)
    assert summary.onnx_metric < model.dataset.info.target_std
    assert _report(tmp_path)["plots"] == ["parity.png", "latency.png", "predictions.png"]


def test_a_tampered_regressor_fails_on_parity_and_rmse(tmp_path_factory, tmp_path):
    model = built("torch", "regression", tmp_path_factory)
    std = model.dataset.info.target_std
    tampered = _tamper(model.exported.path, tmp_path / "tampered", delta=std)
    with pytest.raises(ValidationError) as caught:
        validate_model(tampered, model.trained, model.dataset, FAST, tmp_path / "report")
    failures = caught.value.failures
    assert any(f.startswith("output 'prediction': max abs diff") for f in failures)
    assert any(f.startswith("rmse: onnx") for f in failures)


def test_an_output_of_the_wrong_shape_is_reported(torch_digits, tmp_path):
    proto = onnx.load(str(torch_digits.exported.path))
    final = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = ["all_classes" if name == final else name for name in node.output]
    proto.graph.initializer.extend(
        onnx.numpy_helper.from_array(np.array([v], np.int64), name)
        for name, v in (("starts", 0), ("ends", 5), ("axes", 1))
    )
    proto.graph.node.append(
        onnx.helper.make_node("Slice", ["all_classes", "starts", "ends", "axes"], [final])
    )
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    failures = _failures_of_edited(torch_digits, proto, tmp_path)

    n = torch_digits.dataset.info.n_test
    assert failures == [
        f"output 'probabilities' shape: declared ['batch?', 5], expected ['batch?', 10]; "
        f"onnx ({n}, 5), framework ({n}, 10), expected ({n}, 10)"
    ]
    assert (tmp_path / "report" / "report.md").is_file()

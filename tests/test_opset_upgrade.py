"""Import upgrades: onnx's own opset-6 test model, which onnxruntime no longer runs, is
moved to opset 7 by onnx.version_converter, checked with onnx.reference, imported,
registered with ``upgraded_from_opset`` and served over V2 with exactly onnx's answer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxflow.errors import ModelImportError
from onnxflow.opset_upgrade import changed_operators, upgrade_for_runtime

CASE = (
    Path(onnx.__file__).parent
    / "backend"
    / "test"
    / "data"
    / "pytorch-operator"
    / "test_operator_add_broadcast"
)


def _tensor(path: Path) -> np.ndarray:
    proto = TensorProto()
    proto.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(proto)


@pytest.fixture
def case(tmp_path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """onnx's model (a copy), its inputs bound to the graph's input names, its output."""
    model = tmp_path / "source" / "model.onnx"
    model.parent.mkdir()
    shutil.copyfile(CASE / "model.onnx", model)
    graph = onnx.load(str(model)).graph
    data = CASE / "test_data_set_0"
    inputs = {i.name: _tensor(data / f"input_{n}.pb") for n, i in enumerate(graph.input)}
    return model, inputs, _tensor(data / "output_0.pb")


def test_onnxruntime_cannot_run_the_opset_6_original(case):
    import onnxruntime as ort

    model, _, _ = case
    assert onnx.load(str(model)).opset_import[0].version == 6
    with pytest.raises(Exception, match=r"Add\(6\)"):
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def test_the_model_is_upgraded_to_the_lowest_opset_that_runs_with_onnx_s_answer(case):
    import onnxruntime as ort

    model, inputs, expected = case
    assert upgrade_for_runtime(model, inputs) == 6
    assert onnx.load(str(model)).opset_import[0].version == 7  # the lowest that runs
    (got,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, inputs)
    np.testing.assert_array_equal(got, expected)
    assert upgrade_for_runtime(model, inputs) is None  # runs now: nothing more to do


def test_what_the_converter_must_adapt_is_named_by_operator_and_opset(case):
    model, _, _ = case
    assert changed_operators(onnx.load(str(model)), 6, 7) == ["Add(opset 6 -> 7)"]
    assert changed_operators(onnx.load(str(model)), 7, 12) == []


def test_an_upgrade_that_changes_the_answer_is_refused(tmp_path, monkeypatch):
    """The check is real: an upgraded model that answers differently is not taken."""
    from onnxflow import opset_upgrade

    model, x = tmp_path / "m.onnx", np.ones((2, 3), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    proto.ir_version = 3
    onnx.save(proto, str(model))
    convert = opset_upgrade._lowest_runnable

    def wrong(original, from_opset, newest):
        upgraded, target, reasons = convert(original, from_opset, newest)
        upgraded.graph.node[0].op_type = "Add"  # x + x != x * x at 1
        return upgraded, target, reasons

    monkeypatch.setattr(opset_upgrade, "_lowest_runnable", wrong)
    with pytest.raises(ModelImportError, match=r"from opset 6 to 7 changes output\(s\) y"):
        upgrade_for_runtime(model, {"x": x})
    assert onnx.load(str(model)).opset_import[0].version == 6  # left as it was


def test_the_import_step_upgrades_its_copy_and_says_from_which_opset(case, tmp_path):
    from onnxflow.importing import convert_to_onnx

    model, inputs, _ = case
    imported = convert_to_onnx(model, "onnx", inputs, 18, tmp_path / "export")
    assert imported.upgraded_from_opset == 6 and imported.opset == 7
    assert onnx.load(str(imported.path)).opset_import[0].version == 7
    assert onnx.load(str(model)).opset_import[0].version == 6  # the user's file untouched


@pytest.mark.slow  # ~110 s: Prefect harness, import flow, a server process
def test_the_opset_6_model_imports_serves_and_answers_exactly_as_onnx_expects(
    mlflow_store, tmp_path, case
):
    import httpx
    from prefect.testing.utilities import prefect_test_harness

    from onnxflow.config import PipelineConfig
    from onnxflow.serving.launcher import stop_background
    from tests.test_import import _serve, _v2_input, import_model

    model, inputs, expected = case
    np.savez(tmp_path / "sample.npz", **inputs)
    graph_output = onnx.load(str(model)).graph.output[0].name
    np.savez(tmp_path / "expected.npz", **{graph_output: expected})
    config = PipelineConfig.model_validate({"validate": {"latency_repeats": 3}})
    with prefect_test_harness(server_startup_timeout=60):
        result = import_model(
            model,
            "onnx-test-add",
            tmp_path / "sample.npz",
            tmp_path / "expected.npz",
            config=config,
            out_dir=tmp_path / "import",
        )
    tags = result.version.tags
    assert tags["upgraded_from_opset"] == "6" and tags["opset"] == "7"
    assert tags["parity_checked"] == "true" and result.validation.parity_max_abs == 0.0
    assert onnx.load(str(model)).opset_import[0].version == 6  # the user's file untouched

    root = tmp_path / "serve"
    try:
        url = _serve("onnx-test-add@challenger", root)
        body = {"inputs": [_v2_input(k, v) for k, v in inputs.items()]}
        with httpx.Client(base_url=url, timeout=30) as http:
            answer = http.post("/v2/models/onnx-test-add/infer", json=body)
        assert answer.status_code == 200, answer.text
        (out,) = answer.json()["outputs"]
        assert out["shape"] == list(expected.shape) and out["datatype"] == "FP64"
        np.testing.assert_array_equal(np.array(out["data"]).reshape(expected.shape), expected)
    finally:
        stop_background(root / "state")

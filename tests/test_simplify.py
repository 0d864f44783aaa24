"""simplify: onnxsim with the batch axis kept dynamic, or the exported model unchanged."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import pytest

from onnxflow.config import SimplifyConfig
from onnxflow.errors import SimplifyError
from onnxflow.onnxfiles import copy_model, external_data_locations, onnx_digest
from onnxflow.simplify import simplify_model
from tests.fixtures_ml import built, onnx_session


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory):
    return built("torch", "classification", tmp_path_factory).exported.path


@pytest.fixture(scope="module")
def keras_export(tmp_path_factory):
    return built("keras", "classification", tmp_path_factory).exported.path


def _outputs(model_path, rows):
    return onnx_session(model_path).run(None, {"features": rows})[0]


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 16, size=(n, 64)).astype(np.float32)


def test_simplify_carries_external_data_and_keeps_the_batch_dynamic(torch_export, tmp_path):
    digest_before = onnx_digest(torch_export)
    result = simplify_model(torch_export, SimplifyConfig(), tmp_path / "simplified")

    assert result.simplified and result.reason is None
    assert result.path == tmp_path / "simplified" / "model.onnx"
    assert external_data_locations(result.path) == ["model.onnx.data"]
    assert result.bytes_after == sum(p.stat().st_size for p in result.path.parent.iterdir())
    assert onnx_digest(torch_export) == digest_before  # the input is never modified

    moved = copy_model(result.path, tmp_path / "elsewhere")  # self-contained folder
    shutil.rmtree(tmp_path / "simplified")
    proto = onnx.load(str(moved), load_external_data=False)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # still symbolic
    for batch in (1, 7):
        rows = _rows(batch)
        np.testing.assert_allclose(
            _outputs(moved, rows), _outputs(torch_export, rows), atol=1e-5, rtol=0
        )


def test_simplify_inline_model_stays_inline(keras_export, tmp_path):
    result = simplify_model(keras_export, SimplifyConfig(), tmp_path)
    assert result.simplified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert 0 < result.nodes_after <= result.nodes_before
    rows = _rows(5)
    np.testing.assert_allclose(
        _outputs(result.path, rows), _outputs(keras_export, rows), atol=1e-5, rtol=0
    )


def test_simplify_disabled_copies_the_model(torch_export, tmp_path):
    result = simplify_model(torch_export, SimplifyConfig(enabled=False), tmp_path)
    assert not result.simplified and "disabled" in result.reason
    assert onnx_digest(result.path) == onnx_digest(torch_export)


def test_onnxsim_failure_keeps_the_exported_model(torch_export, tmp_path):
    """A corrupted graph (a node reads a tensor nothing produces): onnxsim raises."""
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    proto = onnx.load(str(torch_export), load_external_data=False)
    proto.graph.node[1].input[0] = "does_not_exist"
    onnx.save(proto, str(broken_dir / "model.onnx"))
    shutil.copyfile(torch_export.parent / "model.onnx.data", broken_dir / "model.onnx.data")

    result = simplify_model(broken_dir / "model.onnx", SimplifyConfig(), tmp_path / "out")

    assert not result.simplified
    assert "does_not_exist" in result.reason
    assert onnx_digest(result.path) == onnx_digest(broken_dir / "model.onnx")  # with its .data
    assert result.nodes_after == result.nodes_before


def test_outputs_changed_by_simplification_are_rejected(keras_export, tmp_path):
    """Dropout left in training mode: the outputs are random, so no simplified model can be
    shown to match the exported one on the probe batches."""
    proto = onnx.load(str(keras_export))
    final = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = ["pre_dropout" if name == final else name for name in node.output]
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
            onnx.numpy_helper.from_array(np.array(True), "training_mode"),
        ]
    )
    proto.graph.node.append(
        onnx.helper.make_node("Dropout", ["pre_dropout", "ratio", "training_mode"], [final])
    )
    (tmp_path / "dropout").mkdir()
    onnx.save(proto, str(tmp_path / "dropout" / "model.onnx"))

    result = simplify_model(tmp_path / "dropout" / "model.onnx", SimplifyConfig(), tmp_path / "out")

    assert not result.simplified
    assert "outputs changed by" in result.reason and "check_atol 1e-05" in result.reason
    assert onnx_digest(result.path) == onnx_digest(tmp_path / "dropout" / "model.onnx")


def test_unusable_inputs_raise(torch_export, tmp_path):
    with pytest.raises(SimplifyError, match="No ONNX model"):
        simplify_model(tmp_path / "missing.onnx", SimplifyConfig(), tmp_path / "out")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\x00 this is not a protobuf \x12\x99" * 10)
    with pytest.raises(SimplifyError, match="not a readable ONNX model"):
        simplify_model(garbage, SimplifyConfig(), tmp_path / "out")
    with pytest.raises(SimplifyError, match="never overwrites its input"):
        simplify_model(torch_export, SimplifyConfig(), torch_export.parent)


def test_token_id_and_mask_inputs_are_probed_and_simplified(tmp_path):
    """int64 ids and a bool mask (a recipe's text model): probes fit each input's type."""
    from onnx import TensorProto, helper

    table = onnx.numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32), "table"
    )
    shape = onnx.numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["embedded"]),
            helper.make_node("Cast", ["mask"], ["weights"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["weights", "axis"], ["weights3"]),
            helper.make_node("Mul", ["embedded", "weights3"], ["masked"]),
            helper.make_node("Reshape", ["masked", "shape"], ["flat"]),
            helper.make_node("Identity", ["flat"], ["flat2"]),  # what onnxsim removes
            helper.make_node("Softmax", ["flat2"], ["probabilities"], axis=-1),
        ],
        "tokens",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 3]),
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 12])],
        [table, shape, onnx.numpy_helper.from_array(np.array([2], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "export" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path))
    result = simplify_model(path, SimplifyConfig(), tmp_path / "simplified")
    assert result.simplified, result.reason
    assert result.nodes_after < result.nodes_before

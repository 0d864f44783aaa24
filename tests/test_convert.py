"""ONNX back into PyTorch: registered models converted, the saved file loaded in a fresh
process without onnxflow, parity against onnxruntime; files that are not ONNX refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxflow.config import ExportConfig, TrainConfig
from onnxflow.convert import ConvertConfig, convert_model
from onnxflow.errors import ConversionError
from tests.conftest import make_linear_onnx
from tests.fixtures_ml import built, onnx_session


def _register_digits(model_path: Path, dataset) -> str:
    """Register through the real registry, with the tags the pipeline gives digits models."""
    from onnxflow.data import load_splits
    from onnxflow.registration import register_onnx

    version = register_onnx(
        model_path,
        model_name="digits",
        input_example=load_splits(dataset)["X_test"][:1],
        tags={"dataset_name": dataset.info.name, "dataset_digest": dataset.info.digest},
        aliases=("champion",),
    )
    return version.version


def _load_in_fresh_process(saved: Path, inputs: Path, outputs: Path) -> None:
    """Run the saved file with torch alone: neither onnxflow nor onnx2torch is imported."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        path = {str(saved)!r}
        module = (torch.export.load(path).module() if path.endswith(".pt2")
                  else torch.jit.load(path))
        args = [torch.from_numpy(a) for a in np.load({str(inputs)!r}).values()]
        with torch.no_grad():
            out = module(*args)
        out = out if isinstance(out, (tuple, list)) else [out]
        np.savez({str(outputs)!r}, *[o.numpy() for o in out])
        leaked = [m for m in ("onnxflow", "onnx2torch", "onnx") if m in sys.modules]
        assert not leaked, leaked
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=saved.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_registered_digits_model_converts_to_a_torch_export_program(
    mlflow_store, tmp_path, tmp_path_factory
):
    model = built("torch", "classification", tmp_path_factory)
    version = _register_digits(model.exported.path, model.dataset)

    result = convert_model("models:/digits@champion", ConvertConfig(), tmp_path / "out")

    assert result.artifact_format == "torch_export" and result.path.name == "model.pt2"
    assert result.sample == "digits test split" and result.rows == len(model.X_test)
    assert result.dynamic_batch and result.parity_max_abs <= 1e-4
    assert result.onnx_path.is_file() and version == "1"
    rows = model.X_test[:7]  # a batch size the sample did not have
    np.savez(tmp_path / "in.npz", features=rows)
    _load_in_fresh_process(result.path, tmp_path / "in.npz", tmp_path / "out.npz")
    torch_out = np.load(tmp_path / "out.npz")["arr_0"]
    (onnx_out,) = onnx_session(model.exported.path).run(None, {"features": rows})
    assert np.abs(torch_out - onnx_out).max() <= 1e-4


def test_a_torch_cnn_converts_despite_reshape_allowzero(mlflow_store, tmp_path, tmp_path_factory):
    """torch's exporter writes Reshape(allowzero=1), which onnx2torch refuses as such."""
    from onnxflow.frameworks import get_adapter

    data = built("torch", "classification", tmp_path_factory).dataset
    adapter = get_adapter("torch")
    trained = adapter.train(data, TrainConfig(epochs=1, model="cnn", seed=7), tmp_path / "t")
    exported = adapter.export(trained, data.info, ExportConfig(), tmp_path / "e")
    allowzero = [
        a.i
        for n in onnx.load(str(exported.path)).graph.node
        if n.op_type == "Reshape"
        for a in n.attribute
        if a.name == "allowzero"
    ]
    assert 1 in allowzero  # the case this test is about
    version = _register_digits(exported.path, data)

    result = convert_model(f"models:/digits/{version}", ConvertConfig(), tmp_path / "out")
    assert result.artifact_format == "torch_export" and result.dynamic_batch
    assert result.parity_max_abs <= 1e-4


def test_a_version_without_digits_data_is_checked_on_its_input_example(mlflow_store, tmp_path):
    from onnxflow.registration import register_onnx

    path = make_linear_onnx(tmp_path / "linear" / "model.onnx", n_in=5, n_out=3)
    x = np.random.default_rng(0).normal(size=(1, 5)).astype(np.float32)
    register_onnx(path, model_name="linear", input_example=x, aliases=("champion",))

    result = convert_model("models:/linear@champion", ConvertConfig(), tmp_path / "out")
    assert result.sample == "registered input example" and result.rows == 1
    assert result.artifact_format == "torch_export" and result.parity_max_abs <= 1e-5
    assert (tmp_path / "out" / "report.json").is_file()


def _ml_scaler_model(path: Path) -> Path:
    """A valid ONNX model made only of an ai.onnx.ml operator (as skl2onnx writes)."""
    node = helper.make_node(
        "Scaler", ["x"], ["y"], domain="ai.onnx.ml", offset=[0.0, 1.0], scale=[2.0, 3.0]
    )
    graph = helper.make_graph(
        [node],
        "scaler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("broken", "is not a model file onnxflow knows"),
        ("npz", "neither a Keras 3 .keras file"),
        ("no_sample", "needs --sample FILE"),
        ("sklearn_ops", "no converter for ai.onnx.ml::Scaler"),
        ("missing", "No model at"),
    ],
)
def test_what_cannot_be_converted_is_refused_with_a_clear_error(tmp_path, case, message):
    sample = tmp_path / "x.npz"
    np.savez(sample, x=np.ones((3, 2), np.float32))
    model = {
        "broken": tmp_path / "broken.onnx",
        "npz": sample,
        "no_sample": make_linear_onnx(tmp_path / "lin" / "model.onnx"),
        "sklearn_ops": _ml_scaler_model(tmp_path / "ml" / "model.onnx"),
        "missing": tmp_path / "nowhere.onnx",
    }[case]
    if case == "broken":
        model.write_bytes(b"\x08\x07garbage, not protobuf")
    with pytest.raises(
        ConversionError, match="Cannot convert|needs --sample|no converter"
    ) as caught:
        convert_model(
            model, ConvertConfig(), tmp_path / "out", None if case == "no_sample" else sample
        )
    assert message in str(caught.value)
    assert not list((tmp_path / "out").glob("model.pt*"))

"""Tiny real ONNX models for the endpoint tests, built with ``onnx.helper``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def v2_request(**tensors: np.ndarray) -> dict:
    """A KServe V2 JSON inference request carrying each float32 array (by input name)."""
    return {
        "inputs": [
            {"name": name, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
            for name, x in tensors.items()
        ]
    }


def binary_header(name: str, shape: list[int], byte_size: int) -> bytes:
    """The JSON header of a V2 request whose one FP32 input follows it as ``byte_size`` bytes
    of binary data (the binary tensor data extension)."""
    tensor = {"name": name, "datatype": "FP32", "shape": shape}
    request = {"inputs": [{**tensor, "parameters": {"binary_data_size": byte_size}}]}
    return json.dumps(request).encode()


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def mlp(path: Path, sizes=(64, 128, 10), seed: int = 0, batch: str | int = "batch") -> Path:
    """features[batch, sizes[0]] -> logits[batch, sizes[-1]]: Gemm+Relu layers.

    ``batch``: the first axis, dynamic (a name) or fixed (a size)."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "features"
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        w = rng.normal(scale=1 / np.sqrt(n_in), size=(n_in, n_out)).astype(np.float32)
        b = rng.normal(scale=0.1, size=(n_out,)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        out = "logits" if last else f"h{i}"
        nodes.append(
            helper.make_node("Gemm", [current, f"W{i}", f"b{i}"], [out if last else f"z{i}"])
        )
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, sizes[-1]])],
        inits,
    )
    return _save(graph, path)


MULTI_INPUTS = {
    "x": (TensorProto.FLOAT, ["batch", 3]),
    "mask": (TensorProto.BOOL, ["batch", 3]),
    "ids": (TensorProto.INT32, ["batch", 2]),
    "half": (TensorProto.FLOAT16, ["batch", 2]),
    "small": (TensorProto.UINT8, ["batch", 2]),
    "wide": (TensorProto.DOUBLE, ["batch", 1]),
    "names": (TensorProto.STRING, ["batch"]),
}


def multi_io(path: Path) -> Path:
    """Seven inputs of seven datatypes, seven outputs computed from them."""
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
    two = numpy_helper.from_array(np.array([2], np.int64), "two")
    nodes = [
        helper.make_node("Where", ["mask", "x", "zero"], ["masked"]),
        helper.make_node("Not", ["mask"], ["inverted"]),
        helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Mul", ["ids64", "two"], ["ids_doubled"]),
        helper.make_node("Add", ["half", "half"], ["half_doubled"]),
        helper.make_node("Identity", ["small"], ["small_out"]),
        helper.make_node("Add", ["wide", "wide"], ["wide_doubled"]),
        helper.make_node("Identity", ["names"], ["names_out"]),
    ]
    outputs = [
        helper.make_tensor_value_info("masked", TensorProto.FLOAT, ["batch", 3]),
        helper.make_tensor_value_info("inverted", TensorProto.BOOL, ["batch", 3]),
        helper.make_tensor_value_info("ids_doubled", TensorProto.INT64, ["batch", 2]),
        helper.make_tensor_value_info("half_doubled", TensorProto.FLOAT16, ["batch", 2]),
        helper.make_tensor_value_info("small_out", TensorProto.UINT8, ["batch", 2]),
        helper.make_tensor_value_info("wide_doubled", TensorProto.DOUBLE, ["batch", 1]),
        helper.make_tensor_value_info("names_out", TensorProto.STRING, ["batch"]),
    ]
    inputs = [helper.make_tensor_value_info(n, t, s) for n, (t, s) in MULTI_INPUTS.items()]
    return _save(helper.make_graph(nodes, "multi", inputs, outputs, [zero, two]), path)


def multi_example(rows: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(rows, 3)).astype(np.float32),
        "mask": rng.integers(0, 2, size=(rows, 3)).astype(bool),
        "ids": rng.integers(-1000, 1000, size=(rows, 2)).astype(np.int32),
        "half": rng.normal(size=(rows, 2)).astype(np.float16),
        "small": rng.integers(0, 255, size=(rows, 2)).astype(np.uint8),
        "wide": rng.normal(size=(rows, 1)),
        "names": np.array([f"name-{i}-é" for i in range(rows)], dtype=object),
    }


# --- the models Triton's example clients expect (names, tensor names and shapes) ----------


def triton_simple(path: Path) -> Path:
    """Triton's ``simple``: INPUT0, INPUT1 INT32 [1, 16] -> OUTPUT0 = sum, OUTPUT1 = difference."""
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT32, [1, 16]) for n in ("INPUT0", "INPUT1")
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.INT32, [1, 16]) for n in ("OUTPUT0", "OUTPUT1")
    ]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return _save(helper.make_graph(nodes, "simple", inputs, outputs), path)


def triton_simple_string(path: Path) -> Path:
    """Triton's ``simple_string``: the same on numbers written as strings (BYTES [1, 16])."""
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.STRING, [1, 16]) for n in ("INPUT0", "INPUT1")
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.STRING, [1, 16])
        for n in ("OUTPUT0", "OUTPUT1")
    ]
    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
        helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Sub", ["a", "b"], ["diff"]),
        helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
        helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=TensorProto.STRING),
    ]
    return _save(helper.make_graph(nodes, "simple_string", inputs, outputs), path)


def triton_simple_identity(path: Path) -> Path:
    """Triton's ``simple_identity``: INPUT0 BYTES [-1, -1] -> OUTPUT0, unchanged."""
    inputs = [helper.make_tensor_value_info("INPUT0", TensorProto.STRING, ["batch", "n"])]
    outputs = [helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, ["batch", "n"])]
    nodes = [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])]
    return _save(helper.make_graph(nodes, "simple_identity", inputs, outputs), path)


def triton_examples() -> dict[str, dict[str, np.ndarray]]:
    """An input example per Triton model, for registration."""
    ints = np.arange(16, dtype=np.int32).reshape(1, 16)
    words = np.array([[str(i) for i in range(16)]], dtype=object)
    return {
        "simple": {"INPUT0": ints, "INPUT1": np.ones((1, 16), np.int32)},
        "simple_string": {"INPUT0": words, "INPUT1": words},
        "simple_identity": {"INPUT0": np.array([["hello"]], dtype=object)},
    }


def simple_inputs(client_module, a: np.ndarray, b: np.ndarray) -> list:
    """INPUT0 and INPUT1 (INT32 [1, 16]) of Triton's ``simple`` as ``client_module``'s
    (``tritonclient.grpc`` or ``.http``) ``InferInput``s."""
    inputs = [
        client_module.InferInput("INPUT0", [1, 16], "INT32"),
        client_module.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs

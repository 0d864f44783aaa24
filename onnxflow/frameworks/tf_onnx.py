"""The one TensorFlow/Keras → ONNX conversion (``tf2onnx.convert.from_function`` with an
explicit input signature), used by every caller: the built-in Keras model
(:mod:`onnxflow.frameworks.keras3`), a recipe's Keras model (through
:mod:`onnxflow.importing`'s ``.keras`` path) and imported Keras files and SavedModels.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxflow.errors import ExportError
from onnxflow.interface import rename_value

TF2ONNX_EXPORTER = "tf2onnx"


def convert_function(
    fn,
    input_signature,
    opset: int,
    *,
    input_names: Sequence[str] = (),
    output_names: Sequence[str] = (),
):
    """The ONNX ModelProto of the ``tf.function`` ``fn``; its inputs and outputs renamed to
    ``input_names`` / ``output_names`` (in order; names are kept where the counts differ).

    ExportError when tf2onnx cannot convert to ``opset``; tf2onnx's own exceptions pass
    through: callers say what they converted."""
    import tf2onnx

    highest = max(tf2onnx.constants.OPSET_TO_IR_VERSION)
    if opset > highest:
        raise ExportError(
            f"tf2onnx {tf2onnx.__version__} converts to opsets up to {highest}; "
            f"the export config asks for opset {opset}."
        )
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=input_signature, opset=opset)
    graph = proto.graph
    for values, names in ((graph.output, output_names), (graph.input, input_names)):
        if len(names) != len(values):
            continue
        for value, name in zip(list(values), names, strict=True):
            if value.name != name:
                rename_value(graph, value.name, name)
    return proto

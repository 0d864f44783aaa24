"""A model's interface, declared once: its inputs and outputs by name, type and shape.

Like optimum's ``OnnxConfig``: :func:`table_model_interface` declares what every model
onnxflow trains on a table takes and gives, and that one declaration is what export checks
its file against (:func:`onnxflow.frameworks.check_exported_model`), what validation
checks (:mod:`onnxflow.validation.checks`) and what the frameworks' exporters name their
inputs and outputs after. :func:`read_interface` reads the same record from any ONNX file
(an imported model's, a simplified one, one the endpoint serves); simplify compares the
records before and after.

Also the ONNX introspection every step shares: the default-domain opset, the declared
dimensions of a value, whether the batch axis is dynamic. Only ``onnx`` is imported, and
only inside the functions, so the serving process can use this module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

#: The name of the input of every model onnxflow trains: the table's raw features.
INPUT_NAME = "features"
#: The name of the dynamic first axis onnxflow's exporters write.
BATCH_AXIS = "batch"

Dim = int | str | None
"""A declared dimension: a fixed size, the name of a dynamic axis, or None (unknown)."""


@dataclass(frozen=True)
class TensorDecl:
    """One input or output: its name, ONNX element type name (``FLOAT``...) and shape."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def with_dynamic_as(self, symbol: str) -> TensorDecl:
        """The same declaration with every dynamic (named or unknown) axis called ``symbol``:
        for comparing shapes where any dynamic axis will do."""
        return replace(self, shape=tuple(d if isinstance(d, int) else symbol for d in self.shape))

    def describe(self) -> str:
        return f"{self.name} {self.dtype} {list(self.shape)}"


@dataclass(frozen=True)
class ModelInterface:
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]

    @property
    def dynamic_batch(self) -> bool:
        """Every input and output has a first axis, and it is dynamic (not a fixed size)."""
        values = [*self.inputs, *self.outputs]
        return bool(values) and all(v.shape and not isinstance(v.shape[0], int) for v in values)

    def mismatches(self, found: ModelInterface) -> list[str]:
        """What ``found`` does differently from this declaration, one phrase per difference
        (names, then each tensor's shape and type); empty when it matches."""
        problems = []
        for kind, wanted, got in (
            ("input", self.inputs, found.inputs),
            ("output", self.outputs, found.outputs),
        ):
            if [t.name for t in got] != [t.name for t in wanted]:
                problems.append(
                    f"{kind}s {[t.name for t in got]}, expected {[t.name for t in wanted]}"
                )
                continue
            for want, have in zip(wanted, got, strict=True):
                if have.shape != want.shape:
                    problems.append(
                        f"{kind} {want.name!r} shape {list(have.shape)}, expected "
                        f"{list(want.shape)}"
                    )
                if have.dtype != want.dtype:
                    problems.append(
                        f"{kind} {want.name!r} type {have.dtype}, expected {want.dtype}"
                    )
        return problems


def output_name(task: Literal["classification", "regression"]) -> str:
    """Name of the single output of a model trained for ``task``."""
    return "probabilities" if task == "classification" else "prediction"


def table_model_interface(
    task: Literal["classification", "regression"], n_features: int, n_outputs: int
) -> ModelInterface:
    """The interface of every model onnxflow trains on a table, whatever the framework.

    One input ``features`` ``[batch, n_features]`` FLOAT taking RAW features (the
    standardisation is folded into the first layer), and one output: ``probabilities``
    ``[batch, n_classes]`` for a classifier, ``prediction`` ``[batch, 1]`` for a regressor.
    """
    return ModelInterface(
        inputs=(TensorDecl(INPUT_NAME, "FLOAT", (BATCH_AXIS, n_features)),),
        outputs=(TensorDecl(output_name(task), "FLOAT", (BATCH_AXIS, n_outputs)),),
    )


def load_graph(model_path: Path):
    """The ``ModelProto`` of ``model_path`` without its external data (weights stay on disk)."""
    import onnx

    return onnx.load(str(model_path), load_external_data=False)


def read_interface(proto) -> ModelInterface:
    """The interface a model declares: graph inputs (initializers excepted) and outputs."""
    initializers = {t.name for t in proto.graph.initializer}
    return ModelInterface(
        inputs=tuple(declared(v) for v in proto.graph.input if v.name not in initializers),
        outputs=tuple(declared(v) for v in proto.graph.output),
    )


def declared(value) -> TensorDecl:
    """The declaration of one graph value (``ValueInfoProto``)."""
    import onnx

    return TensorDecl(
        value.name,
        onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type),
        tuple(dims(value)),
    )


def dims(value) -> list[Dim]:
    """Declared dimensions of a graph value: sizes, dynamic ones by name, unknown as None."""
    return [
        d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
        for d in value.type.tensor_type.shape.dim
    ]


def has_dynamic_batch(proto) -> bool:
    """Every graph input and output has a first axis, and it is symbolic (not fixed)."""
    return read_interface(proto).dynamic_batch


def name_batch_axis(proto, name: str = BATCH_AXIS) -> bool:
    """Call the first axis of every input and output ``name``, and every other axis that
    shares its symbol (converters name them apart: tf2onnx ``unk__8``, torch ``s77``;
    skl2onnx leaves them unnamed). Edits ``proto`` in place; False, changing nothing, when
    an input or output has a fixed first axis (no batch axis to name)."""
    if not has_dynamic_batch(proto):
        return False
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    ends = [v for v in [*graph.input, *graph.output] if v.name not in initializers]
    firsts = [v.type.tensor_type.shape.dim[0] for v in ends]
    symbols = {d.dim_param for d in firsts if d.HasField("dim_param")}
    for value in [*ends, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in symbols:
                dim.dim_param = name
    for dim in firsts:
        dim.dim_param = name
    return True


def rename_value(graph, old: str, new: str) -> None:
    """Rename a graph value everywhere it appears: node inputs and outputs, graph inputs,
    outputs and value_info (converters pick names onnxflow's interface does not use)."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def default_opset(proto) -> int:
    """The model's default-domain (``ai.onnx``) opset version; 0 when it imports none."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)

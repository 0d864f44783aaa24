"""The one PyTorch → ONNX export (``torch.onnx.export(dynamo=True)``), used by every caller:
the built-in torch model (:mod:`onnxflow.frameworks.pytorch`), a recipe's torch model
(:mod:`onnxflow.recipes.torch_recipe`) and an imported ``torch.export`` program
(:mod:`onnxflow.importing`). Modelled on Olive's single ``conversion.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from onnxflow.errors import ExportError
from onnxflow.interface import BATCH_AXIS

DYNAMO_EXPORTER = "torch.onnx.export(dynamo=True)"


def export_program(
    program,
    target: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
    args: tuple = (),
    require_dynamic_batch: bool = False,
) -> None:
    """``program`` (a ``torch.export`` ExportedProgram) to ``target``, weights in
    ``target.data``; the dynamic batch axis named ``batch``.

    ExportError when the exporter gives another opset than ``opset`` (below 18 it converts
    down, and silently keeps 18 when it cannot) or, with ``require_dynamic_batch``, a static
    batch axis. The exporter's own exceptions pass through: callers say what they exported.
    """
    import torch

    onnx_program = torch.onnx.export(
        program,
        args,
        None,
        dynamo=True,
        input_names=list(input_names),
        output_names=list(output_names),
        opset_version=opset,
        verbose=False,
    )
    found = onnx_program.model.opset_imports.get("")
    if found != opset:
        raise ExportError(f"the dynamo exporter produced opset {found}, not the requested {opset}")
    if not _name_batch_axis(onnx_program.model) and require_dynamic_batch:
        raise ExportError("the exported batch axis is static, expected it dynamic")
    remove_stale(target)
    onnx_program.save(str(target), external_data=True)


def output_names_for(n_outputs: int) -> list[str]:
    """``output``, or ``output_0``, ``output_1``... for a program without names of its own."""
    return ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]


def remove_stale(target: Path) -> None:
    """Remove a previous export at ``target``, so no stale external data survives."""
    for path in (target, target.with_name(target.name + ".data")):
        path.unlink(missing_ok=True)


def _name_batch_axis(model) -> bool:
    """torch.export.load forgets the Dim's name (it becomes e.g. ``s77``): call the first
    input's dynamic first axis ``batch`` wherever it appears. False when it is static."""
    import onnx_ir as ir

    graph = model.graph
    if not graph.inputs or graph.inputs[0].shape is None or not len(graph.inputs[0].shape):
        return False
    symbol = graph.inputs[0].shape[0]
    if not isinstance(symbol, ir.SymbolicDim):
        return False
    values = [*graph.inputs, *graph.outputs, *(v for node in graph for v in node.outputs)]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape(
                [
                    ir.SymbolicDim(BATCH_AXIS)
                    if isinstance(d, ir.SymbolicDim) and d.value == symbol.value
                    else d
                    for d in value.shape
                ]
            )
    return True

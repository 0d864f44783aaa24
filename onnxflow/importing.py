"""Bring your own model: detect its format, read its sample, convert it to ONNX, and give
the reference outputs validation compares against.

Supported files, detected from their content (the suffix is only a hint):

==================  ===========================================  =========================
format              what it is                                   converted with
==================  ===========================================  =========================
``keras``           a Keras 3 ``.keras`` archive                 tf2onnx (from_function)
``savedmodel``      a TensorFlow SavedModel folder               tf2onnx (serving_default)
``torch_export``    a ``torch.export`` program (``.pt2``)        torch.onnx.export (dynamo)
``torchscript``     a TorchScript archive (``torch.jit.save``)   torch.onnx.export (legacy)
``onnx``            an ONNX model (external data beside it)      (copied)
==================  ===========================================  =========================

The sample is an ``.npz`` with one array per model input (by name), or a CSV/Parquet
table: all its columns form the single input of a one-input model, or each column is the
``[batch]`` input of the same name. Expected outputs (``--expected``) are an ``.npz`` with
one array per output name, or a table for a one-output model.

Step logic only: no MLflow, no Prefect. :class:`onnxflow.sources.ImportSource` is the
chain's adapter over it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from onnxflow.errors import ModelImportError
from onnxflow.interface import (
    default_opset,
    load_graph,
    name_batch_axis,
    read_interface,
    rename_value,
)
from onnxflow.results import ImportedModel, SourceFormat
from onnxflow.runtime import open_session

log = logging.getLogger(__name__)

FRAMEWORK_OF: dict[str, str] = {
    "keras": "keras",
    "savedmodel": "tensorflow",
    "torch_export": "torch",
    "torchscript": "torch",
    "onnx": "onnx",
}
EXPORTER_OF: dict[str, str] = {
    "keras": "tf2onnx",
    "savedmodel": "tf2onnx",
    "torch_export": "torch.onnx.export(dynamo=True)",
    "torchscript": "torch.onnx.export(dynamo=False)",
    "onnx": "none (imported as ONNX)",
}
TABLE_SUFFIXES = {".csv", ".txt", ".parquet", ".pq"}

Outputs = dict[str, np.ndarray]
Reference = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


# -- detection --------------------------------------------------------------------------


def detect_format(path: Path) -> SourceFormat:
    """The model format of ``path`` from its content; ModelImportError when it is none."""
    path = Path(path)
    if not path.exists():
        raise ModelImportError(f"No model at {path}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "savedmodel"
        raise ModelImportError(
            f"{path} is a folder without saved_model.pb: not a TensorFlow SavedModel "
            "(expected a .keras, .pt2, TorchScript or .onnx file, or a SavedModel folder)"
        )
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelImportError(f"{path} is a broken zip archive: {exc}") from None
        if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
            return "keras"
        if any(
            n.endswith("serialized_exported_program.json")
            or "/models/" in n
            and n.endswith(".json")
            for n in names
        ):
            return "torch_export"
        if any(n.endswith("/code/__torch__.py") or "/code/__torch__/" in n for n in names) or any(
            n.endswith("constants.pkl") for n in names
        ):
            return "torchscript"
        raise ModelImportError(
            f"{path} is a zip archive but neither a Keras 3 .keras file, a torch.export "
            f".pt2 program nor a TorchScript file (entries: {', '.join(names[:5])}...)"
        )
    return _check_onnx(path)


def _check_onnx(path: Path) -> SourceFormat:
    import onnx

    from onnxflow.errors import UnsafeModelError
    from onnxflow.onnxfiles import check_external_data

    try:
        model = load_graph(path)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelImportError(
            f"{path} is not a model file onnxflow knows: not a zip (.keras, .pt2, TorchScript), "
            f"not a SavedModel folder, and not ONNX ({type(exc).__name__}: {exc})"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise ModelImportError(f"{path} parses as protobuf but holds no ONNX graph")
    try:
        check_external_data(path)
        # not full_check: shape inference cannot read constants kept in external data
        onnx.checker.check_model(str(path))
    except UnsafeModelError as exc:
        raise ModelImportError(str(exc)) from None
    except Exception as exc:  # onnx.checker's ValidationError, InferenceError
        raise ModelImportError(
            f"{path} is a broken ONNX model: {' '.join(str(exc).split())}"
        ) from None
    return "onnx"


# -- samples ----------------------------------------------------------------------------


def read_arrays(path: Path, what: str = "sample") -> dict[str, np.ndarray]:
    """An ``.npz`` as ``{name: array}``, or a table as ``{column: column array}`` (ordered)."""
    path = Path(path)
    if not path.is_file():
        raise ModelImportError(f"{what} file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        elif suffix in TABLE_SUFFIXES:
            import pandas as pd

            frame = pd.read_parquet(path) if suffix in {".parquet", ".pq"} else pd.read_csv(path)
            arrays = {str(c): frame[c].to_numpy() for c in frame.columns}
        else:
            raise ModelImportError(
                f"Unsupported {what} file {path}: expected .npz, .csv or .parquet"
            )
    except ModelImportError:
        raise
    except Exception as exc:  # numpy, pandas and pyarrow raise many types
        raise ModelImportError(f"Cannot read the {what} file {path}: {exc}") from None
    if not arrays:
        raise ModelImportError(f"The {what} file {path} holds no arrays or columns")
    return {k: (v.astype(object) if v.dtype.kind in "US" else v) for k, v in arrays.items()}


def bind_sample(
    arrays: Mapping[str, np.ndarray], inputs: list, what: str = "sample", table: bool = False
) -> dict[str, np.ndarray]:
    """The sample as onnxruntime feeds for ``inputs`` (onnxruntime NodeArg-like: name, type,
    shape); ModelImportError naming every mismatch.

    ``table``: the arrays are a table's columns: for a one-input model they are stacked
    into one ``[rows, columns]`` array. Safe casts (float64 -> float32, int64 -> int32 when
    the values fit) are done; a cast that changes the kind of value is refused.
    """
    names = [i.name for i in inputs]
    arrays = dict(arrays)
    if table and len(inputs) == 1 and names[0] not in arrays:
        columns = list(arrays.values())
        arrays = {
            names[0]: np.column_stack(columns) if len(inputs[0].shape or ()) != 1 else columns[0]
        }
    elif len(inputs) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}  # one unnamed array for one input
    problems = []
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names]
    if missing:
        problems.append(f"no array for input(s) {missing}")
    if extra:
        problems.append(f"array(s) {extra} are not inputs of the model")
    feeds, rows = {}, set()
    for spec in inputs:
        if spec.name not in arrays:
            continue
        try:
            feeds[spec.name] = _fit_input(spec, np.asarray(arrays[spec.name]))
        except ModelImportError as exc:
            problems.append(str(exc))
            continue
        if feeds[spec.name].ndim:
            rows.add(feeds[spec.name].shape[0])
    if problems:
        wanted = ", ".join(f"{i.name} {i.type} {list(i.shape or [])}" for i in inputs)
        raise ModelImportError(
            f"The {what} does not match the model's inputs ({wanted}): " + "; ".join(problems)
        )
    if len(rows) > 1:
        log.warning("%s inputs have different first dimensions %s", what, sorted(rows))
    return feeds


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": object,
}


def _fit_input(spec, array: np.ndarray) -> np.ndarray:
    name, shape = spec.name, list(spec.shape or [])
    dtype = _ORT_DTYPES.get(spec.type)
    if dtype is None:
        raise ModelImportError(f"input {name!r} has type {spec.type}, which onnxflow does not feed")
    if array.ndim != len(shape):
        raise ModelImportError(
            f"input {name!r}: {array.ndim} dimensions {list(array.shape)}, "
            f"expected {len(shape)} {shape}"
        )
    for i, (want, got) in enumerate(zip(shape, array.shape)):
        if isinstance(want, int) and want >= 0 and want != got:
            raise ModelImportError(
                f"input {name!r}: dimension {i} is {got}, the model fixes it "
                f"at {want} (shape {shape})"
            )
    if dtype is object:
        if array.dtype.kind not in "OUS":
            raise ModelImportError(f"input {name!r} takes strings, the sample has {array.dtype}")
        return array.astype(object)
    target = np.dtype(dtype)
    if array.dtype == target:
        return array
    if array.dtype.kind in "OUS":
        raise ModelImportError(f"input {name!r} takes {target}, the sample has strings")
    if target.kind == "b" or (array.dtype.kind == "b" and target.kind != "b"):
        raise ModelImportError(f"input {name!r} takes {target}, the sample has {array.dtype}")
    if target.kind in "iu":
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise ModelImportError(
                    f"input {name!r} takes {target}, the sample has "
                    f"non-integer {array.dtype} values"
                )
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ModelImportError(
                f"input {name!r}: values {array.min()}..{array.max()} do not fit {target}"
            )
    return array.astype(target)


def bind_expected(
    arrays: Mapping[str, np.ndarray], output_names: list[str], table: bool = False
) -> Outputs:
    """Expected outputs by output name; a table is the single output of a one-output model."""
    arrays = dict(arrays)
    if table and len(output_names) == 1 and output_names[0] not in arrays:
        columns = list(arrays.values())
        arrays = {output_names[0]: np.column_stack(columns) if len(columns) > 1 else columns[0]}
    elif len(output_names) == 1 and len(arrays) == 1 and output_names[0] not in arrays:
        arrays = {output_names[0]: next(iter(arrays.values()))}
    extra = [n for n in arrays if n not in output_names]
    if extra:
        raise ModelImportError(
            f"expected outputs {extra} are not outputs of the model ({output_names})"
        )
    return {name: np.asarray(value) for name, value in arrays.items()}


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes), hex."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


# -- conversion -------------------------------------------------------------------------


def convert_to_onnx(
    source: Path,
    source_format: SourceFormat,
    sample: Mapping[str, np.ndarray],
    opset: int,
    out_dir: Path,
) -> ImportedModel:
    """``out_dir/model.onnx`` from the source model; ``sample`` (raw arrays as read) gives
    TorchScript its example inputs. Never modifies the source."""
    from onnxflow.onnxfiles import copy_model
    from onnxflow.opset_upgrade import upgrade_for_runtime

    source = Path(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.onnx"
    for stale in (target, target.with_name("model.onnx.data")):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    upgraded_from = None
    try:
        if source_format == "onnx":
            copy_model(source, out_dir)
            upgraded_from = upgrade_for_runtime(target, sample)  # opset ort no longer runs
        elif source_format in ("keras", "savedmodel"):
            _tf_to_onnx(source, source_format, opset, target)
        elif source_format == "torch_export":
            _torch_export_to_onnx(source, opset, target)
        else:
            _torchscript_to_onnx(source, sample, opset, target)
    except ModelImportError:
        raise
    except Exception as exc:  # converters raise whatever their framework raises
        message = " ".join(str(exc).split())[:600]
        raise ModelImportError(
            f"Cannot convert {source} ({source_format}) to ONNX: {type(exc).__name__}: {message}"
        ) from exc
    if source_format != "onnx":  # a user's ONNX file is kept as it is
        _name_batch_axis(target)
    found = default_opset(load_graph(target))
    seconds = time.perf_counter() - started
    log.info(
        "imported %s (%s) as %s, opset %d, in %.1f s", source, source_format, target, found, seconds
    )
    return ImportedModel(
        source=source,
        source_format=source_format,
        framework=FRAMEWORK_OF[source_format],
        path=target,
        exporter=EXPORTER_OF[source_format],
        opset=found,
        export_seconds=seconds,
        upgraded_from_opset=upgraded_from,
    )


def _name_batch_axis(target: Path) -> None:
    """When every input and output has a dynamic first axis, call them all ``batch``."""
    import onnx

    proto = load_graph(target)
    if name_batch_axis(proto):
        onnx.save(proto, str(target))  # external data, if any, stays where it is


def _tf_to_onnx(source: Path, source_format: str, opset: int, target: Path) -> None:
    import onnx
    import tf2onnx

    fn, input_names, output_names = _tf_function(source, source_format)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=opset)
    graph = proto.graph
    if len(graph.output) != len(output_names):
        output_names = [o.name.split(":")[0] for o in graph.output]
    for value, name in zip(list(graph.output), output_names, strict=True):
        if value.name != name:
            rename_value(graph, value.name, name)
    for value, name in zip(list(graph.input), input_names):
        if value.name != name:
            rename_value(graph, value.name, name)
    onnx.save(proto, str(target))


def _tf_function(source: Path, source_format: str):
    """A ``tf.function`` with an explicit input signature, and its input and output names."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if source_format == "keras":
        import keras

        model = keras.models.load_model(source, compile=False)
        specs = [tf.TensorSpec(t.shape, t.dtype, name=_tf_name(t.name)) for t in model.inputs]
        input_names = [s.name for s in specs]
        output_names = list(getattr(model, "output_names", None) or [])
        if len(output_names) != len(model.outputs):
            output_names = [_tf_name(t.name) for t in model.outputs]
        if len(set(output_names)) != len(output_names):
            output_names = [f"output_{i}" for i in range(len(output_names))]

        @tf.function(input_signature=specs)
        def serve(*args):
            result = model(list(args) if len(args) > 1 else args[0], training=False)
            return list(result) if isinstance(result, list | tuple) else result

        return serve, input_names, output_names

    loaded = tf.saved_model.load(str(source))
    if "serving_default" not in loaded.signatures:
        raise ModelImportError(
            f"SavedModel {source} has no serving_default signature "
            f"(it has: {', '.join(loaded.signatures) or 'none'})"
        )
    signature = loaded.signatures["serving_default"]
    inputs = signature.structured_input_signature[1]
    input_names = sorted(inputs)
    output_names = sorted(signature.structured_outputs)
    specs = [tf.TensorSpec(inputs[n].shape, inputs[n].dtype, name=n) for n in input_names]

    @tf.function(input_signature=specs)
    def serve(*args):
        result = signature(**dict(zip(input_names, args)))
        return [result[n] for n in output_names]

    serve._onnxflow_keepalive = loaded  # the signature's variables live in ``loaded``
    return serve, input_names, output_names


def _tf_name(name: str) -> str:
    return name.split(":")[0]


def _torch_export_to_onnx(source: Path, opset: int, target: Path) -> None:
    import torch

    program = torch.export.load(str(source))
    names = torch_input_names(program)
    n_out = len(program.graph_signature.user_outputs)
    # the program carries its own shapes (and dynamic dims): no example arguments needed;
    # the sample is checked against the ONNX inputs afterwards, like every format's
    onnx_program = torch.onnx.export(
        program,
        (),
        None,
        dynamo=True,
        input_names=names,
        output_names=["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)],
        opset_version=opset,
        verbose=False,
    )
    onnx_program.save(str(target), external_data=True)


def torch_input_names(program) -> list[str]:
    """The user inputs of an ExportedProgram (the forward's argument names)."""
    return list(program.graph_signature.user_inputs)


def _torchscript_to_onnx(
    source: Path, sample: Mapping[str, np.ndarray], opset: int, target: Path
) -> None:
    """The legacy (TorchScript) exporter, the one that takes a ScriptModule; the first axis
    of every input and output is declared dynamic (``batch``)."""
    import torch

    module = torch.jit.load(str(source)).eval()
    names = torchscript_input_names(module)
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in _ordered(sample, names))
    with torch.no_grad():
        result = module(*args)
    n_out = len(result) if isinstance(result, tuple | list) else 1
    outputs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    torch.onnx.export(
        module,
        args,
        str(target),
        dynamo=False,
        input_names=names,
        output_names=outputs,
        opset_version=opset,
        dynamic_axes={n: {0: "batch"} for n in (*names, *outputs)},
    )


def torchscript_input_names(module) -> list[str]:
    return [a.name for a in module.forward.schema.arguments[1:]]


def _ordered(sample: Mapping[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    """The sample arrays in the model's argument order (one array fits a one-input model)."""
    if len(sample) == 1 and len(names) == 1:
        return [np.asarray(next(iter(sample.values())))]
    missing = [n for n in names if n not in sample]
    if missing:
        extra = [n for n in sample if n not in names]
        raise ModelImportError(
            f"The sample does not match the model's inputs ({', '.join(names)}): "
            f"no array for input(s) {missing}; array(s) {extra} are not "
            "inputs of the model"
        )
    return [np.asarray(sample[n]) for n in names]


# -- reference outputs ------------------------------------------------------------------


def load_reference(imported: ImportedModel) -> Reference | None:
    """The source model as a function of the ONNX feeds -> its outputs in ONNX output order;
    None for a bare ONNX model (there is no framework to compare with)."""
    fmt, source = imported.source_format, imported.source
    if fmt == "onnx":
        return None
    if fmt in ("keras", "savedmodel"):
        fn, input_names, _ = _tf_function(source, fmt)
        import tensorflow as tf

        def run_tf(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            result = fn(*(tf.convert_to_tensor(feeds[n]) for n in input_names))
            result = result if isinstance(result, list | tuple) else [result]
            return [r.numpy() for r in result]

        return run_tf

    import torch

    if fmt == "torch_export":
        program = torch.export.load(str(source))
        module, names = program.module(), torch_input_names(program)
    else:
        module = torch.jit.load(str(source)).eval()
        names = torchscript_input_names(module)

    def run_torch(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]
        with torch.inference_mode():
            result = module(*args)
        result = result if isinstance(result, tuple | list) else [result]
        return [r.numpy() for r in result]

    return run_torch


# -- the steps after conversion ---------------------------------------------------------


def sample_feeds(model_path: Path, sample_path: Path) -> dict[str, np.ndarray]:
    """The sample bound to the ONNX model's inputs; ModelImportError if it does not fit."""
    session = open_session(model_path)
    table = Path(sample_path).suffix.lower() in TABLE_SUFFIXES
    return bind_sample(read_arrays(sample_path), session.get_inputs(), table=table)


def expected_outputs(model_path: Path, expected_path: Path | None) -> dict[str, np.ndarray] | None:
    """The expected outputs (``--expected``) bound to the ONNX model's output names."""
    if expected_path is None:
        return None
    names = [o.name for o in read_interface(load_graph(model_path)).outputs]
    table = Path(expected_path).suffix.lower() in TABLE_SUFFIXES
    return bind_expected(read_arrays(expected_path, "expected outputs"), names, table)

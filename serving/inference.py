"""One inference request and its answer, whichever front it came through (KServe V2).

:class:`InferRequest` is the protocol-neutral request, as KServe's ``InferRequest``:
``from_rest`` reads the REST body (JSON, with the binary tensor data extension),
``from_grpc`` reads a ``ModelInferRequest`` message; each keeps only what its wire format
decides (JSON types, where binary data starts). :func:`bind` then applies the V2 rules
once for both fronts: input names, datatypes and shapes against the model, parameters
(the classification extension refused, shared memory only when served), where each
tensor's data comes from, and which outputs are wanted. :func:`output_tensors` is the
answer's side: each wanted output, written into shared memory when the request asked.

Nothing here knows HTTP or gRPC objects beyond reading their fields; errors are the
named errors of :mod:`onnxflow.serving.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import orjson

from onnxflow.serving.errors import BadInput
from onnxflow.serving.model import LoadedModel
from onnxflow.serving.shared_memory import PARAMETERS as MEMORY_PARAMETERS
from onnxflow.serving.shared_memory import (
    MemoryReference,
    SharedMemoryRegistry,
    memory_reference,
)
from onnxflow.serving.tensors import (
    V2_DTYPES,
    array_from_binary,
    array_from_json,
    array_to_binary,
    check_shape,
)

UNSUPPORTED_PARAMETERS = ("classification",)
NO_DATA = object()  # an input that carries no values of its own

# InferTensorContents field holding each datatype's values (FP16 only travels raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@dataclass(slots=True)
class InferInput:
    """One input as sent: ``data`` (JSON or typed values) or ``binary`` (raw bytes)."""

    name: str
    datatype: object
    shape: object
    parameters: dict
    data: object = NO_DATA
    binary: memoryview | bytes | None = None


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict


@dataclass(slots=True)
class InferRequest:
    """A V2 inference request, neutral of the front that received it."""

    id: str | None
    parameters: dict
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None  # None: every output of the model

    @classmethod
    def from_rest(cls, body: bytes, header_length: str | None) -> InferRequest:
        """A REST body; with ``Inference-Header-Content-Length`` the JSON is followed by
        the binary data of every input declaring ``parameters.binary_data_size``."""
        binary = memoryview(b"")
        if header_length is not None:
            try:
                n = int(header_length)
            except ValueError:
                raise BadInput(
                    f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
                ) from None
            if not 0 < n <= len(body):
                raise BadInput(
                    f"Inference-Header-Content-Length is {n}, but the body has {len(body)} bytes"
                )
            binary = memoryview(body)[n:]
            body = body[:n]
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadInput(f"malformed JSON: {exc}") from None
        if not isinstance(request, dict):
            raise BadInput("the inference request must be a JSON object with an inputs list")
        request_id = request.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise BadInput("id must be a string")
        items = request.get("inputs")
        if not isinstance(items, list) or not items:
            raise BadInput("the inference request needs a non-empty inputs list")
        inputs, offset = [], 0
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise BadInput(
                    f"inputs[{i}] must be an object with a name, datatype, shape and data"
                )
            name = item["name"]
            entry = InferInput(
                name,
                item.get("datatype"),
                item.get("shape"),
                _json_parameters(item, f"input {name!r}"),
                item.get("data", NO_DATA),
            )
            size = entry.parameters.get("binary_data_size")
            if size is not None:
                if entry.data is not NO_DATA:
                    raise BadInput(f"input {name!r} has both data and binary_data_size")
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise BadInput(
                        f"input {name!r}: binary_data_size must be a non-negative integer"
                    )
                if offset + size > len(binary):
                    raise BadInput(
                        f"input {name!r}: binary_data_size {size} runs past the "
                        f"{len(binary)} bytes of binary data in the body"
                    )
                entry.binary = binary[offset : offset + size]
                offset += size
            inputs.append(entry)
        if offset != len(binary):
            raise BadInput(
                f"{len(binary) - offset} bytes of binary data after the JSON header belong "
                "to no input"
            )
        wanted = request.get("outputs")
        outputs = None
        if wanted is not None:
            if not isinstance(wanted, list):
                raise BadInput("outputs must be a list of objects with a name")
            outputs = []
            for i, item in enumerate(wanted):
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    raise BadInput(f"outputs[{i}] must be an object with a name")
                params = _json_parameters(item, f"output {item['name']!r}")
                outputs.append(RequestedOutput(item["name"], params))
        return cls(request_id, _json_parameters(request, "request"), inputs, outputs)

    @classmethod
    def from_grpc(cls, message) -> InferRequest:
        """A ``ModelInferRequest``: tensors as ``raw_input_contents`` (one per input, in
        order, as tritonclient sends them) or as typed ``contents``."""
        raw = message.raw_input_contents
        if raw and len(raw) != len(message.inputs):
            raise BadInput(
                f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs; "
                "send one per input, in input order"
            )
        inputs = []
        for i, item in enumerate(message.inputs):
            entry = InferInput(
                item.name, item.datatype, list(item.shape), grpc_parameters(item.parameters)
            )
            if raw:
                entry.binary = raw[i]
            if item.HasField("contents"):
                field_name = CONTENTS_FIELD.get(item.datatype)
                if field_name is None:
                    raise BadInput(
                        f"input {item.name!r}: {item.datatype} travels only as raw_input_contents"
                    )
                values = list(getattr(item.contents, field_name))
                if item.datatype == "BYTES":
                    values = [v.decode("utf-8", "surrogateescape") for v in values]
                entry.data = values
            inputs.append(entry)
        outputs = [
            RequestedOutput(o.name, grpc_parameters(o.parameters)) for o in message.outputs
        ] or None
        return cls(message.id or None, grpc_parameters(message.parameters), inputs, outputs)


def grpc_parameters(message) -> dict:
    """A ``map<string, InferParameter>`` as a plain dict of its values."""
    if not message:
        return {}
    return {
        k: getattr(v, v.WhichOneof("parameter_choice") or "string_param")
        for k, v in message.items()
    }


def _json_parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadInput(f"{where}: parameters must be an object")
    return params


@dataclass(slots=True)
class BoundRequest:
    """A request checked against one model: its feeds and the outputs to answer."""

    id: str | None
    feeds: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]  # (name, as binary), in the order asked
    memory_outputs: dict[str, MemoryReference] = field(default_factory=dict)
    memory: SharedMemoryRegistry | None = None
    # the id the request is known by (capture, feedback), set on the request path
    request_id: str | None = None

    @classmethod
    def of_feeds(cls, feeds: dict[str, np.ndarray], output_names: list[str]) -> BoundRequest:
        """Feeds checked elsewhere (MLflow's scoring format), every output answered."""
        return cls(None, feeds, [(name, False) for name in output_names])


def check_parameters(params: dict, where: str, memory: SharedMemoryRegistry | None) -> None:
    """Refuse the extensions this endpoint does not offer."""
    if not params:
        return
    for key in UNSUPPORTED_PARAMETERS:
        if key in params:
            raise BadInput(
                f"{where}: parameter {key!r} is not supported by this endpoint "
                "(no classification extension)"
            )
    if memory is None:
        for key in MEMORY_PARAMETERS:
            if key in params:
                raise BadInput(
                    f"{where}: parameter {key!r} is not supported: this endpoint does not "
                    "serve the system shared-memory extension (start it with --shared-memory)"
                )


def bind(
    request: InferRequest,
    model: LoadedModel,
    max_bytes: int,
    memory: SharedMemoryRegistry | None = None,
) -> BoundRequest:
    """Check ``request`` against ``model`` and make its feeds (the V2 rules, once).
    ``memory``: the registered shared-memory regions, if the extension is served."""
    check_parameters(request.parameters, "request", None)
    feeds: dict[str, np.ndarray] = {}
    for item in request.inputs:
        name = item.name
        spec = model.input_by_name.get(name)
        if spec is None:
            raise BadInput(
                f"unknown input {name!r}; model inputs: {', '.join(model.input_by_name)}"
            )
        if name in feeds:
            raise BadInput(f"input {name!r} is given twice")
        if item.datatype not in V2_DTYPES:
            raise BadInput(
                f"input {name!r}: unknown datatype {item.datatype!r}; expected {spec.datatype}"
            )
        if item.datatype != spec.datatype:
            raise BadInput(
                f"input {name!r}: wrong datatype {item.datatype}; the model takes {spec.datatype}"
            )
        shape = check_shape(spec, item.shape, max_bytes)
        where = f"input {name!r}"
        check_parameters(item.parameters, where, memory)
        ref = memory_reference(item.parameters, where) if memory is not None else None
        if ref is not None:
            if item.data is not NO_DATA or item.binary:
                raise BadInput(f"{where} has shared-memory parameters and data")
            feeds[name] = array_from_binary(spec, memoryview(memory.read(ref, where)), shape)
        elif item.binary is not None:
            feeds[name] = array_from_binary(spec, memoryview(item.binary), shape)
        elif item.data is not NO_DATA:
            feeds[name] = array_from_json(spec, item.data, shape)
        else:
            raise BadInput(f"input {name!r} has neither data nor parameters.binary_data_size")
    missing = [n for n in model.input_by_name if n not in feeds]
    if missing:
        raise BadInput(
            f"missing input(s) {', '.join(map(repr, missing))}; model inputs: "
            f"{', '.join(model.input_by_name)}"
        )

    default_binary = request.parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise BadInput("parameters.binary_data_output must be true or false")
    if request.outputs is None:
        outputs = [(n, default_binary) for n in model.output_names]
        return BoundRequest(request.id, feeds, outputs, {}, memory)
    outputs, memory_outputs = [], {}
    for item in request.outputs:
        name = item.name
        if name not in model.output_by_name:
            raise BadInput(
                f"unknown output {name!r}; model outputs: {', '.join(model.output_names)}"
            )
        where = f"output {name!r}"
        check_parameters(item.parameters, where, memory)
        as_binary = item.parameters.get("binary_data", default_binary)
        if not isinstance(as_binary, bool):
            raise BadInput(f"{where}: binary_data must be true or false")
        if any(name == seen for seen, _ in outputs):
            continue
        outputs.append((name, as_binary))
        ref = memory_reference(item.parameters, where) if memory is not None else None
        if ref is not None:
            memory_outputs[name] = ref
    return BoundRequest(request.id, feeds, outputs, memory_outputs, memory)


@dataclass(slots=True)
class OutputTensor:
    """One output of the answer; ``parameters`` set when it went into shared memory."""

    name: str
    datatype: str
    array: np.ndarray
    as_binary: bool
    parameters: dict | None = None


def output_tensors(
    model: LoadedModel, request: BoundRequest, results: list[np.ndarray]
) -> list[OutputTensor]:
    """The wanted outputs in the order asked; those the request placed in shared memory
    are written there now."""
    by_name = dict(zip(model.output_names, results, strict=True))
    tensors = []
    for name, as_binary in request.outputs:
        tensor = OutputTensor(name, model.output_by_name[name].datatype, by_name[name], as_binary)
        ref = request.memory_outputs.get(name)
        if ref is not None:
            blob = array_to_binary(tensor.datatype, tensor.array)
            request.memory.write(ref, blob, f"output {name!r}")
            tensor.parameters = ref.as_parameters(len(blob))
        tensors.append(tensor)
    return tensors

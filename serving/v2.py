"""The KServe V2 (Open Inference Protocol) inference request and response, REST flavour.

Includes the binary tensor data extension: with an ``Inference-Header-Content-Length``
header the body is that many bytes of JSON followed by the binary data of every input
that declares ``parameters.binary_data_size``, in input order. Outputs are returned as
binary when the request asks (``binary_data`` per output, or ``binary_data_output`` for
all), with the same header on the response. Tensor data in JSON is row-major, flat or
nested. With the system shared-memory extension on (a registry given), inputs may be
read from and outputs written to registered regions (:mod:`onnxflow.serving.shared_memory`);
the classification extension is not offered and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import orjson

from onnxflow.serving.errors import RequestError
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
    array_to_json,
    check_shape,
)

HEADER_LENGTH = "inference-header-content-length"
UNSUPPORTED_PARAMETERS = ("classification",)


@dataclass
class V2Request:
    id: str | None
    feeds: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]  # (name, as binary)
    # outputs to write into shared memory, and where
    memory_outputs: dict[str, MemoryReference] = field(default_factory=dict)
    memory: SharedMemoryRegistry | None = None


def _parameters(obj: dict, where: str, memory: SharedMemoryRegistry | None = None) -> dict:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RequestError(f"{where}: parameters must be an object")
    for key in UNSUPPORTED_PARAMETERS:
        if key in params:
            raise RequestError(
                f"{where}: parameter {key!r} is not supported by this endpoint "
                "(no classification extension)"
            )
    if memory is None:
        refuse_memory_parameters(params, where)
    return params


def refuse_memory_parameters(params, where: str) -> None:
    """Shared-memory parameters on an endpoint that does not serve the extension."""
    for key in MEMORY_PARAMETERS:
        if key in params:
            raise RequestError(
                f"{where}: parameter {key!r} is not supported: this endpoint does not serve "
                "the system shared-memory extension (start it with --shared-memory)"
            )


def decode_request(
    body: bytes,
    header_length: str | None,
    model: LoadedModel,
    max_bytes: int,
    memory: SharedMemoryRegistry | None = None,
) -> V2Request:
    """Parse and check an inference request against ``model``; returns its feeds.
    ``memory``: the registered shared-memory regions, if the extension is served."""
    binary = memoryview(b"")
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(
                f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
            ) from None
        if not 0 < n <= len(body):
            raise RequestError(
                f"Inference-Header-Content-Length is {n}, but the body has {len(body)} bytes"
            )
        binary = memoryview(body)[n:]
        body = body[:n]
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError("the inference request must be a JSON object with an inputs list")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("id must be a string")
    params = _parameters(request, "request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("the inference request needs a non-empty inputs list")

    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(
                f"inputs[{i}] must be an object with a name, datatype, shape and data"
            )
        name = item["name"]
        spec = model.input_by_name.get(name)
        if spec is None:
            raise RequestError(
                f"unknown input {name!r}; model inputs: {', '.join(model.input_by_name)}"
            )
        if name in feeds:
            raise RequestError(f"input {name!r} is given twice")
        datatype = item.get("datatype")
        if datatype not in V2_DTYPES:
            raise RequestError(
                f"input {name!r}: unknown datatype {datatype!r}; expected {spec.datatype}"
            )
        if datatype != spec.datatype:
            raise RequestError(
                f"input {name!r}: wrong datatype {datatype}; the model takes {spec.datatype}"
            )
        shape = check_shape(spec, item.get("shape"), max_bytes)
        where = f"input {name!r}"
        item_params = _parameters(item, where, memory)
        size = item_params.get("binary_data_size")
        ref = memory_reference(item_params, where) if memory is not None else None
        if ref is not None:
            if "data" in item or size is not None:
                raise RequestError(f"{where} has shared-memory parameters and data")
            feeds[name] = array_from_binary(spec, memoryview(memory.read(ref, where)), shape)
        elif size is not None:
            if "data" in item:
                raise RequestError(f"input {name!r} has both data and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RequestError(
                    f"input {name!r}: binary_data_size must be a non-negative integer"
                )
            if offset + size > len(binary):
                raise RequestError(
                    f"input {name!r}: binary_data_size {size} runs past the "
                    f"{len(binary)} bytes of binary data in the body"
                )
            feeds[name] = array_from_binary(spec, binary[offset : offset + size], shape)
            offset += size
        elif "data" in item:
            feeds[name] = array_from_json(spec, item["data"], shape)
        else:
            raise RequestError(f"input {name!r} has neither data nor parameters.binary_data_size")
    missing = [n for n in model.input_by_name if n not in feeds]
    if missing:
        raise RequestError(
            f"missing input(s) {', '.join(map(repr, missing))}; model inputs: "
            f"{', '.join(model.input_by_name)}"
        )
    if offset != len(binary):
        raise RequestError(
            f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input"
        )

    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise RequestError("parameters.binary_data_output must be true or false")
    wanted = request.get("outputs")
    memory_outputs: dict[str, MemoryReference] = {}
    if wanted is None:
        outputs = [(n, default_binary) for n in model.output_names]
    else:
        if not isinstance(wanted, list):
            raise RequestError("outputs must be a list of objects with a name")
        outputs, seen = [], set()
        for i, item in enumerate(wanted):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise RequestError(f"outputs[{i}] must be an object with a name")
            name = item["name"]
            if name not in model.output_by_name:
                raise RequestError(
                    f"unknown output {name!r}; model outputs: {', '.join(model.output_names)}"
                )
            out_params = _parameters(item, f"output {name!r}", memory)
            as_binary = out_params.get("binary_data", default_binary)
            if not isinstance(as_binary, bool):
                raise RequestError(f"output {name!r}: binary_data must be true or false")
            if name not in seen:
                seen.add(name)
                outputs.append((name, as_binary))
                ref = memory_reference(out_params, f"output {name!r}") if memory else None
                if ref is not None:
                    memory_outputs[name] = ref
    return V2Request(request_id, feeds, outputs, memory_outputs, memory)


def encode_response(
    model: LoadedModel, request: V2Request, results: list[np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of the response; binary outputs follow the JSON header."""
    by_name = dict(zip(model.output_names, results))
    entries, blobs = [], []
    for name, as_binary in request.outputs:
        arr = by_name[name]
        datatype = model.output_by_name[name].datatype
        entry = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        ref = request.memory_outputs.get(name)
        if ref is not None:
            blob = array_to_binary(datatype, arr)
            request.memory.write(ref, blob, f"output {name!r}")
            entry["parameters"] = ref.as_parameters(len(blob))
        elif as_binary:
            blob = array_to_binary(datatype, arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array_to_json(datatype, arr)
        entries.append(entry)
    response = {"model_name": model.name, "model_version": model.version, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }

"""The KServe V2 (Open Inference Protocol) inference answer, REST flavour.

The request is read by :meth:`onnxflow.serving.inference.InferRequest.from_rest` and
checked by :func:`onnxflow.serving.inference.bind` (the rules both fronts share). Outputs
are returned as binary when the request asks (``binary_data`` per output, or
``binary_data_output`` for all), after the JSON header, whose length the
``Inference-Header-Content-Length`` header gives; tensor data in JSON is row-major, flat.
"""

from __future__ import annotations

import numpy as np
import orjson

from onnxflow.serving.inference import BoundRequest, output_tensors
from onnxflow.serving.model import LoadedModel
from onnxflow.serving.tensors import array_to_binary, array_to_json

HEADER_LENGTH = "inference-header-content-length"


def encode_response(
    model: LoadedModel, request: BoundRequest, results: list[np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of the response; binary outputs follow the JSON header."""
    entries, blobs = [], []
    for tensor in output_tensors(model, request, results):
        arr = tensor.array
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(arr.shape)}
        if tensor.parameters is not None:
            entry["parameters"] = tensor.parameters
        elif tensor.as_binary:
            blob = array_to_binary(tensor.datatype, arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array_to_json(tensor.datatype, arr)
        entries.append(entry)
    response = {"model_name": model.name, "model_version": model.version, "outputs": entries}
    # the request's own id, else the one it is known by (its X-Request-ID, or the capture's
    # new one): where V2 clients read a request's id, as gRPC's answers carry it
    known = request.id if request.id is not None else request.request_id
    if known is not None:
        response["id"] = known
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }

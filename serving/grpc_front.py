"""The gRPC front: KServe V2 / Triton's ``inference.GRPCInferenceService`` over the data plane.

Served with grpcio's asyncio server on the endpoint's own event loop, against the
protocol stubs tritonclient ships (``tritonclient.grpc.service_pb2``), so Triton's and
KServe's gRPC clients work unchanged. The same checks as REST: the token as
``authorization`` metadata (``Bearer <token>``), the body size limit as the largest
message, every tensor checked against the model before an array is made. Errors are the
data plane's named errors as gRPC status codes (``RequestError.grpc_code``).

Tensors come as ``raw_input_contents`` (little-endian, BYTES length-prefixed: what
tritonclient sends), as typed ``contents``, or from a registered system shared-memory
region (``--shared-memory``); outputs go back as ``raw_output_contents``, or into the
region the request names.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from onnxflow.serving.dataplane import DataPlane
from onnxflow.serving.errors import BadInput, NotFound, NotReady, NotSupported, RequestError
from onnxflow.serving.model import LoadedModel
from onnxflow.serving.shared_memory import (
    MemoryReference,
    SharedMemoryRegistry,
    cuda_not_supported,
    memory_reference,
)
from onnxflow.serving.tensors import (
    array_from_binary,
    array_from_json,
    array_to_binary,
    check_shape,
)
from onnxflow.serving.v2 import refuse_memory_parameters

log = logging.getLogger(__name__)

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


def _stubs():
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    return service_pb2, service_pb2_grpc


def parameters(message) -> dict:
    """A ``map<string, InferParameter>`` as a plain dict of its values."""
    return {
        k: getattr(v, v.WhichOneof("parameter_choice") or "string_param")
        for k, v in message.items()
    }


def decode_infer_request(
    request, model: LoadedModel, max_bytes: int, memory: SharedMemoryRegistry | None = None
) -> dict[str, np.ndarray]:
    """The request's inputs as checked arrays, keyed by name (``memory``: the registered
    shared-memory regions, if the extension is served)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadInput(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "send one per input, in input order"
        )
    feeds: dict[str, np.ndarray] = {}
    for i, item in enumerate(request.inputs):
        spec = model.input_by_name.get(item.name)
        if spec is None:
            raise BadInput(
                f"unknown input {item.name!r}; model inputs: {', '.join(model.input_by_name)}"
            )
        if item.name in feeds:
            raise BadInput(f"input {item.name!r} is given twice")
        if item.datatype != spec.datatype:
            raise BadInput(
                f"input {item.name!r}: wrong datatype {item.datatype or '(none)'}; "
                f"the model takes {spec.datatype}"
            )
        where = f"input {item.name!r}"
        params = parameters(item.parameters)
        if memory is None:
            refuse_memory_parameters(params, where)
        shape = check_shape(spec, [int(d) for d in item.shape], max_bytes)
        ref = memory_reference(params, where) if memory is not None else None
        if ref is not None:
            if item.HasField("contents") or (raw and raw[i]):
                raise BadInput(f"{where} has shared-memory parameters and contents")
            feeds[item.name] = array_from_binary(spec, memoryview(memory.read(ref, where)), shape)
        elif raw:
            feeds[item.name] = array_from_binary(spec, memoryview(raw[i]), shape)
        else:
            field = CONTENTS_FIELD.get(spec.datatype)
            if field is None:
                raise BadInput(
                    f"input {item.name!r}: {spec.datatype} travels only as raw_input_contents"
                )
            values = list(getattr(item.contents, field))
            if spec.datatype == "BYTES":
                values = [v.decode("utf-8", "surrogateescape") for v in values]
            feeds[item.name] = array_from_json(spec, values, shape)
    missing = [n for n in model.input_by_name if n not in feeds]
    if missing:
        raise BadInput(
            f"missing input(s) {', '.join(map(repr, missing))}; model inputs: "
            f"{', '.join(model.input_by_name)}"
        )
    return feeds


class InferenceService:
    """The servicer: each RPC authorizes, asks the data plane, and maps its errors."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.pb, _ = _stubs()

    # --- helpers ---------------------------------------------------------------------

    async def _call(self, rpc: str, context, handler, *, guarded: bool = True):
        start = time.perf_counter()
        status = 200
        try:
            if guarded:
                metadata = dict(context.invocation_metadata() or ())
                self.plane.authorize(metadata.get("authorization"))
            return await handler()
        except RequestError as exc:
            import grpc

            status = exc.status
            await context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
        except Exception as exc:  # noqa: BLE001  (answered as INTERNAL, logged)
            import grpc

            status = 500
            log.exception("unhandled error in gRPC %s", rpc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            self.plane.metrics.observe_request(
                f"grpc:{rpc}", "GRPC", status, time.perf_counter() - start
            )

    # --- health and metadata ---------------------------------------------------------

    async def ServerLive(self, request, context):  # noqa: N802  (the protocol's names)
        async def handler():
            return self.pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, handler, guarded=False)

    async def ServerReady(self, request, context):  # noqa: N802
        async def handler():
            return self.pb.ServerReadyResponse(ready=self.plane.ready())

        return await self._call("ServerReady", context, handler, guarded=False)

    async def ModelReady(self, request, context):  # noqa: N802
        async def handler():
            try:
                self.plane.model(request.name, request.version or None)
            except (NotFound, NotReady):
                return self.pb.ModelReadyResponse(ready=False)
            return self.pb.ModelReadyResponse(ready=True)

        return await self._call("ModelReady", context, handler, guarded=False)

    async def ServerMetadata(self, request, context):  # noqa: N802
        async def handler():
            meta = self.plane.server_metadata()
            return self.pb.ServerMetadataResponse(
                name=meta["name"], version=meta["version"], extensions=meta["extensions"]
            )

        return await self._call("ServerMetadata", context, handler, guarded=False)

    async def ModelMetadata(self, request, context):  # noqa: N802
        async def handler():
            model = self.plane.model(request.name, request.version or None)
            tensor = self.pb.ModelMetadataResponse.TensorMetadata
            return self.pb.ModelMetadataResponse(
                name=model.name,
                versions=[model.version],
                platform="onnxruntime_onnx",
                inputs=[
                    tensor(name=s.name, datatype=s.datatype, shape=list(s.shape))
                    for s in model.inputs
                ],
                outputs=[
                    tensor(name=s.name, datatype=s.datatype, shape=list(s.shape))
                    for s in model.outputs
                ],
            )

        return await self._call("ModelMetadata", context, handler)

    async def ModelConfig(self, request, context):  # noqa: N802
        async def handler():
            from google.protobuf import json_format
            from tritonclient.grpc import model_config_pb2

            config = self.plane.model_config(request.name, request.version or None)
            return self.pb.ModelConfigResponse(
                config=json_format.ParseDict(config, model_config_pb2.ModelConfig())
            )

        return await self._call("ModelConfig", context, handler)

    async def RepositoryIndex(self, request, context):  # noqa: N802
        async def handler():
            entries = []
            for entry in self.plane.repository_index(ready_only=request.ready):
                entries.append(self.pb.RepositoryIndexResponse.ModelIndex(**entry))
            return self.pb.RepositoryIndexResponse(models=entries)

        return await self._call("RepositoryIndex", context, handler)

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        async def handler():
            await self.plane.load(request.model_name, parameters(request.parameters))
            return self.pb.RepositoryModelLoadResponse()

        return await self._call("RepositoryModelLoad", context, handler)

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        async def handler():
            await self.plane.unload(request.model_name)
            return self.pb.RepositoryModelUnloadResponse()

        return await self._call("RepositoryModelUnload", context, handler)

    async def ModelStatistics(self, request, context):  # noqa: N802
        async def handler():
            from google.protobuf import json_format

            report = self.plane.statistics(request.name or None, request.version or None)
            return json_format.ParseDict(
                report, self.pb.ModelStatisticsResponse(), ignore_unknown_fields=True
            )

        return await self._call("ModelStatistics", context, handler)

    # --- inference -------------------------------------------------------------------

    async def ModelInfer(self, request, context):  # noqa: N802
        async def handler():
            model = self.plane.inference_model(request.model_name, request.model_version or None)
            request_id = self.plane.request_id(request.id)
            wanted = [o.name for o in request.outputs] or model.output_names
            memory = self.plane.shared_memory
            targets: dict[str, MemoryReference] = {}

            def decode():
                for name in wanted:
                    if name not in model.output_by_name:
                        raise BadInput(
                            f"unknown output {name!r}; model outputs: "
                            f"{', '.join(model.output_names)}"
                        )
                for output in request.outputs:
                    where = f"output {output.name!r}"
                    params = parameters(output.parameters)
                    if memory is None:
                        refuse_memory_parameters(params, where)
                    elif (ref := memory_reference(params, where)) is not None:
                        targets[output.name] = ref
                return decode_infer_request(
                    request, model, self.plane.settings.max_body_bytes, memory
                )

            def encode(outputs):
                results = dict(zip(model.output_names, outputs, strict=True))
                response = self.pb.ModelInferResponse(
                    model_name=model.name, model_version=model.version, id=request_id or ""
                )
                # tritonclient finds an output's raw contents by its index among the
                # outputs: a shared-memory output keeps its place with empty contents when
                # others travel raw.
                all_in_memory = all(name in targets for name in wanted)
                for name in dict.fromkeys(wanted):
                    arr = results[name]
                    datatype = model.output_by_name[name].datatype
                    tensor = response.outputs.add(
                        name=name, datatype=datatype, shape=list(arr.shape)
                    )
                    blob = array_to_binary(datatype, arr)
                    ref = targets.get(name)
                    if ref is None:
                        response.raw_output_contents.append(blob)
                        continue
                    memory.write(ref, blob, f"output {name!r}")
                    for key, value in ref.as_parameters(len(blob)).items():
                        if isinstance(value, str):
                            tensor.parameters[key].string_param = value
                        else:
                            tensor.parameters[key].int64_param = value
                    if not all_in_memory:
                        response.raw_output_contents.append(b"")
                return response

            return await self.plane.run_request(model, decode, encode, lambda: request_id)

        return await self._call("ModelInfer", context, handler)


class SharedMemoryService:
    """Triton's shared-memory RPCs: system shared memory when served, CUDA never (the
    clearing calls Triton's clients make first still succeed)."""

    def _registry(self) -> SharedMemoryRegistry:
        if self.plane.shared_memory is None:
            raise NotSupported(
                "system shared memory is not served by this endpoint "
                "(start it with --shared-memory)"
            )
        return self.plane.shared_memory

    async def SystemSharedMemoryStatus(self, request, context):  # noqa: N802
        async def handler():
            if self.plane.shared_memory is None and not request.name:
                regions = []
            else:
                regions = self._registry().status(request.name or None)
            response = self.pb.SystemSharedMemoryStatusResponse()
            for region in regions:
                response.regions[region["name"]].CopyFrom(response.RegionStatus(**region))
            return response

        return await self._call("SystemSharedMemoryStatus", context, handler)

    async def SystemSharedMemoryRegister(self, request, context):  # noqa: N802
        async def handler():
            self._registry().register(request.name, request.key, request.offset, request.byte_size)
            return self.pb.SystemSharedMemoryRegisterResponse()

        return await self._call("SystemSharedMemoryRegister", context, handler)

    async def SystemSharedMemoryUnregister(self, request, context):  # noqa: N802
        async def handler():
            if self.plane.shared_memory is not None:
                self.plane.shared_memory.unregister(request.name or None)
            return self.pb.SystemSharedMemoryUnregisterResponse()

        return await self._call("SystemSharedMemoryUnregister", context, handler)

    async def CudaSharedMemoryStatus(self, request, context):  # noqa: N802
        async def handler():
            if request.name:
                raise cuda_not_supported()
            return self.pb.CudaSharedMemoryStatusResponse()

        return await self._call("CudaSharedMemoryStatus", context, handler)

    async def CudaSharedMemoryRegister(self, request, context):  # noqa: N802
        async def handler():
            raise cuda_not_supported()

        return await self._call("CudaSharedMemoryRegister", context, handler)

    async def CudaSharedMemoryUnregister(self, request, context):  # noqa: N802
        async def handler():
            return self.pb.CudaSharedMemoryUnregisterResponse()  # none can be registered

        return await self._call("CudaSharedMemoryUnregister", context, handler)


async def start_grpc(plane: DataPlane, host: str, port: int):
    """Start the gRPC server on the running loop; returns (server, bound port)."""
    import grpc

    _, stubs = _stubs()
    limit = plane.settings.max_body_bytes + 64 * 1024  # the body limit, plus the envelope
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    # The generated base answers UNIMPLEMENTED for what is not served here (streaming,
    # trace and log settings).
    servicer = type(
        "Servicer",
        (InferenceService, SharedMemoryService, stubs.GRPCInferenceServiceServicer),
        {},
    )
    stubs.add_GRPCInferenceServiceServicer_to_server(servicer(plane), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    log.info("gRPC (KServe V2 / Triton GRPCInferenceService) on %s:%s", host, bound)
    return server, bound

"""The gRPC front: KServe V2 / Triton's ``inference.GRPCInferenceService`` over the data plane.

Served by grpcio's synchronous server (:func:`grpc_threads`), against the protocol stubs
tritonclient ships (``tritonclient.grpc.service_pb2``), so Triton's and KServe's gRPC
clients work unchanged. Each RPC is a coroutine run on the endpoint's own event loop
(:func:`_on_loop`): grpcio's threads read and write the messages (protobuf and HTTP/2,
mostly outside the GIL) while the loop only runs the request; that measured cheaper and
much faster under load than ``grpc.aio`` on the loop, whose per-call tasks and wake-ups
cost the loop more than the whole REST request (docs/benchmarks.md). ``ModelInfer``
reads the message into the neutral :class:`~onnxflow.serving.inference.InferRequest` and
takes the one request path REST takes (where the V2 rules bind it to the model); for a
model that runs inline it is answered in grpcio's thread without the hop to the loop
(:meth:`DataPlane.run_request_here`), the rest on the loop
(:meth:`DataPlane.run_request`). Only the answer's encoding is gRPC's own. The token is
``authorization`` metadata (``Bearer <token>``), the body size limit the largest message.
Errors are the data plane's named errors as gRPC status codes (``RequestError.grpc_code``).

Tensors come as ``raw_input_contents`` (little-endian, BYTES length-prefixed: what
tritonclient sends), as typed ``contents``, or from a registered system shared-memory
region (``--shared-memory``); outputs go back as ``raw_output_contents``, or into the
region the request names.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from onnxflow.serving.dataplane import DataPlane
from onnxflow.serving.errors import NotFound, NotReady, NotSupported, RequestError
from onnxflow.serving.inference import InferRequest, grpc_parameters, output_tensors
from onnxflow.serving.shared_memory import SharedMemoryRegistry, cuda_not_supported
from onnxflow.serving.tensors import array_to_binary

log = logging.getLogger(__name__)

# grpcio's threads. Each reads a call and answers it: in the thread when the model runs
# inline (:meth:`InferenceService.infer_here`), else by handing its coroutine to the loop
# and waiting, so they bound the calls in flight. At least this many, so that a slow call
# (a model load) does not hold the others back; few, as they contend for the GIL
# (team_bench, 8 client threads: 2 threads ~2,500 requests/s, 4 threads ~2,100).
GRPC_THREADS = 2


def _stubs():
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    return service_pb2, service_pb2_grpc


class InferenceService:
    """The servicer: each RPC authorizes, asks the data plane, and maps its errors."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.pb, _ = _stubs()

    # --- helpers ---------------------------------------------------------------------

    async def _call(self, rpc: str, context, handler, *, guarded: bool = True):
        """Authorize, run ``handler`` and count the call; errors are raised, for the
        handler's thread to answer as status codes (:func:`_on_loop`)."""
        start = time.perf_counter()
        status = 200
        try:
            if guarded and self.plane.token is not None:
                self.plane.authorize(_authorization(context))
            return await handler()
        except RequestError as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            log.exception("unhandled error in gRPC %s", rpc)
            raise
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
            return self.pb.ServerReadyResponse(ready=self.plane.repository.ready())

        return await self._call("ServerReady", context, handler, guarded=False)

    async def ModelReady(self, request, context):  # noqa: N802
        async def handler():
            try:
                self.plane.repository.model(request.name, request.version or None)
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
            model = self.plane.repository.model(request.name, request.version or None)
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

            config = self.plane.repository.model_config(request.name, request.version or None)
            return self.pb.ModelConfigResponse(
                config=json_format.ParseDict(config, model_config_pb2.ModelConfig())
            )

        return await self._call("ModelConfig", context, handler)

    async def RepositoryIndex(self, request, context):  # noqa: N802
        async def handler():
            entries = []
            for entry in self.plane.repository.repository_index(ready_only=request.ready):
                entries.append(self.pb.RepositoryIndexResponse.ModelIndex(**entry))
            return self.pb.RepositoryIndexResponse(models=entries)

        return await self._call("RepositoryIndex", context, handler)

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        async def handler():
            parameters = grpc_parameters(request.parameters)
            await self.plane.repository.load(request.model_name, parameters)
            return self.pb.RepositoryModelLoadResponse()

        return await self._call("RepositoryModelLoad", context, handler)

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        async def handler():
            await self.plane.repository.unload(request.model_name)
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
        return await self._call("ModelInfer", context, partial(self._infer, request))

    async def _infer(self, request):
        model = self.plane.inference_model(request.model_name, request.model_version or None)
        return await self.plane.run_request(
            model, partial(InferRequest.from_grpc, request), self._encode
        )

    def infer_here(self, request, context, loop):
        """``ModelInfer`` answered in grpcio's thread when the model runs inline
        (:meth:`DataPlane.run_request_here`): the hop to the loop and back cost more than
        the rest of the call. None: the call goes to the loop (:meth:`ModelInfer`)."""
        start = time.perf_counter()
        status = 200
        try:
            if self.plane.token is not None:
                self.plane.authorize(_authorization(context))
            model = self.plane.inference_model(request.model_name, request.model_version or None)
            if not self.plane.runs_here(model):
                status = None
                return None
            return self.plane.run_request_here(
                model, partial(InferRequest.from_grpc, request), self._encode, loop
            )
        except RequestError as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            log.exception("unhandled error in gRPC ModelInfer")
            raise
        finally:
            if status is not None:
                self.plane.metrics.observe_request(
                    "grpc:ModelInfer", "GRPC", status, time.perf_counter() - start
                )

    def _encode(self, model, bound, results):
        """The answer as a ``ModelInferResponse``: outputs as ``raw_output_contents``."""
        response = self.pb.ModelInferResponse(
            model_name=model.name,
            model_version=model.version,
            id=bound.request_id or bound.id or "",
        )
        tensors = output_tensors(model, bound, results)
        # tritonclient finds an output's raw contents by its index among the outputs: a
        # shared-memory output keeps its place with empty contents when others travel raw.
        all_in_memory = all(t.parameters is not None for t in tensors)
        raw = response.raw_output_contents
        for tensor in tensors:
            entry = response.outputs.add(
                name=tensor.name, datatype=tensor.datatype, shape=tensor.array.shape
            )
            if tensor.parameters is None:
                raw.append(array_to_binary(tensor.datatype, tensor.array))
                continue
            for key, value in tensor.parameters.items():
                if isinstance(value, str):
                    entry.parameters[key].string_param = value
                else:
                    entry.parameters[key].int64_param = value
            if not all_in_memory:
                raw.append(b"")
        return response


def _authorization(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


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


class _Servicer(InferenceService, SharedMemoryService):
    """Every RPC served, as coroutines on the endpoint's loop."""


class GrpcFront:
    """grpcio's server and the bridge from its threads to the endpoint's loop."""

    def __init__(self, server) -> None:
        self.server = server

    async def stop(self, grace: float) -> None:
        # stop() answers at once; the handlers still running finish on this loop, so
        # wait for the server to be done without blocking it
        done = self.server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, done.wait, grace + 1)


def _on_loop(loop: asyncio.AbstractEventLoop, method, here=None):
    """``method`` (an async RPC of the servicer) as grpcio's synchronous handler: the
    coroutine runs on the endpoint's loop, the calling thread waits for its task and
    answers errors as status codes (``RequestError.grpc_code``). ``here(request,
    context, loop)``: tried first in the calling thread; its None sends the call to the
    loop."""
    import grpc

    def handler(request, context):
        if here is not None:
            try:
                answer = here(request, context, loop)
            except RequestError as exc:
                context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
            except Exception as exc:  # noqa: BLE001  (logged by ``here``)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
            if answer is not None:
                return answer
        finished: queue.SimpleQueue = queue.SimpleQueue()

        def begin() -> None:
            loop.create_task(method(request, context)).add_done_callback(finished.put)

        try:
            loop.call_soon_threadsafe(begin)
            while True:
                try:
                    task = finished.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not loop.is_running():  # stopped before it ran the call
                        raise RuntimeError("the loop stopped") from None
        except RuntimeError:  # the loop is closed or stopped: the endpoint is stopping
            context.abort(grpc.StatusCode.UNAVAILABLE, "the endpoint is stopping")
        if task.cancelled():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the endpoint is stopping")
        exc = task.exception()
        if exc is None:
            return task.result()
        if isinstance(exc, RequestError):
            context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    return handler


def grpc_threads(settings) -> int:
    """grpcio's threads: enough for a full batch to gather (``--max-batch-size``) while
    every inference thread runs, and never fewer than :data:`GRPC_THREADS`."""
    return max(GRPC_THREADS, settings.max_batch_size + settings.inference_threads)


async def start_grpc(plane: DataPlane, host: str, port: int) -> tuple[GrpcFront, int]:
    """Start the gRPC server for the running loop; returns (front, bound port)."""
    import grpc

    _, stubs = _stubs()
    limit = plane.settings.max_body_bytes + 64 * 1024  # the body limit, plus the envelope
    server = grpc.server(
        ThreadPoolExecutor(grpc_threads(plane.settings), thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ],
    )
    servicer = _Servicer(plane)
    loop = asyncio.get_running_loop()
    # The generated base answers UNIMPLEMENTED for what is not served here (streaming,
    # trace and log settings): only the RPCs served are bridged onto the loop.
    bridged = {
        name: staticmethod(_on_loop(loop, getattr(servicer, name)))
        for name in vars(stubs.GRPCInferenceServiceServicer)
        if inspect.iscoroutinefunction(getattr(servicer, name, None))
    }
    bridged["ModelInfer"] = staticmethod(_on_loop(loop, servicer.ModelInfer, servicer.infer_here))
    front = type("GrpcServicer", (stubs.GRPCInferenceServiceServicer,), bridged)()
    stubs.add_GRPCInferenceServiceServicer_to_server(front, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    server.start()
    log.info("gRPC (KServe V2 / Triton GRPCInferenceService) on %s:%s", host, bound)
    return GrpcFront(server), bound

"""The REST routes of Triton's shared-memory extensions, over the data plane's registry.

System shared memory (``/v2/systemsharedmemory[/region/NAME]/{status,register,unregister}``)
is served when the endpoint is started with it (``--shared-memory``); without it, and for
CUDA shared memory always, the routes still answer, so Triton's clients, which clear both
kinds of region before they start, work: status lists no region, unregistering nothing
succeeds, and registering is refused with a message that says why.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from onnxflow.serving.dataplane import DataPlane
from onnxflow.serving.errors import BadInput, NotSupported
from onnxflow.serving.shared_memory import cuda_not_supported

JSON = "application/json"


def _json(content) -> Response:
    return Response(orjson.dumps(content), media_type=JSON)


class SharedMemoryEndpoints:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def _registry(self):
        registry = self.plane.shared_memory
        if registry is None:
            raise NotSupported(
                "system shared memory is not served by this endpoint "
                "(start it with --shared-memory)"
            )
        return registry

    async def status(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        name = request.path_params.get("region")
        if self.plane.shared_memory is None and name is None:
            return _json([])
        return _json(self._registry().status(name))

    async def register(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        registry = self._registry()
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise BadInput(f"malformed JSON: {exc}") from None
        if not isinstance(body, dict) or "key" not in body or "byte_size" not in body:
            raise BadInput(
                'the register request must be a JSON object {"key": "/name", '
                '"offset": 0, "byte_size": N}'
            )
        registry.register(
            request.path_params["region"], body["key"], body.get("offset", 0), body["byte_size"]
        )
        return _json({})

    async def unregister(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        if self.plane.shared_memory is not None:
            self.plane.shared_memory.unregister(request.path_params.get("region"))
        return _json({})

    async def cuda_status(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        name = request.path_params.get("region")
        if name is not None:
            raise cuda_not_supported()
        return _json([])

    async def cuda_register(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        raise cuda_not_supported()

    async def cuda_unregister(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        return _json({})  # no CUDA region can have been registered


def shared_memory_routes(plane: DataPlane) -> list[Route]:
    ep = SharedMemoryEndpoints(plane)
    routes = []
    for kind, status, register, unregister in (
        ("systemsharedmemory", ep.status, ep.register, ep.unregister),
        ("cudasharedmemory", ep.cuda_status, ep.cuda_register, ep.cuda_unregister),
    ):
        base, region = f"/v2/{kind}", f"/v2/{kind}/region/{{region}}"
        routes += [
            Route(base + "/status", status, methods=["GET"]),
            Route(region + "/status", status, methods=["GET"]),
            Route(region + "/register", register, methods=["POST"]),
            Route(base + "/unregister", unregister, methods=["POST"]),
            Route(region + "/unregister", unregister, methods=["POST"]),
        ]
    return routes

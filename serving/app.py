"""The REST front: KServe V2 and MLflow scoring routes over the data plane.

Every error is a JSON ``{"error": ...}``; bad input is a 4xx that names the problem.
Inference responses carry ``X-Model-Name`` and ``X-Model-Version``: which version
answered.

The inference routes carry the load, and at batch 1 their cost is mostly framework
overhead, so POSTs to them go straight from :class:`FrontDoor` to raw ASGI handlers
(:class:`InferenceRoute`); Starlette routes everything else. Each request reads the
served model once, so a swap never mixes versions within a request. Fast models run on
the event loop (a thread hop costs more than the run), slow ones in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import zlib

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from onnxflow.serving import mlflow_format, v2
from onnxflow.serving.dataplane import DataPlane
from onnxflow.serving.errors import BadInput, RequestError, TooLarge, UnsupportedMedia
from onnxflow.serving.inference import BoundRequest, InferRequest
from onnxflow.serving.metrics import ServingMetrics
from onnxflow.serving.model import LoadedModel
from onnxflow.serving.openapi import openapi_document
from onnxflow.serving.settings import ServingSettings
from onnxflow.serving.shared_memory_routes import shared_memory_routes

log = logging.getLogger(__name__)

JSON = "application/json"


def json_response(content, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type=JSON
    )


def error_response(message: str, status: int, headers: dict | None = None) -> Response:
    return json_response({"error": message}, status, headers)


class RestEndpoints:
    """The REST routes: parse HTTP, call the :class:`DataPlane`, write HTTP. Nothing else."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.settings = plane.settings
        self.metrics = plane.metrics

    async def read_body(
        self, headers, receive, content_types: tuple[str, ...], allow_missing: bool
    ) -> bytes:
        """The request body, after the content type and size limit are checked."""
        ctype = headers.get("content-type")
        if ctype is None:
            if not allow_missing:
                raise UnsupportedMedia(
                    f"missing Content-Type; send one of {', '.join(content_types)}"
                )
        elif ctype.split(";", 1)[0].strip().lower() not in content_types:
            raise UnsupportedMedia(
                f"unsupported Content-Type {ctype!r}; send one of {', '.join(content_types)}"
            )
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadInput(f"Content-Length {declared!r} is not a number")
            if int(declared) > limit:
                raise TooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
        message = await receive()
        body = message.get("body", b"")
        if message.get("more_body"):
            chunks, size = [body], len(body)
            while message.get("more_body"):
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise BadInput("client went away before sending the body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"body is over the limit of {limit} bytes")
                chunks.append(chunk)
            body = b"".join(chunks)
        if len(body) > limit:
            raise TooLarge(f"body is over the limit of {limit} bytes")
        encoding = headers.get("content-encoding")
        if encoding and encoding.lower() != "identity":
            body = _decompress(body, encoding.lower(), limit)
        return body

    # --- routes ----------------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return json_response(self.plane.server_metadata())

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        ok = self.plane.repository.ready()
        return json_response({"ready": ok}, 200 if ok else 503)

    async def model_metadata(self, request: Request) -> Response:
        params = request.path_params
        self.plane.authorize(request.headers.get("authorization"))
        model = self.plane.repository.model(params["name"], params.get("version"))
        return json_response(model.metadata(), headers=_version_headers(model))

    async def model_config(self, request: Request) -> Response:
        """Triton's model config in its JSON form (what ``get_model_config`` reads)."""
        params = request.path_params
        self.plane.authorize(request.headers.get("authorization"))
        model = self.plane.repository.model(params["name"], params.get("version"))
        config = self.plane.repository.model_config(params["name"], params.get("version"))
        return json_response(config, headers=_version_headers(model))

    async def model_ready(self, request: Request) -> Response:
        params = request.path_params
        model = self.plane.repository.model(params["name"], params.get("version"))
        return json_response({"name": model.name, "ready": True}, headers=_version_headers(model))

    async def model_example(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        model = self.plane.repository.model(request.path_params["name"])
        return json_response(model.example_payload, headers=_version_headers(model))

    async def infer(self, headers, receive, params: dict) -> tuple:
        self.plane.authorize(headers.get("authorization"))
        model = self.plane.inference_model(params["name"], params.get("version"))
        body = await self.read_body(headers, receive, (JSON, "application/octet-stream"), True)
        given = headers.get("x-request-id")
        content, response_headers = await self.plane.run_request(
            model,
            lambda: InferRequest.from_rest(body, headers.get(v2.HEADER_LENGTH)),
            v2.encode_response,
            given,
        )
        # the id the capture knows the request by is the body's "id" (a header cost the
        # endpoint more than the capture's whole request path): the header is the client's
        return 200, content, response_headers, model, given

    async def invocations(self, headers, receive, params: dict) -> tuple:
        self.plane.authorize(headers.get("authorization"))
        name = params.get("name")
        model = self.plane.inference_model(name)
        body = await self.read_body(headers, receive, (JSON, "text/csv"), False)
        content, given = await self.plane.run_request(
            model,
            lambda: BoundRequest.of_feeds(
                mlflow_format.parse_body(body, headers.get("content-type"), model.inputs),
                model.output_names,
            ),
            lambda model, bound, results: (
                orjson.dumps(
                    mlflow_format.predictions(model.output_names, results),
                    option=orjson.OPT_SERIALIZE_NUMPY,
                ),
                bound.request_id,
            ),
            headers.get("x-request-id"),
        )
        return 200, content, JSON_HEADERS, model, given

    # --- Triton's extensions: statistics, model repository -----------------------------

    async def statistics(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        params = request.path_params
        return json_response(self.plane.statistics(params.get("name"), params.get("version")))

    async def repository_index(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        ready_only = False
        body = await request.body()
        if body.strip():
            try:
                ready_only = bool(orjson.loads(body).get("ready", False))
            except (orjson.JSONDecodeError, AttributeError):
                raise BadInput(
                    'the index request must be a JSON object like {"ready": true}'
                ) from None
        return json_response(self.plane.repository.repository_index(ready_only))

    async def repository_load(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        parameters = {}
        body = await request.body()
        if body.strip():
            try:
                parameters = orjson.loads(body).get("parameters", {})
            except (orjson.JSONDecodeError, AttributeError):
                parameters = None
            if not isinstance(parameters, dict):
                raise BadInput(
                    'the load request must be a JSON object like {"parameters": '
                    '{"config": "{\\"max_batch_size\\": 16}"}}'
                )
        outcome = await self.plane.repository.load(request.path_params["name"], parameters)
        return json_response(outcome.as_json())

    async def repository_unload(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"))
        await self.plane.repository.unload(request.path_params["name"])
        return json_response({})

    async def version(self, request: Request) -> Response:
        """As ``mlflow models serve``: the MLflow version whose scoring protocol is spoken."""
        return Response(mlflow_format.mlflow_version(), media_type="text/plain")

    async def ping(self, request: Request) -> Response:
        return Response(b"\n", 200 if self.plane.repository.ready() else 503, media_type=JSON)

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.render(), headers={"content-type": self.metrics.content_type})

    async def openapi(self, request: Request) -> Response:
        return json_response(openapi_document(self.plane.repository.default_name or "digits"))

    async def admin_reload(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"), admin=True)
        outcome = await self.plane.repository.reload(request.query_params.get("model"))
        status = 200 if outcome.outcome in ("swapped", "unchanged") else 409
        if outcome.outcome == "registry_error":
            status = 502
        return json_response(outcome.as_json(), status)

    async def feedback(self, request: Request) -> Response:
        """Labels for captured requests: ``{"request_id", "label"[, "row"]}`` or a list."""
        self.plane.authorize(request.headers.get("authorization"))
        try:
            payload = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise BadInput(f"malformed JSON: {exc}") from None
        stored = await self.plane.store_feedback(request.path_params["name"], payload)
        return json_response({"stored": stored})

    async def admin_shadow_flush(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"), admin=True)
        written = await self.plane.flush_shadow()
        failed = any("error" in entry for entry in written)
        return json_response({"written": written}, 502 if failed else 200)

    async def admin_status(self, request: Request) -> Response:
        self.plane.authorize(request.headers.get("authorization"), admin=True)
        return json_response(self.plane.status())


def _version_headers(model: LoadedModel) -> dict[str, str]:
    return {"x-model-name": model.name, "x-model-version": model.version}


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = {"gzip": 31, "deflate": 15}.get(encoding)
    if wbits is None:
        raise UnsupportedMedia(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadInput(f"body is not valid {encoding}: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise TooLarge(f"decompressed body is over the limit of {limit} bytes")
    return data


def error_content(exc: RequestError) -> tuple[int, dict | None]:
    """The one mapping of a request error to HTTP: (status, extra headers)."""
    return exc.status, (dict(exc.headers) or None)


class MetricsMiddleware:
    """Counts and times every request by route template (not raw path) and status."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            self.metrics.observe_request(
                route.path if route is not None else "unmatched",
                scope["method"],
                status,
                time.perf_counter() - start,
            )


JSON_HEADERS = {"content-type": JSON}
JSON_HEADER = (b"content-type", JSON.encode())


class RawHeaders:
    """Read access to ASGI's raw header list; only the headers asked for are decoded."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = dict(raw)  # ASGI servers give lower-case names

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self._raw.get(name.encode("latin-1"))
        return default if value is None else value.decode("latin-1")


class InferenceRoute:
    """A raw ASGI inference route: no Request/Response objects, errors as JSON, timed.

    The inference routes carry the load; at batch 1 their cost is mostly framework
    overhead, so they skip the router (see :class:`FrontDoor`) and Starlette's request
    and response wrappers, and record their own metrics.
    """

    def __init__(
        self, metrics: ServingMetrics, handler, route: str, mlflow_errors: bool = False
    ) -> None:
        self.metrics = metrics
        self.handler = handler
        self.route = route
        self.mlflow_errors = mlflow_errors

    def error_body(self, message: str, status: int) -> bytes:
        body = {"error": message}
        if self.mlflow_errors:  # what `mlflow models serve` clients read
            body["error_code"] = "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"
            body["message"] = message
        return orjson.dumps(body)

    async def __call__(self, scope, receive, send, params: dict | None = None) -> None:
        start = time.perf_counter()
        headers = RawHeaders(scope["headers"])
        model = request_id = None
        try:
            status, content, response_headers, model, request_id = await self.handler(
                headers, receive, params if params is not None else scope.get("path_params", {})
            )
        except RequestError as exc:
            status, extra = error_content(exc)
            content = self.error_body(str(exc), status)
            response_headers = {"content-type": JSON, **(extra or {})}
        except Exception as exc:
            log.exception("unhandled error on %s", self.route)
            status = 500
            content = self.error_body(f"internal error: {type(exc).__name__}", 500)
            response_headers = {"content-type": JSON}
        if response_headers is JSON_HEADERS:
            raw = [JSON_HEADER, (b"content-length", str(len(content)).encode())]
        else:
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response_headers.items()]
            raw.append((b"content-length", str(len(content)).encode()))
        if model is not None:
            raw += model.version_headers
        if request_id:  # the client's X-Request-ID; on /invocations, or the capture's new id
            raw.append((b"x-request-id", request_id.encode("latin-1")))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": content})
        self.metrics.observe_request(self.route, "POST", status, time.perf_counter() - start)


class FrontDoor:
    """Sends POSTs to the inference routes straight to them; everything else to Starlette."""

    INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
    INVOCATIONS = re.compile(r"/v2/models/([^/]+)/invocations")

    def __init__(
        self,
        app: Starlette,
        invocations: InferenceRoute,
        infer: InferenceRoute,
        infer_version: InferenceRoute,
        model_invocations: InferenceRoute,
    ) -> None:
        self.app = app
        self.invocations = invocations
        self.infer = infer
        self.infer_version = infer_version
        self.model_invocations = model_invocations

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path == "/invocations":
                await self.invocations(scope, receive, send, {})
                return
            match = self.INFER.fullmatch(path)
            if match:
                name, version = match.groups()
                if version is None:
                    await self.infer(scope, receive, send, {"name": name})
                else:
                    await self.infer_version(
                        scope, receive, send, {"name": name, "version": version}
                    )
                return
            match = self.INVOCATIONS.fullmatch(path)
            if match:
                await self.model_invocations(scope, receive, send, {"name": match.group(1)})
                return
        await self.app(scope, receive, send)


async def _request_error(request: Request, exc: RequestError) -> Response:
    status, headers = error_content(exc)
    return error_response(str(exc), status, headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    messages = {
        404: f"no route {request.url.path}; see /openapi.json",
        405: f"method {request.method} is not allowed on {request.url.path}",
    }
    return error_response(messages.get(exc.status_code, exc.detail), exc.status_code, exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(f"internal error: {type(exc).__name__}", 500)


def create_app(settings: ServingSettings) -> FrontDoor:
    """The endpoint as an ASGI app (``.plane`` is its data plane, ``.endpoints`` its routes)."""
    plane = DataPlane(settings)
    ep = RestEndpoints(plane)
    model = "/v2/models/{name}"
    version = model + "/versions/{version}"
    invocations = InferenceRoute(plane.metrics, ep.invocations, "/invocations", mlflow_errors=True)
    infer = InferenceRoute(plane.metrics, ep.infer, model + "/infer")
    infer_version = InferenceRoute(plane.metrics, ep.infer, version + "/infer")
    model_invocations = InferenceRoute(
        plane.metrics, ep.invocations, model + "/invocations", mlflow_errors=True
    )
    routes = [
        Route("/v2", ep.server_metadata, methods=["GET"]),
        # before /v2/models/{name}: "stats" is no model name here
        Route("/v2/models/stats", ep.statistics, methods=["GET"]),
        Route("/v2/health/live", ep.live, methods=["GET"]),
        Route("/v2/health/ready", ep.ready, methods=["GET"]),
        Route(model, ep.model_metadata, methods=["GET"]),
        Route(version, ep.model_metadata, methods=["GET"]),
        Route(model + "/config", ep.model_config, methods=["GET"]),
        Route(version + "/config", ep.model_config, methods=["GET"]),
        Route(model + "/ready", ep.model_ready, methods=["GET"]),
        Route(version + "/ready", ep.model_ready, methods=["GET"]),
        # POSTs reach these through FrontDoor; here they answer other methods with 405.
        Route(model + "/infer", infer, methods=["POST"]),
        Route(version + "/infer", infer_version, methods=["POST"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route(model + "/invocations", model_invocations, methods=["POST"]),
        Route(model + "/example", ep.model_example, methods=["GET"]),
        Route(model + "/feedback", ep.feedback, methods=["POST"]),
        Route(model + "/stats", ep.statistics, methods=["GET"]),
        Route(version + "/stats", ep.statistics, methods=["GET"]),
        Route("/v2/repository/index", ep.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", ep.repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", ep.repository_unload, methods=["POST"]),
        Route("/ping", ep.ping, methods=["GET"]),
        Route("/health", ep.ping, methods=["GET"]),
        Route("/version", ep.version, methods=["GET"]),
        Route("/metrics", ep.metrics_route, methods=["GET"]),
        Route("/openapi.json", ep.openapi, methods=["GET"]),
        Route("/admin/reload", ep.admin_reload, methods=["POST"]),
        Route("/admin/status", ep.admin_status, methods=["GET"]),
        *shared_memory_routes(plane),
        Route("/admin/shadow/flush", ep.admin_shadow_flush, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await plane.start()
        grpc_server = None
        if settings.grpc_port is not None:
            from onnxflow.serving.grpc_front import start_grpc

            grpc_server, front.grpc_port = await start_grpc(
                plane, settings.host, settings.grpc_port
            )
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(5)
            await plane.stop()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            RequestError: _request_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
    app.add_middleware(MetricsMiddleware, metrics=plane.metrics)
    front = FrontDoor(app, invocations, infer, infer_version, model_invocations)
    front.plane = plane
    front.grpc_port = None  # the bound gRPC port once started
    front.endpoints = ep
    return front

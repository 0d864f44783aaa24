"""The errors a request can end in, each carrying how every front answers it.

Every front (REST, gRPC) maps these to its own status in one place: the HTTP status is
``status``, the gRPC status code is ``grpc_code`` (a name of ``grpc.StatusCode``). Raise
the most specific class; the message names the problem (what was expected, what came).
"""

from __future__ import annotations

from typing import ClassVar

from onnxflow.errors import ServingError


class RequestError(ServingError):
    """The request cannot be served as sent. Base class; plain ``RequestError`` is bad input."""

    status: int = 400
    grpc_code: str = "INVALID_ARGUMENT"
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)


class BadInput(RequestError):
    """The request is malformed or does not fit the model (names, datatypes, shapes, data)."""


class Unauthorized(RequestError):
    """No token, or the wrong one."""

    status = 401
    grpc_code = "UNAUTHENTICATED"
    headers: ClassVar[dict[str, str]] = {"www-authenticate": "Bearer"}


class Forbidden(RequestError):
    """The route is switched off for everyone (admin routes without a token)."""

    status = 403
    grpc_code = "PERMISSION_DENIED"


class NotFound(RequestError):
    """No such model, version, route or shared-memory region."""

    status = 404
    grpc_code = "NOT_FOUND"


class TooLarge(RequestError):
    """The body, or a tensor it declares, is over the size limit."""

    status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class UnsupportedMedia(RequestError):
    """A Content-Type or Content-Encoding the route does not read."""

    status = 415


class CannotRun(RequestError):
    """The input passed every check, but onnxruntime refused it at run time."""

    status = 422


class Conflict(RequestError):
    """The operation conflicts with the model's state (a refused version, say)."""

    status = 409
    grpc_code = "FAILED_PRECONDITION"


class NotReady(RequestError):
    """The model is known but nothing is loaded yet (or it was unloaded)."""

    status = 503
    grpc_code = "UNAVAILABLE"


class UpstreamError(RequestError):
    """The registry could not be read."""

    status = 502
    grpc_code = "UNAVAILABLE"


class NotSupported(RequestError):
    """A protocol feature this endpoint does not offer (CUDA shared memory, say): a 400, as
    Triton answers it (bad input is never a 5xx here), UNIMPLEMENTED over gRPC."""

    grpc_code = "UNIMPLEMENTED"

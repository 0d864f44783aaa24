"""The errors a request can end in, each carrying how every front answers it.

Every front (REST, gRPC) maps these to its own status in one place: the HTTP status is
``status``, the gRPC status code is ``grpc_code`` (a name of ``grpc.StatusCode``), both
declared in the class statement. Raise the most specific class; the message names the
problem (what was expected, what came).
"""

from __future__ import annotations

from typing import ClassVar

from onnxflow.errors import ServingError


class RequestError(ServingError):
    """The request cannot be served as sent. Base class; plain ``RequestError`` is bad input."""

    status: ClassVar[int] = 400
    grpc_code: ClassVar[str] = "INVALID_ARGUMENT"
    headers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(
        cls,
        status: int | None = None,
        grpc_code: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
        if grpc_code is not None:
            cls.grpc_code = grpc_code
        if headers is not None:
            cls.headers = headers

    def __init__(self, message: str) -> None:
        super().__init__(message)


# By HTTP status; a class that names no status or code keeps RequestError's.


class BadInput(RequestError):
    """The request is malformed or does not fit the model (names, datatypes, shapes, data)."""


class NotSupported(RequestError, grpc_code="UNIMPLEMENTED"):
    """A protocol feature this endpoint does not offer (CUDA shared memory, say): a 400, as
    Triton answers it (bad input is never a 5xx here), UNIMPLEMENTED over gRPC."""


class Unauthorized(
    RequestError, status=401, grpc_code="UNAUTHENTICATED", headers={"www-authenticate": "Bearer"}
):
    """No token, or the wrong one."""


class Forbidden(RequestError, status=403, grpc_code="PERMISSION_DENIED"):
    """The route is switched off for everyone (admin routes without a token)."""


class NotFound(RequestError, status=404, grpc_code="NOT_FOUND"):
    """No such model, version, route or shared-memory region."""


class Conflict(RequestError, status=409, grpc_code="FAILED_PRECONDITION"):
    """The operation conflicts with the model's state (a refused version, say)."""


class TooLarge(RequestError, status=413, grpc_code="RESOURCE_EXHAUSTED"):
    """The body, or a tensor it declares, is over the size limit."""


class UnsupportedMedia(RequestError, status=415):
    """A Content-Type or Content-Encoding the route does not read."""


class CannotRun(RequestError, status=422):
    """The input passed every check, but onnxruntime refused it at run time."""


class UpstreamError(RequestError, status=502, grpc_code="UNAVAILABLE"):
    """The registry could not be read."""


class NotReady(RequestError, status=503, grpc_code="UNAVAILABLE"):
    """The model is known but nothing is loaded yet (or it was unloaded)."""

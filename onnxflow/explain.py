"""One line for a command that failed: what went wrong, and what to do next.

The command line ends every failure with ``error: ...`` and a non-zero exit status, never
a traceback (``--debug`` or ``ONNXFLOW_DEBUG=1`` shows it). Errors onnxflow raises on
purpose carry their own message; this module words the others a user meets: a store or
server that cannot be reached, a missing file, a port in use.
"""

from __future__ import annotations

import errno
import os

DEBUG_HINT = "run again with --debug for the traceback"


def explain(exc: BaseException) -> str:
    """The message after ``error:`` for ``exc``."""
    from onnxflow.errors import OnnxflowError

    if isinstance(exc, OnnxflowError):
        return str(exc)
    chain = list(_chain(exc))
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    if _is_unreachable(chain, text) and _names_tracking_store(text):
        return unreachable_tracking_store(os.environ.get("MLFLOW_TRACKING_URI", "?"), text)
    if "prefect" in text.lower() and _is_unreachable(chain, text):
        return (
            f"lost the Prefect API at {os.environ.get('PREFECT_API_URL', '?')} during the "
            f"run ({_first_line(chain[-1])}); check the server and run again ({DEBUG_HINT})"
        )
    for e in chain:
        if isinstance(e, FileNotFoundError) and e.filename:
            return f"{e.filename}: no such file or directory ({DEBUG_HINT})"
        if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
            return f"an address is already in use: {e.strerror}; choose another port"
    return f"{type(exc).__name__}: {_first_line(exc)} ({DEBUG_HINT})"


def unreachable_tracking_store(uri: str, reason: str) -> str:
    return (
        f"the MLflow tracking store at {uri} (MLFLOW_TRACKING_URI) cannot be reached "
        f"({_shorten(reason)}): start it (`make up` starts one) or point "
        f"MLFLOW_TRACKING_URI at a store you can reach"
    )


def check_tracking_store(uri: str | None = None, timeout_s: float = 10.0) -> None:
    """Raise at once if a tracking *server* does not answer: MLflow's client would retry a
    refused connection for minutes before it gave up."""
    from onnxflow.errors import OnnxflowError

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)  # any answer will do
    except httpx.HTTPError as exc:
        raise OnnxflowError(
            unreachable_tracking_store(uri, f"{type(exc).__name__}: {exc}")
        ) from exc


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_unreachable(chain: list[BaseException], text: str) -> bool:
    return (
        any(isinstance(e, ConnectionError) for e in chain)
        or any(
            type(e).__name__
            in (
                "ConnectError",
                "ConnectTimeout",
                "ConnectionError",
                "MaxRetryError",
                "NewConnectionError",
            )
            for e in chain
        )
        or "Connection refused" in text
        or "Max retries exceeded" in text
        or "unable to open database file" in text
    )


def _names_tracking_store(text: str) -> bool:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return "mlflow" in text.lower() or (bool(uri) and uri in text) or "sqlite" in text


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return _shorten(lines[0]) if lines else type(exc).__name__


def _shorten(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

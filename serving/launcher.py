"""Launching the endpoint: in the foreground, or as a managed background process.

The endpoint always runs as its own ``python -m onnxflow.serving`` process, started with the
settings in its environment (``ONNXFLOW_SERVE_*``; the token never appears on a command
line). A process of its own guarantees what the serving contract promises: no torch,
tensorflow or pandas loaded, whatever the caller had imported.

The background helpers keep three files in ``state_dir``: ``endpoint.pid``,
``endpoint.json`` (URL, model, pid, log) and ``endpoint.log``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from onnxflow.errors import ServingError
from onnxflow.processes import (
    ProcessRecord,
    free_port,
    is_alive,
    port_free,
    python_module,
    start_process,
    stop_process,
    wait_until,
)
from onnxflow.serving.settings import ServingSettings

log = logging.getLogger(__name__)

PID_FILE = "endpoint.pid"
INFO_FILE = "endpoint.json"
LOG_FILE = "endpoint.log"
DEFAULT_STATE_DIR = Path(".onnxflow/serve")


def make_settings(**overrides) -> ServingSettings:
    """Settings from ``ONNXFLOW_SERVE_*``, with every override that is not None on top."""
    return ServingSettings(**{k: v for k, v in overrides.items() if v is not None})


def settings_env(settings: ServingSettings) -> dict[str, str]:
    """The settings as the environment variables a child endpoint reads."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if name == "token":
            value = value.get_secret_value()
        env[f"ONNXFLOW_SERVE_{name.upper()}"] = str(value)
    return env


def _child_env(settings: ServingSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXFLOW_SERVE_")}
    env.update(settings_env(settings))
    return env


def serve(**options) -> None:
    """Serve in the foreground (this process becomes the endpoint): ``options`` are
    :class:`ServingSettings` fields; None: the environment's value or the default.
    ``model``: one reference or a list of them (the first answers ``/invocations``)."""
    if isinstance(options.get("model"), list):
        options["model"] = ",".join(options["model"]) or None
    settings = make_settings(**options)
    check_port(settings)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, ENDPOINT_ARGV, _child_env(settings))


def check_port(settings: ServingSettings, grace_s: float = 5.0) -> None:
    """Refuse a port another process holds, before starting anything. A port is given
    ``grace_s`` to come free: an endpoint that was just stopped or killed may still be
    releasing it (a redeploy on the same URL)."""
    deadline = time.monotonic() + grace_s
    while settings.port and not port_free(settings.host, settings.port):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if settings.port and not port_free(settings.host, settings.port):
        raise ServingError(
            f"port {settings.port} on {settings.host} is already in use: choose another with "
            "--port, or stop what holds it (`onnxflow stop` stops an endpoint onnxflow started)"
        )
    if settings.grpc_port and not port_free(settings.host, settings.grpc_port):
        raise ServingError(
            f"gRPC port {settings.grpc_port} on {settings.host} is already in "
            "use: choose another with --grpc-port"
        )


def run_server(settings: ServingSettings) -> None:
    """The endpoint's main: ``python -m onnxflow.serving`` calls it, heavy imports blocked."""
    import uvicorn

    from onnxflow.serving.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.token is None:
        log.warning(
            "binding %s without a token: anyone who can reach it can run the model", settings.host
        )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop=_available("uvloop", "asyncio"),
        http=_http_protocol(),
        ws="none",
        proxy_headers=False,  # no proxy in front by default; one layer less per request
        access_log=False,
        log_level=settings.log_level,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()


def _http_protocol():
    if _available("httptools", "") == "":
        return "h11"
    from onnxflow.serving.http import CoalescingHttpToolsProtocol

    return CoalescingHttpToolsProtocol


def _available(module: str, fallback: str) -> str:
    import importlib.util

    return module if importlib.util.find_spec(module) else fallback


# --- managed background process (started and stopped by onnxflow.processes) -------------


@dataclass(frozen=True)
class EndpointInfo:
    pid: int
    url: str
    model: str
    log_path: str
    started_at: float
    start_ticks: int = 0  # the process's start time: a recycled pid is never taken for ours

    def record(self) -> ProcessRecord:
        """The supervisor's record of this process: every field but the model."""
        process = {k: v for k, v in asdict(self).items() if k != "model"}
        return ProcessRecord(name="endpoint", argv=ENDPOINT_ARGV, **process)


ENDPOINT_ARGV = python_module("onnxflow.serving")


def is_running(info: EndpointInfo) -> bool:
    return is_alive(info.pid, info.start_ticks)


def start_background(
    settings: ServingSettings, state_dir: Path = DEFAULT_STATE_DIR
) -> EndpointInfo:
    """Start ``python -m onnxflow.serving`` detached, logging to ``state_dir/endpoint.log``."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    running = read_info(state_dir)
    if running is not None and is_running(running):
        raise ServingError(
            f"an endpoint already runs from {state_dir} (pid {running.pid}, "
            f"{running.url}); stop it first with `onnxflow stop`"
        )
    if settings.port == 0:
        settings = settings.model_copy(update={"port": free_port(settings.host)})
    check_port(settings)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}"
    # Own session: outlives the flow that started it, and stops as one process group.
    record = start_process(
        "endpoint", ENDPOINT_ARGV, _child_env(settings), state_dir / LOG_FILE, url=url
    )
    info = EndpointInfo(
        pid=record.pid,
        url=url,
        model=settings.model,
        log_path=record.log_path,
        started_at=record.started_at,
        start_ticks=record.start_ticks,
    )
    (state_dir / PID_FILE).write_text(f"{record.pid}\n")
    (state_dir / INFO_FILE).write_text(json.dumps(asdict(info), indent=2))
    log.info(
        "started endpoint pid %s for %s at %s (log %s)",
        record.pid,
        settings.model,
        url,
        record.log_path,
    )
    return info


def wait_ready(info: EndpointInfo, timeout_s: float = 60.0) -> float:
    """Seconds until ``/v2/health/ready`` answered 200; raises with the log tail if not."""
    import httpx

    with httpx.Client(timeout=2.0) as client:
        return wait_until(
            info.record(),
            lambda: client.get(f"{info.url}/v2/health/ready").status_code == 200,
            timeout_s,
            "ready",
            error=ServingError,
            interval_s=0.05,
        )


def read_info(state_dir: Path = DEFAULT_STATE_DIR) -> EndpointInfo | None:
    path = Path(state_dir) / INFO_FILE
    try:
        return EndpointInfo(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def stop_background(state_dir: Path = DEFAULT_STATE_DIR, timeout_s: float = 15.0) -> bool:
    """Stop the endpoint started from ``state_dir`` (and anything it started); False if
    none was running. uvicorn finishes in-flight requests on SIGTERM, then exits."""
    state_dir = Path(state_dir)
    info = read_info(state_dir)
    stopped = info is not None and stop_process(info.record(), timeout_s)
    if stopped:
        log.info("stopped endpoint pid %s (%s)", info.pid, info.url)
    for name in (PID_FILE, INFO_FILE):
        (state_dir / name).unlink(missing_ok=True)
    return stopped


def background_status(state_dir: Path = DEFAULT_STATE_DIR) -> dict | None:
    """What the endpoint started from ``state_dir`` reports, or None if none runs."""
    import httpx

    info = read_info(state_dir)
    if info is None or not is_running(info):
        return None
    status = {**asdict(info), "ready": False, "version": None}
    try:
        response = httpx.get(f"{info.url}/v2/health/ready", timeout=2.0)
        status["ready"] = response.status_code == 200
        first = info.model.split(",")[0]
        name = first.split("@")[0].rsplit("/", 1)[0]
        if status["ready"] and name:
            meta = httpx.get(f"{info.url}/v2/models/{name}/ready", timeout=2.0)
            status["version"] = meta.headers.get("x-model-version")
    except httpx.TransportError as exc:
        status["error"] = str(exc)
    return status

"""The local stack: ``up`` starts it, ``status`` shows it, ``down`` stops what ``up`` started.

    MLflow tracking server ─┐
    (--serve-artifacts)     ├─► deployments ─► worker (process pool) ─► serving replicas
    Prefect server ─────────┘   (scheduled,     flow runs see            follow NAME@champion
                                 on-demand)     MLFLOW_TRACKING_URI

Everything lives under ``settings.state_dir``: ``stack.json`` (what runs: pid, start
time, URL, log of each process), ``logs/``, the SQLite stores (unless database URLs are
set), MLflow's artifact store and the replicas' model caches.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from onnxflow.endpoints import serving_version
from onnxflow.errors import StackError
from onnxflow.processes import (
    ProcessRecord,
    is_running,
    listen_options,
    python_module,
    start_process,
    stop_process,
    wait_until,
)
from onnxflow.recipes import RECIPE_DIRS_ENV
from onnxflow.stack import accounts, health
from onnxflow.stack.accounts import Credentials
from onnxflow.stack.settings import StackSettings

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
#: Variables of the caller that must not leak into the stack's processes.
_OVERRIDDEN = (
    "PREFECT_API_URL",
    "PREFECT_HOME",
    "PREFECT_PROFILES_PATH",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    # each process gets its own account (or none), never the caller's
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_CONFIG_PATH",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "ONNXFLOW_PROMOTION_POLICY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_API_KEY",  # Prefect Cloud's: it would take precedence over the auth string
)

Progress = Callable[[str], None]


# --- what each process is: pure functions of the settings, tested without starting anything


def state_dir(settings: StackSettings) -> Path:
    return settings.state_dir.resolve()


def mlflow_backend_uri(settings: StackSettings) -> str:
    if settings.mlflow_database_url is not None:
        return settings.mlflow_database_url.get_secret_value()
    return f"sqlite:///{state_dir(settings) / 'mlflow.db'}"


def base_env(settings: StackSettings) -> dict[str, str]:
    """The caller's environment, less what would point a process at another store."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _OVERRIDDEN and not k.startswith(("ONNXFLOW_SERVE_", "ONNXFLOW_AUTH_"))
    }
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    return env


def prefect_env(settings: StackSettings) -> dict[str, str]:
    """What every Prefect process of the stack (server, worker, flow runs) reads."""
    env = {
        "PREFECT_HOME": str(state_dir(settings) / "prefect"),
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_SERVER_API_HOST": settings.host,
        "PREFECT_SERVER_API_PORT": str(settings.prefect_port),
        "PREFECT_LOGGING_EXTRA_LOGGERS": "onnxflow",
        "PREFECT_WORKER_QUERY_SECONDS": str(settings.worker_query_s),
    }
    if settings.prefect_database_url is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = (
            settings.prefect_database_url.get_secret_value()
        )
    return env


#: The MLflow app of the stack: basic-auth plus the promotion policy (pyproject's mlflow.app).
MLFLOW_APP = "onnxflow-auth"


def mlflow_server_command(settings: StackSettings) -> list[str]:
    return python_module(
        "mlflow",
        "server",
        *listen_options(settings.host, settings.mlflow_port),
        "--backend-store-uri",
        mlflow_backend_uri(settings),
        "--serve-artifacts",
        "--artifacts-destination",
        str(state_dir(settings) / "mlflow-artifacts"),
        "--workers",
        str(settings.mlflow_workers),
        *(["--app-name", MLFLOW_APP] if settings.auth else []),
    )


def credentials_dir(settings: StackSettings) -> Path:
    return (settings.credentials_dir or state_dir(settings) / "credentials").resolve()


def auth_database_uri(settings: StackSettings) -> str:
    """MLflow's user store: its own URL, else the MLflow database on PostgreSQL (its tables
    are apart: users, roles, *_permissions), else SQLite next to the tracking store."""
    if settings.auth_database_url is not None:
        return settings.auth_database_url.get_secret_value()
    backend = mlflow_backend_uri(settings)
    if backend.startswith("postgresql"):
        return backend
    return f"sqlite:///{state_dir(settings) / 'mlflow-auth.db'}"


def mlflow_server_env(
    settings: StackSettings, credentials: Credentials | None = None
) -> dict[str, str]:
    # MLflow's job runner (GenAI jobs, a dozen huey processes) has nothing to do here.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if settings.auth and credentials is not None:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(state_dir(settings) / "mlflow-auth.ini")
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = credentials.passwords[accounts.SECRET_KEY]
        if settings.promotion_policy is not None:
            env["ONNXFLOW_PROMOTION_POLICY"] = str(Path(settings.promotion_policy).resolve())
    return env


def prefect_auth_env(
    settings: StackSettings, credentials: Credentials | None = None, server: bool = False
) -> dict[str, str]:
    """Prefect's own basic auth: the server requires ``PREFECT_SERVER_API_AUTH_STRING``
    (its UI asks for it), every client sends ``PREFECT_API_AUTH_STRING`` (empty: no auth)."""
    credentials = stack_credentials(settings, credentials)
    if credentials is None:
        return {}
    auth = credentials.prefect_auth_string()
    env = {"PREFECT_API_AUTH_STRING": auth}
    if server:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    return env


def prefect_login(settings: StackSettings) -> tuple[str, str] | None:
    """(user, password) of Prefect's API for an HTTP client (None: no auth)."""
    auth = prefect_auth_env(settings).get("PREFECT_API_AUTH_STRING")
    if not auth:
        return None
    user, _, password = auth.partition(":")
    return user, password


def stack_credentials(
    settings: StackSettings, given: Credentials | None = None
) -> Credentials | None:
    """The accounts' passwords of an authenticated stack (None when auth is off)."""
    if given is not None or not settings.auth:
        return given
    return accounts.load_credentials(credentials_dir(settings))


def account_env(settings: StackSettings, account: str) -> dict[str, str]:
    """What an MLflow client needs to act as one of the stack's accounts (empty: no auth)."""
    credentials = stack_credentials(settings)
    return credentials.env_for(account) if credentials is not None else {}


def prepare_auth(settings: StackSettings) -> Credentials:
    """Passwords (created if missing), basic-auth's ini, the users and reviewer roles."""
    from onnxflow.stack.policy import load_policy

    try:
        policy = load_policy(settings.promotion_policy)
    except ValueError as exc:  # pydantic's ValidationError is one
        raise StackError(f"promotion policy {settings.promotion_policy}: {exc}") from exc
    credentials = accounts.load_credentials(credentials_dir(settings))
    accounts.write_auth_config(state_dir(settings) / "mlflow-auth.ini", auth_database_uri(settings))
    accounts.provision(auth_database_uri(settings), credentials, accounts.reviewer_roles(policy))
    return credentials


def prefect_server_command(settings: StackSettings) -> list[str]:
    return python_module(
        "prefect", "server", "start", *listen_options(settings.host, settings.prefect_port)
    )


def worker_command(settings: StackSettings) -> list[str]:
    return python_module(
        "prefect",
        "worker",
        "start",
        "--pool",
        settings.work_pool,
        "--type",
        "process",
        "--name",
        f"{settings.work_pool}-worker",
    )


def worker_env(settings: StackSettings, credentials: Credentials | None = None) -> dict[str, str]:
    """The worker passes its environment to every flow run it starts: this is how runs
    find the tracking server, log in to it (the pipeline account) and where they write
    their files."""
    credentials = stack_credentials(settings, credentials)
    login = credentials.env_for(accounts.PIPELINE) if credentials is not None else {}
    return {
        **prefect_env(settings),
        **prefect_auth_env(settings, credentials),
        **login,
        "MLFLOW_TRACKING_URI": settings.mlflow_url,
        "ONNXFLOW_ARTIFACTS_DIR": str(state_dir(settings) / "runs"),
        # The recipes a flow run may import (flows/retrain.py checks before importing).
        RECIPE_DIRS_ENV: json.dumps([str(d.resolve()) for d in settings.recipe_dirs]),
        # Heartbeats let the server mark a run Crashed when its worker dies with it
        # (the automation apply_deployments creates); without them it stays Running.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(settings.heartbeat_s),
        # MLflow's client alone would retry a refused connection 7 times with growing
        # waits (minutes); the register task's Prefect retries own the backoff instead.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": os.environ.get(
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"
        ),
    }


def _followed(settings: StackSettings) -> str:
    return settings.model + (
        f" and every model @{settings.all_models}" if settings.all_models else ""
    )


#: The stack's settings its replicas take as they are (same name in ServingSettings).
_REPLICA_SETTINGS = {
    "model",
    "all_models",
    "host",
    "poll_interval_s",
    "shadow",
    "shadow_fraction",
    "shadow_flush_interval_s",
    "canary_percent",
    "capture_fraction",
    "capture_segment_s",
}


def endpoint_env(
    settings: StackSettings, port: int, credentials: Credentials | None = None
) -> dict[str, str]:
    from onnxflow.serving.launcher import settings_env
    from onnxflow.serving.settings import ServingSettings

    serving = ServingSettings(
        **settings.model_dump(include=_REPLICA_SETTINGS),
        port=port,
        capture=settings.capture_url if settings.capture else None,
        # One cache per replica: replicas stand for separate machines, and share no files.
        cache_dir=state_dir(settings) / "endpoints" / str(port) / "models",
        # explicit: ServingSettings would otherwise take this process's MLFLOW_TRACKING_URI
        # (make sets sqlite:///mlflow.db) and hand it on as ONNXFLOW_SERVE_TRACKING_URI,
        # which the replica reads before the stack's own server
        tracking_uri=settings.mlflow_url,
    )
    credentials = stack_credentials(settings, credentials)
    login = credentials.env_for(accounts.ENDPOINT) if credentials is not None else {}
    return {**settings_env(serving), **login, "MLFLOW_TRACKING_URI": settings.mlflow_url}


# --- state file


def read_state(settings: StackSettings) -> list[ProcessRecord]:
    try:
        raw = json.loads((state_dir(settings) / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [ProcessRecord(**r) for r in raw.get("processes", [])]


def _write_state(settings: StackSettings, records: list[ProcessRecord]) -> None:
    path = state_dir(settings) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "processes": [asdict(r) for r in records],
        "urls": urls(settings),
        "settings": settings.model_dump(mode="json", include=set(_RECORDED)),
        "updated_at": time.time(),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


#: Settings a running stack was started with: later commands (status, trigger) use these,
#: whatever their own environment says.
_RECORDED = (
    "host",
    "prefect_port",
    "mlflow_port",
    "endpoint_ports",
    "work_pool",
    "model",
    "all_models",
)


def running_settings(settings: StackSettings) -> StackSettings:
    """``settings`` with the ports, host and model of the stack running from its state dir."""
    try:
        recorded = json.loads((state_dir(settings) / STATE_FILE).read_text())["settings"]
    except (FileNotFoundError, ValueError, KeyError):
        return settings
    return settings.model_copy(update={k: v for k, v in recorded.items() if k in _RECORDED})


def urls(settings: StackSettings) -> dict[str, object]:
    return {
        "prefect_ui": settings.prefect_url,
        "mlflow_ui": settings.mlflow_url,
        "endpoints": settings.endpoint_urls,
    }


# --- up / down / status


def up(settings: StackSettings, progress: Progress = log.info) -> list[ProcessRecord]:
    """Start every server, wait for each to be healthy, register the deployments.

    On any failure, what was started so far is stopped again before the error is raised.
    """
    running = [r for r in read_state(settings) if is_running(r)]
    if running:
        raise StackError(
            f"the stack in {state_dir(settings)} already runs "
            f"({', '.join(r.name for r in running)}); stop it with `make down`"
        )
    _check_ports_free(settings)
    _check_databases(settings)
    folder = state_dir(settings)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    records: list[ProcessRecord] = []

    def start(name: str, argv: list[str], env: dict[str, str], url: str | None) -> ProcessRecord:
        record = start_process(
            name,
            argv,
            {**base_env(settings), **env},
            folder / "logs" / f"{name}.log",
            url=url,
            cwd=Path.cwd(),
        )
        records.append(record)
        _write_state(settings, records)
        return record

    credentials = prepare_auth(settings) if settings.auth else None
    try:
        mlflow = start(
            "mlflow",
            mlflow_server_command(settings),
            mlflow_server_env(settings, credentials),
            settings.mlflow_url,
        )
        prefect = start(
            "prefect-server",
            prefect_server_command(settings),
            {**prefect_env(settings), **prefect_auth_env(settings, credentials, server=True)},
            settings.prefect_url,
        )
        took = wait_until(
            mlflow,
            lambda: health.mlflow_healthy(settings.mlflow_url),
            settings.startup_timeout_s,
            "healthy",
            StackError,
        )
        progress(f"MLflow tracking server  {settings.mlflow_url}  ({took:.1f} s)")
        if credentials is not None:
            for account in (accounts.PIPELINE, accounts.ENDPOINT):
                accounts.check_login(settings.mlflow_url, credentials, account)
            progress(
                f"MLflow accounts         {', '.join(accounts.ACCOUNTS)}; the reviewer's "
                f"password is in {credentials.path(accounts.REVIEWER)}"
            )
        took = wait_until(
            prefect,
            lambda: health.prefect_healthy(settings.prefect_url),
            settings.startup_timeout_s,
            "healthy",
            StackError,
        )
        progress(f"Prefect server          {settings.prefect_url}  ({took:.1f} s)")

        from onnxflow.stack.deployments import apply_deployments

        names = apply_deployments(settings)
        progress(f"deployments             {', '.join(names)} (pool {settings.work_pool})")

        worker = start("worker", worker_command(settings), worker_env(settings, credentials), None)
        took = wait_until(
            worker,
            lambda: health.worker_online(
                settings.prefect_url, settings.work_pool, prefect_login(settings)
            ),
            settings.startup_timeout_s,
            "online",
            StackError,
        )
        progress(f"worker                  pool {settings.work_pool}  ({took:.1f} s)")

        endpoints = [
            start(
                f"endpoint-{port}",
                python_module("onnxflow.serving"),
                endpoint_env(settings, port, credentials),
                url,
            )
            for port, url in zip(settings.endpoint_ports, settings.endpoint_urls)
        ]
        for endpoint in endpoints:
            took = wait_until(
                endpoint,
                lambda u=endpoint.url: health.endpoint_live(u),
                settings.startup_timeout_s,
                "live",
                StackError,
            )
            version = serving_version(endpoint.url, settings.model_name)
            following = f"serving v{version}" if version else "waiting for a version"
            progress(
                f"endpoint                {endpoint.url}  follows {_followed(settings)} "
                f"({following}; {took:.1f} s)"
            )
    except BaseException:
        log.error("stack failed to start; stopping what was started")
        for record in reversed(records):
            stop_process(record)
        (folder / STATE_FILE).unlink(missing_ok=True)
        raise
    return records


def down(settings: StackSettings, progress: Progress = log.info) -> list[str]:
    """Stop every process ``up`` recorded (worker and replicas first), then forget them."""
    records = read_state(settings)
    stopped = []
    for record in _stop_order(records):
        if stop_process(record):
            stopped.append(record.name)
            progress(f"stopped {record.name} (pid {record.pid})")
    (state_dir(settings) / STATE_FILE).unlink(missing_ok=True)
    return stopped


def status(settings: StackSettings) -> list[dict[str, object]]:
    """One row per recorded process: running or not, where, and what it reports."""
    rows = []
    settings = running_settings(settings)
    for record in read_state(settings):
        running = is_running(record)
        detail = ""
        if running and record.name.startswith("endpoint-") and record.url:
            version = serving_version(record.url, settings.model_name)
            detail = f"{settings.model} -> v{version}" if version else "no version loaded yet"
        elif running and record.name == "worker":
            try:
                online = health.worker_online(
                    settings.prefect_url, settings.work_pool, prefect_login(settings)
                )
            except Exception:
                online = False
            detail = f"pool {settings.work_pool}: {'online' if online else 'not online'}"
        elif running and record.url:
            check = health.mlflow_healthy if record.name == "mlflow" else health.prefect_healthy
            try:
                detail = "healthy" if check(record.url) else "unhealthy"
            except Exception as exc:
                detail = f"unreachable: {type(exc).__name__}"
        rows.append(
            {
                "name": record.name,
                "pid": record.pid,
                "running": running,
                "url": record.url or "",
                "detail": detail,
                "log": record.log_path,
            }
        )
    return rows


def _stop_order(records: list[ProcessRecord]) -> list[ProcessRecord]:
    """Replicas and the worker first (they talk to the servers), then the servers."""
    rank = {"worker": 0, "prefect-server": 2, "mlflow": 3}
    return sorted(records, key=lambda r: rank.get(r.name, 1))


def _check_databases(settings: StackSettings) -> None:
    """Connect to each configured database once: the servers retry a bad URL for minutes,
    this says at once which URL is wrong and why."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    for what, secret in (
        ("MLflow", settings.mlflow_database_url),
        ("Prefect", settings.prefect_database_url),
    ):
        if secret is None:
            continue
        url = make_url(secret.get_secret_value())
        if url.get_backend_name() == "postgresql":
            url = url.set(drivername="postgresql+psycopg")  # sync check of an async URL
        engine = sqlalchemy.create_engine(url, connect_args=_connect_timeout(url))
        try:
            with engine.connect():
                pass
        except Exception as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise StackError(
                f"cannot connect to the {what} database "
                f"{url.render_as_string(hide_password=True)}: {reason}"
            ) from exc
        finally:
            engine.dispose()


def _connect_timeout(url) -> dict[str, int]:
    return {"connect_timeout": 5} if url.get_backend_name() == "postgresql" else {}


def _check_ports_free(settings: StackSettings) -> None:
    wanted = {
        "the MLflow server (ONNXFLOW_STACK_MLFLOW_PORT)": settings.mlflow_port,
        "the Prefect server (ONNXFLOW_STACK_PREFECT_PORT)": settings.prefect_port,
        **{
            f"an endpoint (ONNXFLOW_STACK_ENDPOINT_PORTS={settings.endpoint_ports})": p
            for p in settings.endpoint_ports
        },
    }
    if len(set(wanted.values())) != len(wanted):
        raise StackError(f"every server needs its own port, got {wanted}")
    for what, port in wanted.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((settings.host, port))
            except OSError as exc:
                raise StackError(
                    f"port {port} on {settings.host}, wanted by {what}, is taken "
                    f"({exc.strerror}): stop what uses it or choose another port"
                ) from exc

"""A real stack for the integration tests: PostgreSQL-backed MLflow and Prefect servers,
a process worker, the deployments (with a monitor of the model ``scan``) and two serving
replicas (capture on, challenger in shadow), all on free ports.

The stack is started once per session (about 30 s) and shared by the tests, which run in
file order: the loop first (it registers versions), then the reviewer in a browser. Each
session creates its own PostgreSQL databases and drops them at the end. Timings go to
``test-results/stack-timings.json``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

#: This environment's commands (``onnxflow``, ``prefect``).
BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get("ONNXFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
RESULTS = Path(__file__).resolve().parents[2] / "test-results"
SMALL_CONFIG = {
    "train": {"epochs": 3, "hidden_sizes": [32]},
    "validate": {"latency_repeats": 3, "max_accuracy_drop": 0.01},
}

#: The stack's monitor deployments (onnxflow-monitor/NAME): the retrain loop's model.
MONITOR_CONFIG = {
    "scan": {
        "policy": {"max_drift_share": 0.3, "min_rows": 100, "min_shadow_requests": 50},
        "promotion": "auto",
        "since": "1h",
    }
}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _admin_connection():
    import psycopg

    return psycopg.connect(f"{PG_ADMIN_URL}/postgres", connect_timeout=3, autocommit=True)


@pytest.fixture(scope="session")
def postgres_databases():
    """Two fresh databases (MLflow's and Prefect's) on the local PostgreSQL, dropped after."""
    try:
        conn = _admin_connection()
    except Exception as exc:
        pytest.fail(f"no PostgreSQL at {PG_ADMIN_URL} (set ONNXFLOW_TEST_POSTGRES): {exc}")
    tag = uuid.uuid4().hex[:8]
    names = {"mlflow": f"onnxflow_it_{tag}_mlflow", "prefect": f"onnxflow_it_{tag}_prefect"}
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f'CREATE DATABASE "{name}"')
    yield names
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture(scope="session")
def stack(postgres_databases, tmp_path_factory):
    """The running stack's settings; stops it at the end and checks nothing is left."""
    import yaml

    from onnxflow.processes import is_alive, is_running, process_tree
    from onnxflow.stack import manager
    from onnxflow.stack.settings import StackSettings

    prefect_port, mlflow_port, *endpoint_ports = free_ports(4)
    server = PG_ADMIN_URL.split("://", 1)[1]
    monitor_config = tmp_path_factory.mktemp("monitor") / "monitor.yaml"
    monitor_config.write_text(yaml.safe_dump(MONITOR_CONFIG))
    settings = StackSettings(
        state_dir=tmp_path_factory.mktemp("stack"),
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
        endpoint_ports=endpoint_ports,
        mlflow_database_url=f"postgresql://{server}/{postgres_databases['mlflow']}",
        prefect_database_url=f"postgresql+asyncpg://{server}/{postgres_databases['prefect']}",
        poll_interval_s=1.0,
        worker_query_s=1.0,
        schedule_paused=True,
        capture_segment_s=2.0,  # segments readable by the monitor within seconds
        shadow_flush_interval_s=2.0,  # the shadow's evidence on the challenger within seconds
        monitor_config=monitor_config,
    )
    started = time.monotonic()
    try:
        records = manager.up(settings)
    except BaseException:
        manager.down(settings)
        raise
    record_timing("stack_up_s", time.monotonic() - started)
    # This process inspects and reviews as the stack's reviewer account (MLflow's client
    # reads the login from the environment); the CLI subprocesses inherit it.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(manager.account_env(settings, "reviewer"))
    yield settings
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

    tree = [pid for r in records for pid in process_tree(r.pid)]
    started = time.monotonic()
    manager.down(settings)
    record_timing("stack_down_s", time.monotonic() - started)
    left = [pid for pid, ticks in tree if is_alive(pid, ticks)]
    assert not left, f"processes left behind by down: {left}"
    assert not any(is_running(r) for r in records)


@pytest.fixture(scope="session")
def mlflow_client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)


@pytest.fixture(scope="session")
def small_config_file(tmp_path_factory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL_CONFIG))
    return path


def stack_env(settings) -> dict[str, str]:
    """Environment for a CLI subprocess that talks to ``settings``' stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONNXFLOW_STACK_", "PREFECT_"))}
    env.update(
        {
            "ONNXFLOW_STACK_STATE_DIR": str(settings.state_dir),
            "ONNXFLOW_STACK_PREFECT_PORT": str(settings.prefect_port),
            "ONNXFLOW_STACK_MLFLOW_PORT": str(settings.mlflow_port),
            "ONNXFLOW_STACK_ENDPOINT_PORTS": json.dumps(settings.endpoint_ports),
            "PREFECT_API_URL": settings.prefect_api_url,
            "PREFECT_HOME": str(Path(settings.state_dir) / "cli-prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
    )
    from onnxflow.stack.manager import prefect_auth_env

    env.update(prefect_auth_env(settings))  # Prefect's API asks for its login
    return env


def run_on_stack(settings, command: str, *args, timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``command ARGS`` of this environment against the stack until it ends; fail the
    test with its output unless it succeeds."""
    out = subprocess.run(
        [BIN / command, *args],
        env=stack_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def run_on_demand(settings, params: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """``prefect deployment run`` the on-demand deployment with ``params``, watched until
    the flow run ends (a failed run fails the test)."""
    return run_on_stack(
        settings,
        "prefect",
        "deployment",
        "run",
        "retrain-and-deploy/on-demand",
        "--params",
        json.dumps(params),
        "--watch",
        "--watch-interval",
        "1",
        timeout_s=timeout_s,
    )


#: MLflow's permission grant (basic-auth app).
GRANT = "/api/3.0/mlflow/users/permissions/grant"


def edit_grant(user: str, resource: str, kind: str = "registered_model") -> dict[str, str]:
    """The body of a grant of EDIT on a registered model (or an ``experiment``)."""
    return {"username": user, "resource_type": kind, "resource_id": resource, "permission": "EDIT"}


def add_data_scientist(stack, model: str = "digits") -> tuple[str, str]:
    """As the admin: a data scientist's account, with EDIT on ``model`` (they work on it);
    (name, password)."""
    import httpx

    from onnxflow.stack.manager import account_env

    admin = account_env(stack, "admin")
    auth = (admin["MLFLOW_TRACKING_USERNAME"], admin["MLFLOW_TRACKING_PASSWORD"])
    name, password = f"ds-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with httpx.Client(base_url=stack.mlflow_url, auth=auth, timeout=30) as http:
        http.post(
            "/api/2.0/mlflow/users/create", json={"username": name, "password": password}
        ).raise_for_status()
        http.post(GRANT, json=edit_grant(name, model)).raise_for_status()
    return name, password


def prefect_http(settings):
    """An HTTP client of the stack's Prefect API, logged in (Prefect's basic auth)."""
    import httpx

    from onnxflow.stack.manager import prefect_login

    return httpx.Client(base_url=settings.prefect_api_url, auth=prefect_login(settings), timeout=10)


def record_timing(name: str, seconds: float) -> None:
    """Add one measurement to test-results/stack-timings.json (kept across tests)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "stack-timings.json"
    try:
        timings = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        timings = {}
    timings[name] = round(seconds, 2)
    path.write_text(json.dumps(timings, indent=2))

"""``make up`` / ``make status`` / ``make down`` as a user runs them, on the default
SQLite stores in a fresh state folder, and what ``up`` does when a server cannot start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from onnxflow.errors import StackError
from onnxflow.processes import is_alive, process_tree
from onnxflow.stack import manager
from onnxflow.stack.settings import StackSettings
from tests.integration.conftest import free_ports, record_timing

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def make(target: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), target],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_make_up_status_down_leaves_nothing_behind(tmp_path):
    import time

    prefect_port, mlflow_port, endpoint_port = ports = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONNXFLOW_", "PREFECT_"))}
    env.update(
        {
            "ONNXFLOW_STACK_STATE_DIR": str(tmp_path / "stack"),
            "ONNXFLOW_STACK_PREFECT_PORT": str(prefect_port),
            "ONNXFLOW_STACK_MLFLOW_PORT": str(mlflow_port),
            "ONNXFLOW_STACK_ENDPOINT_PORTS": f"[{endpoint_port}]",
        }
    )
    started = time.monotonic()
    up = make("up", env)
    record_timing("make_up_sqlite_s", time.monotonic() - started)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        for url in (
            f"Prefect UI   http://127.0.0.1:{prefect_port}",
            f"MLflow UI    http://127.0.0.1:{mlflow_port}",
            f"endpoint     http://127.0.0.1:{endpoint_port}",
        ):
            assert url in up.stdout
        assert (tmp_path / "stack" / "mlflow.db").is_file(), "SQLite backend by default"
        state = json.loads((tmp_path / "stack" / "stack.json").read_text())
        names = [p["name"] for p in state["processes"]]
        assert names == ["mlflow", "prefect-server", "worker", f"endpoint-{endpoint_port}"]
        tree = [pt for p in state["processes"] for pt in process_tree(p["pid"])]
        assert len(tree) >= 4

        # status finds the stack's ports in its state file, whatever its own environment says.
        status = make(
            "status",
            {**env, "ONNXFLOW_STACK_PREFECT_PORT": "1", "ONNXFLOW_STACK_ENDPOINT_PORTS": "[]"},
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("✓") == 4 and ": online" in status.stdout
        assert f"http://127.0.0.1:{prefect_port}" in status.stdout
        assert f"endpoint     http://127.0.0.1:{endpoint_port}" in status.stdout

        again = make("up", env)
        assert again.returncode != 0 and "already runs" in again.stderr
    finally:
        down = make("down", env)
    assert down.returncode == 0 and "stack stopped" in down.stdout, down.stdout + down.stderr
    assert not [pid for pid, ticks in tree if is_alive(pid, ticks)], "down left processes"
    assert all(port_free(p) for p in ports)
    after = make("status", env)
    assert after.returncode == 0 and "not running" in after.stdout


def test_up_names_an_unreachable_database_before_starting_anything(tmp_path):
    settings = StackSettings(
        state_dir=tmp_path,
        endpoint_ports=[],
        mlflow_database_url="postgresql://postgres@127.0.0.1:5432/onnxflow_no_such_db",
    )
    with pytest.raises(
        StackError, match="MLflow database postgresql.*onnxflow_no_such_db.*does not exist"
    ):
        manager.up(settings)
    assert manager.read_state(settings) == []


def test_up_stops_what_it_started_when_a_server_is_not_healthy_in_time(tmp_path):
    prefect_port, mlflow_port = free_ports(2)
    settings = StackSettings(
        state_dir=tmp_path,
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
        endpoint_ports=[],
        startup_timeout_s=0.5,
    )
    with pytest.raises(StackError, match="mlflow not healthy after"):
        manager.up(settings)
    assert manager.read_state(settings) == []
    assert not list(_stack_processes(tmp_path)), "up left processes behind"


def _stack_processes(state: Path):
    """Processes whose command line names the state folder (the MLflow server does)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(state) in (proc / "cmdline").read_text():
                yield int(proc.name)
        except OSError:
            continue

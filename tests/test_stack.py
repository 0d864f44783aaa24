"""The stack manager's pieces without servers: settings, commands, process handling."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from onnxflow.errors import StackError
from onnxflow.processes import (
    ProcessRecord,
    is_alive,
    is_running,
    process_tree,
    start_process,
    stop_process,
    wait_until,
)
from onnxflow.stack import manager
from onnxflow.stack.settings import StackSettings


def test_settings_come_from_the_environment_with_their_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXFLOW_STACK_PREFECT_PORT", "4300")
    monkeypatch.setenv("ONNXFLOW_STACK_ENDPOINT_PORTS", "[8080, 8081]")
    monkeypatch.setenv("ONNXFLOW_STACK_SCHEDULE_CRON", "30 3 * * 1")
    monkeypatch.setenv("ONNXFLOW_STACK_MLFLOW_DATABASE_URL", "postgresql://u@db:5432/mlflow")
    settings = StackSettings(state_dir=tmp_path)
    assert settings.prefect_api_url == "http://127.0.0.1:4300/api"
    assert settings.endpoint_urls == ["http://127.0.0.1:8080", "http://127.0.0.1:8081"]
    assert settings.schedule_cron == "30 3 * * 1"
    assert manager.mlflow_backend_uri(settings) == "postgresql://u@db:5432/mlflow"
    assert "u@db" not in repr(settings), "database URLs may hold passwords: kept secret"


def test_defaults_are_local_sqlite_and_daily_at_two(tmp_path):
    settings = StackSettings(state_dir=tmp_path)
    assert settings.schedule_cron == "0 2 * * *" and settings.host == "127.0.0.1"
    assert manager.mlflow_backend_uri(settings) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in manager.prefect_env(settings)


def test_replica_ports_must_differ():
    with pytest.raises(ValueError, match="distinct"):
        StackSettings(endpoint_ports=[8080, 8080])


def test_mlflow_server_proxies_artifacts_and_runs_see_its_http_url(tmp_path):
    settings = StackSettings(
        state_dir=tmp_path,
        mlflow_port=5123,
        prefect_database_url="postgresql+asyncpg://p@127.0.0.1:5432/prefect",
    )
    command = manager.mlflow_server_command(settings)
    assert "--serve-artifacts" in command
    assert command[command.index("--artifacts-destination") + 1] == str(
        tmp_path.resolve() / "mlflow-artifacts"
    )
    worker = manager.worker_env(settings)
    assert worker["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5123"
    assert worker["PREFECT_API_URL"] == settings.prefect_api_url
    assert worker["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    endpoint = manager.endpoint_env(settings, 8099)
    assert endpoint["ONNXFLOW_SERVE_PORT"] == "8099"
    assert endpoint["ONNXFLOW_SERVE_MODEL"] == "digits@champion"
    assert endpoint["ONNXFLOW_SERVE_ALL_MODELS"] == "champion"  # one endpoint, every model
    # the production loop by default: the challenger in shadow, capture into one folder
    assert endpoint["ONNXFLOW_SERVE_SHADOW"] == "challenger"
    assert endpoint["ONNXFLOW_SERVE_CAPTURE"] == str(settings.state_dir.resolve() / "captured")
    assert endpoint["ONNXFLOW_SERVE_CAPTURE_SEGMENT_S"] == "60.0"
    plain = manager.endpoint_env(
        settings.model_copy(update={"shadow": None, "capture": False}), 8099
    )
    assert "ONNXFLOW_SERVE_SHADOW" not in plain and "ONNXFLOW_SERVE_CAPTURE" not in plain
    assert endpoint["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5123"


def test_the_callers_stores_do_not_leak_into_the_stack(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere/api")
    monkeypatch.setenv("ONNXFLOW_SERVE_PORT", "1")
    env = manager.base_env(StackSettings(state_dir=tmp_path))
    assert not {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "ONNXFLOW_SERVE_PORT"} & set(env)


TREE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print("started", flush=True)
time.sleep(300)
"""


def test_stop_ends_the_whole_tree_even_children_in_their_own_session(tmp_path):
    record = start_process("tree", [sys.executable, "-c", TREE], {}, tmp_path / "tree.log")
    # a line of its own: the log's header line holds the script, "started" included
    wait_until(
        record, lambda: "started" in (tmp_path / "tree.log").read_text().splitlines(), 60, "started"
    )
    tree = process_tree(record.pid)
    assert len(tree) == 3
    assert stop_process(record, timeout_s=5)
    assert not is_running(record)
    assert not [pid for pid, ticks in tree if is_alive(pid, ticks)]
    assert not stop_process(record), "a second stop finds nothing to stop"


def test_a_recycled_pid_is_not_mistaken_for_ours(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = ProcessRecord(name="old", pid=sleeper.pid, start_ticks=1, argv=[], log_path="")
        assert not is_running(stale)
        assert not stop_process(stale)
        assert sleeper.poll() is None, "someone else's process is left alone"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_wait_until_reports_the_log_of_a_process_that_died(tmp_path):
    record = start_process(
        "dies",
        [sys.executable, "-c", "print('bad config: no port'); raise SystemExit(3)"],
        {},
        tmp_path / "dies.log",
    )
    with pytest.raises(StackError, match="(?s)dies exited before it was healthy.*bad config"):
        wait_until(record, lambda: False, 20, "healthy", error=StackError)


def test_up_refuses_a_taken_port_before_starting_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = StackSettings(
            state_dir=tmp_path,
            mlflow_port=port,
            prefect_port=port + 1 if port < 65535 else port - 1,
            endpoint_ports=[],
        )
        with pytest.raises(
            StackError, match=f"port {port} on 127.0.0.1, wanted by the MLflow server"
        ):
            manager.up(settings)
    assert manager.read_state(settings) == []


def test_down_and_status_without_a_stack(tmp_path):
    settings = StackSettings(state_dir=tmp_path)
    assert manager.down(settings) == []
    assert manager.status(settings) == []


def test_scheduled_runs_use_the_configured_pipeline_file(tmp_path):
    from onnxflow.config import PipelineConfig
    from onnxflow.stack.deployments import config_parameter, scheduled_config

    path = tmp_path / "nightly.yaml"
    path.write_text("train: {epochs: 12}\nvalidate: {atol: 0.001}\npromote: {mode: review}\n")
    config = scheduled_config(StackSettings(state_dir=tmp_path, schedule_config=path))
    assert config.train.epochs == 12 and config.promote.mode == "review"
    # What the deployment stores is what the flow's parameter validation reads back.
    assert PipelineConfig.model_validate(config_parameter(config)) == config
    assert scheduled_config(StackSettings(state_dir=tmp_path)) == PipelineConfig()
    with pytest.raises(StackError, match="not a file"):
        scheduled_config(StackSettings(state_dir=tmp_path, schedule_config=tmp_path / "nope.yaml"))


def test_trigger_names_a_missing_data_file_and_an_unreachable_stack(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from onnxflow.cli import app
    from tests.integration.conftest import free_ports

    runner = CliRunner()
    missing = runner.invoke(app, ["trigger", "--data", str(tmp_path / "nope.csv"), "--target", "y"])
    assert missing.exit_code == 2 and "data file not found" in missing.output

    prefect_port, mlflow_port = free_ports(2)
    monkeypatch.setenv("ONNXFLOW_STACK_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("ONNXFLOW_STACK_PREFECT_PORT", str(prefect_port))
    monkeypatch.setenv("ONNXFLOW_STACK_MLFLOW_PORT", str(mlflow_port))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    down = runner.invoke(app, ["trigger", "--framework", "torch"])
    assert down.exit_code == 1 and "is the stack up?" in down.output
    assert f"127.0.0.1:{prefect_port}" in down.output

    # as a person (a run ticket first, from the stack's MLflow server): the same answer at
    # once, not after MLflow's client has retried the refused connection for minutes
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    down = runner.invoke(app, ["trigger", "--framework", "torch"])
    assert down.exit_code == 1 and "no run ticket" in down.output
    assert f"127.0.0.1:{mlflow_port} (is the stack up?" in down.output
    assert "ConnectError" in down.output


def test_the_monitor_deployments_parameters_come_from_the_monitor_config(tmp_path):
    from onnxflow.stack.deployments import monitor_parameters

    config = tmp_path / "monitor.yaml"
    config.write_text(
        "scan:\n  policy: {max_drift_share: 0.2, min_shadow_requests: 10}\n"
        "  promotion: review\n  since: 30m\ndigits: {}\n"
    )
    settings = StackSettings(state_dir=tmp_path / "state", monitor_config=config)
    monitored = settings.monitored()
    assert list(monitored) == ["scan", "digits"]
    params = monitor_parameters(settings, "scan", monitored["scan"])
    assert params["capture"] == str((tmp_path / "state").resolve() / "captured")
    assert params["policy"]["max_drift_share"] == 0.2 and params["policy"]["min_labels"] == 50
    assert params["config"] == {"promote": {"mode": "review"}} and params["since"] == "30m"
    assert monitor_parameters(settings, "digits", monitored["digits"])["retrain"] is True
    # without a config: the stack's own model, the defaults
    assert list(StackSettings(state_dir=tmp_path).monitored()) == ["digits"]
    config.write_text("scan: {promotion: sometimes}\n")
    with pytest.raises(ValueError, match="promotion"):
        settings.monitored()

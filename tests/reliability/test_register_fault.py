"""The MLflow server is down when a flow reaches ``register``.

What must hold: the register task retries with its backoff, then the flow fails with an
error that names the server it could not reach; the registry holds no new version, half
made or whole, and no alias moved.
"""

from __future__ import annotations

import time

import pytest

from onnxflow.processes import free_port
from tests.conftest import validation_summary
from tests.reliability.conftest import (
    SOAK,
    _example,
    kill_process_group,
    mlflow_healthy,
    tracking_server,
    tracking_server_pid,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def _summary(tmp_path, model_path):
    return validation_summary(
        tmp_path,
        latency_ms={"onnx_b1": 0.1, "framework_b1": 0.2},
        model_bytes=model_path.stat().st_size,
    )


def test_register_with_mlflow_down_retries_then_fails_clearly(
    registry, model_files, tmp_path, monkeypatch, report
):
    import mlflow
    from mlflow import MlflowClient
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from onnxflow.config import DataConfig, RegisterConfig
    from onnxflow.data import prepare_data
    from onnxflow.sources import TableSource, write_sample
    from onnxflow.tasks.register import register_task
    from onnxflow.tasks.retry import REGISTRY_RETRY_DELAYS

    dataset = prepare_data(DataConfig(), tmp_path / "data")
    inputs, labels = TableSource(framework="torch", dataset=dataset).split("test")
    sample = write_sample(tmp_path / "sample", inputs, name="digits", digest="d", split="test")
    champion = registry.register("guarded", model_files["mlp"], _example())
    port = free_port()
    # The short form keeps the shape of the backoff and shortens it; the long form
    # waits the configured delays.
    delays = list(REGISTRY_RETRY_DELAYS) if SOAK else [0.5, 1.0, 2.0]
    # One HTTP attempt per task attempt: MLflow's own client retries connection errors
    # 7 times with exponential backoff (minutes), which would hide the task's retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    with tracking_server(registry, tmp_path / "server.log", port) as url:
        wait_for(lambda: mlflow_healthy(url), timeout=90)
        client = MlflowClient(url, url)
        before = client.get_registered_model("guarded")
        run_id = client.create_run(registry.experiment_id).info.run_id
        kill_process_group(tracking_server_pid(url))
        wait_for(lambda: not mlflow_healthy(url), timeout=10)
        report.fault("mlflow down at register", False)

        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        task = register_task.with_options(retries=len(delays), retry_delay_seconds=delays)

        @flow(name="reach-register")
        def reach_register():
            return task(
                model_files["mlp"],
                summary=_summary(tmp_path, model_files["mlp"]),
                lineage={"source_framework": "onnx-helper"},
                sample=sample,
                config=RegisterConfig(model_name="guarded"),
                run_id=run_id,
            )

        started = time.monotonic()
        try:
            state = reach_register(return_state=True)
        finally:
            mlflow.set_tracking_uri(None)
        took = time.monotonic() - started

    assert state.is_failed()
    with pytest.raises(Exception) as failure:
        state.result()
    message = str(failure.value)
    assert f"127.0.0.1:{port}" in message or url in message, message
    assert "refused" in message.lower() or "connect" in message.lower(), message
    # Every attempt was made, with the backoff between them.
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
        assert len(runs) == 1
        assert runs[0].run_count == len(delays) + 1, runs[0]
    assert took >= sum(delays), f"{len(delays)} retries took {took:.1f} s"

    # Nothing registered, nothing moved.
    with tracking_server(registry, tmp_path / "server.log", port) as url:
        wait_for(lambda: mlflow_healthy(url), timeout=90)
        client = MlflowClient(url, url)
        after = client.get_registered_model("guarded")
        found = client.search_model_versions("name='guarded'")
    assert [v.version for v in found] == [champion]
    assert after.aliases == before.aliases
    report.add("register_retry_s", took)
    report.fault("mlflow down at register", True)

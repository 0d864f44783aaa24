"""The scheduled deployment fires on its own: a cron of every minute, both frameworks
(Keras too) through the worker, and the replica ends on the new champion. Slow (about
two minutes, most of it waiting for the minute): ``pytest -m slow``."""

from __future__ import annotations

import time

import httpx
import pytest
import yaml

from onnxflow.endpoints import serving_version
from onnxflow.stack import manager
from onnxflow.stack.settings import StackSettings
from tests.integration.conftest import SMALL_CONFIG, free_ports, record_timing

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_scheduled_deployment_runs_both_frameworks_and_deploys(tmp_path, monkeypatch):
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(SMALL_CONFIG))
    prefect_port, mlflow_port, endpoint_port = free_ports(3)
    settings = StackSettings(
        state_dir=tmp_path / "stack",
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
        endpoint_ports=[endpoint_port],
        poll_interval_s=1,
        worker_query_s=1,
        schedule_cron="* * * * *",
        schedule_config=config,
    )
    manager.up(settings)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            runs = httpx.post(
                f"{settings.prefect_api_url}/flow_runs/filter",
                timeout=10,
                json={
                    "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}},
                    "deployments": {"name": {"any_": ["scheduled"]}},
                },
            ).json()
            if runs:
                break
            time.sleep(2)
        assert runs, "no scheduled run finished within 5 minutes"
        run = runs[0]
        assert run["state"]["type"] == "COMPLETED", run["state"]
        assert run["work_pool_name"] == settings.work_pool
        record_timing("scheduled_run_s", run["total_run_time"])
        # Both frameworks registered; the flow waited for the replica before finishing.
        from mlflow import MlflowClient

        for key, value in manager.account_env(settings, "endpoint").items():
            monkeypatch.setenv(key, value)
        client = MlflowClient(tracking_uri=settings.mlflow_url, registry_uri=settings.mlflow_url)
        versions = client.search_model_versions("name='digits'")
        assert {v.tags["source_framework"] for v in versions} == {"torch", "keras"}
        champion = client.get_model_version_by_alias("digits", "champion").version
        assert serving_version(settings.endpoint_urls[0], "digits") == champion
    finally:
        manager.down(settings)

"""The whole loop against real processes, as a team runs it.

PostgreSQL-backed MLflow and Prefect servers, a process worker, runs of the on-demand
deployment started from the command line (``onnxflow trigger`` and ``prefect deployment
run``), registration through the tracking server, two serving replicas following
``digits@champion``: an auto promotion, a review-mode promotion done by a reviewer, and
a rollback, each followed by both replicas.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from onnxflow.endpoints import serving_version, wait_until_serving
from onnxflow.stack import manager
from tests.integration.conftest import (
    BIN,
    prefect_http,
    record_timing,
    run_on_demand,
    run_on_stack,
    stack_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def flow_run(settings, run_id: str) -> dict:
    with prefect_http(settings) as http:
        return http.get(f"/flow_runs/{run_id}").json()


def wait_flow_run(settings, run_id: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = flow_run(settings, run_id)
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished after {timeout_s} s: {run['state']}")


def predict(url: str) -> tuple[str, int]:
    """One V2 inference with a digits row; (version that answered, predicted class)."""
    row = np.zeros(64, dtype=np.float32).tolist()
    meta = httpx.get(f"{url}/v2/models/digits", timeout=10).json()
    body = {
        "inputs": [
            {"name": meta["inputs"][0]["name"], "shape": [1, 64], "datatype": "FP32", "data": row}
        ]
    }
    response = httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response.headers["x-model-version"], int(
        np.argmax(response.json()["outputs"][0]["data"])
    )


def test_triggered_run_goes_through_worker_registers_and_both_replicas_serve_it(
    stack,
    mlflow_client,
    small_config_file,
):
    assert [serving_version(u, "digits") for u in stack.endpoint_urls] == [None, None]
    started = time.monotonic()
    trigger = subprocess.Popen(
        [
            BIN / "onnxflow",
            "trigger",
            "--framework",
            "torch",
            "--config",
            small_config_file,
            "--promotion",
            "auto",
            "--wait",
        ],
        # As a person with their own MLflow login (the stack's reviewer stands in).
        env={**stack_env(stack), **manager.account_env(stack, "reviewer")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        reached = wait_until_serving(stack.endpoint_urls, "digits", "1", timeout_s=240)
    finally:
        stdout, stderr = trigger.communicate(timeout=240)
    trigger_to_serving = max(reached.values())
    record_timing("trigger_to_both_replicas_serving_s", trigger_to_serving)
    print(
        f"trigger -> both replicas serve v1: {trigger_to_serving:.1f} s ({reached}); "
        f"`onnxflow trigger --wait` returned after {time.monotonic() - started:.1f} s"
    )
    assert trigger.returncode == 0, stdout + stderr
    assert "finished COMPLETED" in stdout and stdout.count("serves digits v1") == 2, stdout
    run_id = stdout.split("/runs/flow-run/")[1].split()[0]

    run = wait_flow_run(stack, run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    # It ran on the worker, in a process of its own, not in this test's process.
    assert run["work_pool_name"] == stack.work_pool
    flow_pid = int(str(run["infrastructure_pid"]).rsplit(":", 1)[-1])  # "host:pid"
    assert flow_pid != os.getpid()
    assert run["parameters"]["frameworks"] == ["torch"]
    assert run["parameters"]["config"]["train"]["epochs"] == 3

    # Registered through the tracking server; artifacts proxied into its artifact store.
    version = mlflow_client.get_model_version("digits", "1")
    assert version.tags["validation"] == "passed" and version.tags["source_framework"] == "torch"
    assert version.tags["flow_run_id"], "lineage names the flow run"
    # Who asked: the MLflow server redeemed the run's ticket and stamped the person.
    assert version.tags["requested_by"] == "reviewer", version.tags
    assert version.tags["registered_by"] == "pipeline" and "run_ticket" not in version.tags
    assert len(run["parameters"]["run_tickets"]) == 1
    assert mlflow_client.get_model_version_by_alias("digits", "champion").version == "1"
    run_info = mlflow_client.get_run(version.run_id)
    assert run_info.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = list((Path(stack.state_dir) / "mlflow-artifacts").rglob("model.onnx"))
    assert stored, "the model's files live in the tracking server's artifact store"
    assert [predict(u)[0] for u in stack.endpoint_urls] == ["1", "1"]


def test_review_mode_waits_for_the_reviewer_then_both_replicas_follow(
    stack,
    mlflow_client,
    small_config_file,
):
    import yaml

    config = {
        **yaml.safe_load(small_config_file.read_text()),
        "train": {"epochs": 4, "hidden_sizes": [32], "seed": 7},
        "promote": {"mode": "review"},
    }
    params = {"frameworks": ["torch"], "config": config, "endpoints": stack.endpoint_urls}
    run_on_demand(stack, params, timeout_s=300)

    challenger = mlflow_client.get_model_version_by_alias("digits", "challenger")
    assert challenger.version == "2"
    assert challenger.tags["promotion_decision"] == "awaiting_review"
    assert mlflow_client.get_model_version_by_alias("digits", "champion").version == "1"
    report = mlflow_client.list_artifacts(challenger.run_id, "validation")
    assert any(a.path.endswith("report.md") for a in report), [a.path for a in report]
    time.sleep(2 * stack.poll_interval_s)
    assert [serving_version(u, "digits") for u in stack.endpoint_urls] == ["1", "1"]

    # The reviewer approves (here through the tracking server's API; the browser test
    # does it by clicking in the MLflow UI).
    moved = time.monotonic()
    mlflow_client.set_registered_model_alias("digits", "champion", "2")
    wait_until_serving(stack.endpoint_urls, "digits", "2", timeout_s=30)
    record_timing("alias_move_to_both_replicas_serving_s", time.monotonic() - moved)
    assert [predict(u)[0] for u in stack.endpoint_urls] == ["2", "2"]


def test_rollback_is_followed_by_both_replicas(stack, mlflow_client):
    moved = time.monotonic()
    mlflow_client.set_registered_model_alias("digits", "champion", "1")
    wait_until_serving(stack.endpoint_urls, "digits", "1", timeout_s=30)
    record_timing("rollback_to_both_replicas_serving_s", time.monotonic() - moved)
    assert [predict(u)[0] for u in stack.endpoint_urls] == ["1", "1"]


def test_deployments_and_uis(stack):
    # Prefect's API asks for its login (basic auth); its health probe does not.
    api = stack.prefect_api_url
    assert httpx.get(f"{api}/deployments/name/retrain-and-deploy/scheduled").status_code == 401
    with prefect_http(stack) as http:
        scheduled = http.get("/deployments/name/retrain-and-deploy/scheduled").json()
        on_demand = http.get("/deployments/name/retrain-and-deploy/on-demand").json()
    (schedule,) = scheduled["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert scheduled["work_pool_name"] == stack.work_pool
    assert scheduled["entrypoint"] == "onnxflow.flows.retrain.retrain_and_deploy"
    # The deployment holds only what the config sets; the worker fills in the defaults.
    from onnxflow.config import PipelineConfig

    nightly = PipelineConfig.model_validate(scheduled["parameters"]["config"])
    assert nightly.train.epochs == 30, "full training at night"
    assert on_demand["schedules"] == []
    assert set(on_demand["parameter_openapi_schema"]["properties"]) == {
        "frameworks",
        "config",
        "endpoints",
        "endpoint_timeout_s",
        "recipe",
        "sweep",
        "run_tickets",
    }, "the UI's run form"
    # The MLflow UI asks for a login (the stack runs MLflow with authentication).
    login = manager.account_env(stack, "reviewer")
    auth = (login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"])
    assert httpx.get(stack.mlflow_url, timeout=10).status_code == 401
    for url, url_auth in ((stack.prefect_url, None), (stack.mlflow_url, auth)):
        page = httpx.get(url, timeout=10, follow_redirects=True, auth=url_auth)
        assert page.status_code == 200 and "<html" in page.text.lower(), url


def test_status_reports_every_part_and_the_served_version(stack):
    out = run_on_stack(stack, "onnxflow", "stack", "status", timeout_s=60)
    for part in (
        "mlflow",
        "prefect-server",
        "worker",
        *(f"endpoint-{p}" for p in stack.endpoint_ports),
    ):
        assert part in out.stdout
    assert "healthy" in out.stdout and f"pool {stack.work_pool}: online" in out.stdout
    assert out.stdout.count("digits@champion -> v1") == 2
    assert stack.prefect_url in out.stdout and stack.mlflow_url in out.stdout

"""Faults injected into a running system, and what must hold through each.

* the MLflow server dies while the endpoint serves: serving goes on, readiness stays
  true, and the alias is followed again once the server is back;
* a new champion's stored files are changed after registration: the sha256 check
  refuses it, the old version keeps serving under load, and the refusal is counted;
* the endpoint process is killed: the serve step's status check notices, and a
  redeploy restores it.

(MLflow down when a flow reaches register: test_register_fault.py. The worker killed
mid-flow: test_worker_fault.py.)
"""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest

from onnxflow.processes import free_port
from onnxflow.serving.launcher import read_info
from onnxflow.serving.settings import ServingSettings
from tests.reliability.conftest import (
    PROFILE,
    TOKEN,
    RssSampler,
    _example,
    endpoint_pid,
    finish,
    kill_process_group,
    mlflow_healthy,
    served_version,
    start_endpoint,
    tracking_server,
    tracking_server_pid,
    wait_for,
)
from tests.reliability.load import LoadProcess
from tests.serving.conftest import corrupt_stored_model

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(600)]


def test_mlflow_server_killed_while_serving(registry, model_files, tmp_path, report):
    v1 = registry.register("remote", model_files["mlp"], _example())
    v2 = registry.register("remote", model_files["mlp_v2"], _example(), aliases=())
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    survived = False
    with tracking_server(registry, log, port) as url:
        wait_for(lambda: mlflow_healthy(url), timeout=90)
        endpoint = start_endpoint(
            registry,
            tmp_path / "remote",
            tracking_uri=url,
            model="remote@champion",
            poll_interval_s=0.2,
        )
        try:
            load = LoadProcess(
                endpoint.url,
                tmp_path / "load.json",
                connections=16,
                duration=PROFILE.fault_load_s * 2 + 4,
                token=TOKEN,
            )
            time.sleep(1)
            kill_process_group(tracking_server_pid(url))
            report.fault("mlflow server killed while serving", False)
            wait_for(lambda: not mlflow_healthy(url), timeout=10)
            # Down for a while: the watcher's checks fail, and serving must not notice.
            deadline = time.monotonic() + PROFILE.fault_load_s
            while time.monotonic() < deadline:
                assert httpx.get(f"{endpoint.url}/v2/health/ready").status_code == 200
                time.sleep(0.2)
            with endpoint.client() as http:
                last = http.get("/admin/status").json()["last_check"]
            assert last["outcome"] == "registry_error", last
            # Back on the same port, with champion moved while it was down.
            registry.set_alias("remote", "champion", v2)
            with tracking_server(registry, log, port):
                wait_for(lambda: mlflow_healthy(url), timeout=90)
                started = time.monotonic()
                wait_for(lambda: served_version(endpoint) == v2, timeout=30)
                report.add("alias_follow_after_mlflow_restart_s", time.monotonic() - started)
            result = load.result()
        finally:
            finish(endpoint, report)
    assert not result.failed, f"{len(result.failed)} failed, e.g. {result.failed[:3]}"
    assert result.versions() <= {v1, v2}
    report.count("requests_sent", result.sent)
    report.count("requests_failed", len(result.failed))
    survived = True
    report.fault("mlflow server killed while serving", survived)


def test_corrupt_new_champion_is_refused_and_old_keeps_serving(
    swappy, registry, versions, model_files, tmp_path, report
):
    v1 = versions["v1"]
    registry.set_alias("swappy", "champion", v1)
    wait_for(lambda: served_version(swappy) == v1, timeout=15)
    broken = registry.register("swappy", model_files["mlp_v3"], _example(), aliases=())
    corrupt_stored_model(registry.stored_folder("swappy", broken))  # after registration

    report.fault("corrupt new champion", False)
    load = LoadProcess(
        swappy.url,
        tmp_path / "load.json",
        connections=64,
        duration=PROFILE.fault_load_s + 2,
        token=TOKEN,
    )
    try:
        with RssSampler(endpoint_pid(swappy)) as rss:
            time.sleep(1)
            registry.set_alias("swappy", "champion", broken)
            with swappy.client() as http:
                wait_for(lambda: broken in http.get("/admin/status").json()["refused"], timeout=15)
                detail = http.get("/admin/status").json()["refused"][broken]
                metrics = http.get("/metrics").text
            result = load.result()
    finally:
        registry.set_alias("swappy", "champion", v1)
    assert "sha256 mismatch" in detail
    assert not result.failed, f"{len(result.failed)} failed, e.g. {result.failed[:3]}"
    assert result.versions() == {v1}, "only the old version may answer"
    refusals = re.search(
        rf'onnxflow_model_refusals_total{{model="swappy",version="{broken}"}} (\S+)', metrics
    )
    assert refusals and float(refusals.group(1)) >= 1
    report.count("requests_sent", result.sent)
    report.count("requests_failed", len(result.failed))
    report.peak("peak_rss_mb", rss.peak)
    report.fault("corrupt new champion", True)


def test_killed_endpoint_is_noticed_and_a_redeploy_restores_it(
    registry, versions, tmp_path, monkeypatch, report
):
    from onnxflow.deploy import deploy_endpoint, endpoint_status, stop_endpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    state = tmp_path / "deployed"
    settings = ServingSettings(
        model="swappy@champion", port=free_port(), token=TOKEN, cache_dir=tmp_path / "cache"
    )
    report.fault("endpoint process killed", False)
    deploy_endpoint("swappy@champion", settings=settings, state_dir=state)
    try:
        status = endpoint_status(state)
        assert status is not None and status["ready"]
        os.kill(read_info(state).pid, signal.SIGKILL)
        # The serve step's health check notices (no endpoint runs any more) ...
        assert wait_for(lambda: endpoint_status(state) is None, timeout=10) is not False
        # ... and deploying again brings it back, on the same URL.
        started = time.monotonic()
        url = deploy_endpoint("swappy@champion", settings=settings, state_dir=state)
        report.add("endpoint_restore_s", time.monotonic() - started)
        status = endpoint_status(state)
        assert status["ready"] and status["url"] == url
        assert status["version"] == versions["v1"]
    finally:
        stop_endpoint(state)
    report.fault("endpoint process killed", True)

"""The serve task: deploy as a managed process, smoke test, status, stop."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_deploy_status_stop(registry, registered, tmp_path, monkeypatch):
    from onnxflow.deploy import deploy_endpoint, endpoint_status, stop_endpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    monkeypatch.setenv("ONNXFLOW_SERVE_CACHE_DIR", str(tmp_path / "cache"))
    state = tmp_path / "serve"
    url = deploy_endpoint("digits@champion", port=0, state_dir=state)
    try:
        assert (state / "endpoint.pid").is_file() and (state / "endpoint.log").is_file()
        status = endpoint_status(state)
        assert status["ready"] is True and status["version"] == registered["digits"]
        assert status["smoke_test"]["version"] == registered["digits"]
        assert len(status["smoke_test"]["predictions"]["logits"][0]) == 10
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        # deploying again replaces the running endpoint instead of failing on it
        url = deploy_endpoint("digits@champion", port=0, state_dir=state)
        assert endpoint_status(state)["url"] == url
    finally:
        assert stop_endpoint(state) is True
    assert endpoint_status(state) is None
    assert stop_endpoint(state) is False


@pytest.mark.parametrize("mode", ["server", "sqlite"])
def test_mlflow_stays_out_of_the_endpoint(
    mode, registry, mlflow_server, endpoints, tmp_path, monkeypatch
):
    """Via a tracking server or the default SQLite store, the endpoint never imports MLflow
    (its reads go over REST, or to the SQLite file read-only): fast start, small RSS."""
    from onnxflow.deploy import deploy_endpoint, stop_endpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server if mode == "server" else registry.uri)
    state = tmp_path / "serve"
    url = deploy_endpoint("digits@champion", port=0, token="t0ken-t0ken", state_dir=state)
    try:
        status = httpx.get(
            f"{url}/admin/status", headers={"authorization": "Bearer t0ken-t0ken"}
        ).json()
        assert status["mlflow_loaded"] is False
        assert status["heavy_modules_loaded"] == []
        assert status["rss_bytes"] < 150 << 20, status["rss_bytes"]
    finally:
        stop_endpoint(state)


def test_deploy_fails_clearly_for_an_unknown_model(registry, tmp_path, monkeypatch):
    from onnxflow.deploy import deploy_endpoint
    from onnxflow.errors import ServingError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    with pytest.raises(ServingError, match="not ready"):
        deploy_endpoint("nosuchmodel@champion", port=0, state_dir=tmp_path / "serve", timeout_s=3)
    assert not (tmp_path / "serve" / "endpoint.pid").exists()


def test_the_deploy_step_does_not_import_prefect():
    code = "import sys, onnxflow.deploy; print('prefect' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.getcwd()
    )
    assert out.stdout.strip() == "False"

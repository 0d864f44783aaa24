"""The serving image, built and run: ``make images`` then the container against a real MLflow
tracking server (proxied artifacts, as the stack runs it), answered over V2 by tritonclient.

Slow (an image build, minutes the first time): ``make test-all`` or ``pytest -m slow``.
Needs podman (with runc) or ENGINE=docker; on these machines ``apt-get install podman runc
mmdebstrap`` (``make system-packages-images``) is all it takes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from onnxflow.mlflow_servers import start_tracking_server
from tests.integration.conftest import free_ports
from tests.serving import models
from tests.serving.conftest import answers, wait_for

ROOT = Path(__file__).resolve().parents[2]
ENGINE = os.environ.get("ENGINE", "podman")
SERVING_IMAGE = "localhost/onnxflow-serving:latest"
PIPELINE_IMAGE = "localhost/onnxflow:latest"
#: ``run`` options of every container here: the host's network (the tracking server is on
#: its 127.0.0.1) and the same open-file and process limits, whatever the engine's defaults.
ON_HOST = ("--network", "host", "--ulimit", "nofile=10000:10000", "--ulimit", "nproc=4096:4096")

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def engine(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    flags = ["--runtime", "runc"] if ENGINE == "podman" and shutil.which("runc") else []
    run_flags = flags if args and args[0] in ("run", "create") else []
    command = [ENGINE, *args[:1], *run_flags, *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=check)


def build(which: str) -> None:
    assert shutil.which(ENGINE), (
        f"{ENGINE} is not installed: apt-get install podman runc mmdebstrap"
    )
    built = subprocess.run(
        [str(ROOT / "infra" / "images.sh"), which],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]


@pytest.fixture(scope="module")
def serving_image() -> str:
    build("serving")
    return SERVING_IMAGE


@pytest.fixture(scope="module")
def pipeline_image() -> str:
    build("pipeline")
    return PIPELINE_IMAGE


@pytest.fixture(scope="module")
def proxied_tracking_server(tmp_path_factory):
    """``mlflow server --serve-artifacts``: clients (the container too) reach the artifacts
    through HTTP, never through this machine's file system."""
    root = tmp_path_factory.mktemp("images-mlflow")
    (port,) = free_ports(1)
    proc = start_tracking_server(
        f"sqlite:///{root / 'mlflow.db'}",
        port,
        root / "server.log",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{url}/health"), timeout=120)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def _register(tracking_uri: str, name: str, model_path: Path, example: np.ndarray) -> str:
    import mlflow

    from onnxflow.registration import register_onnx

    with pytest.MonkeyPatch.context() as patch:  # the variable is restored after
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        try:
            version = register_onnx(
                model_path,
                model_name=name,
                input_example=example,
                tags={"source_framework": "onnx-helper"},
                aliases=("champion",),
            )
        finally:
            mlflow.set_tracking_uri(None)
    return version.version


def test_the_serving_container_serves_the_champion_to_tritonclient(
    serving_image, proxied_tracking_server, tmp_path
):
    import onnxruntime as ort
    import tritonclient.http as triton

    model_path = models.mlp(tmp_path / "mlp" / "model.onnx", seed=3)
    example = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    name = f"images-{uuid.uuid4().hex[:6]}"
    version = _register(proxied_tracking_server, name, model_path, example[:1])

    (port,) = free_ports(1)
    container = f"onnxflow-serving-test-{uuid.uuid4().hex[:8]}"
    engine(
        "run",
        "-d",
        "--name",
        container,
        *ON_HOST,
        "-e",
        f"MLFLOW_TRACKING_URI={proxied_tracking_server}",
        "-e",
        f"ONNXFLOW_SERVE_MODEL={name}@champion",
        "-e",
        "ONNXFLOW_SERVE_HOST=127.0.0.1",
        "-e",
        f"ONNXFLOW_SERVE_PORT={port}",
        serving_image,
    )
    url = f"127.0.0.1:{port}"
    try:

        def ready() -> bool:
            state = engine("inspect", "-f", "{{.State.Running}}", container, check=False)
            assert state.stdout.strip() == "true", "the container exited: see its log below"
            return answers(f"http://{url}/v2/health/ready")

        wait_for(ready, timeout=180)
        assert answers(f"http://{url}/v2/health/live")
        # The image's own HEALTHCHECK (kept by building in docker format) passes too.
        if ENGINE == "podman":
            assert engine("healthcheck", "run", container, check=False).returncode == 0

        client = triton.InferenceServerClient(url)
        assert client.is_server_live() and client.is_model_ready(name)
        metadata = client.get_model_metadata(name)
        assert [i["name"] for i in metadata["inputs"]] == ["features"]
        features = triton.InferInput("features", list(example.shape), "FP32")
        features.set_data_from_numpy(example, binary_data=True)
        result = client.infer(name, [features])
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        (expected,) = session.run(None, {"features": example})
        output = metadata["outputs"][0]["name"]
        np.testing.assert_allclose(result.as_numpy(output), expected, rtol=1e-5, atol=1e-6)
        assert result.get_response()["model_version"] == version
        # Which image answered: the process inside has no torch, tensorflow or pandas.
        probe = engine(
            "exec",
            container,
            "python",
            "-c",
            "import importlib.util as u; print([m for m in ('torch', 'tensorflow',"
            " 'pandas') if u.find_spec(m)])",
        )
        assert probe.stdout.strip() == "[]", probe.stdout
    finally:
        logs = engine("logs", container, check=False)
        engine("rm", "-f", container, check=False)
        print(logs.stdout[-3000:], logs.stderr[-3000:])


def test_a_flow_runs_inside_the_pipeline_container(pipeline_image, proxied_tracking_server):
    """``onnxflow run`` inside the pipeline image, against the tracking server outside it: the
    version it registers carries the validation evidence."""
    from mlflow import MlflowClient

    name = f"in-container-{uuid.uuid4().hex[:6]}"
    ran = engine(
        "run",
        "--rm",
        *ON_HOST,
        "-e",
        f"MLFLOW_TRACKING_URI={proxied_tracking_server}",
        pipeline_image,
        "onnxflow",
        "run",
        "--framework",
        "sklearn",
        "--model-name",
        name,
        check=False,
        timeout=1200,
    )
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    client = MlflowClient(tracking_uri=proxied_tracking_server)
    (version,) = client.search_model_versions(f"name='{name}'")
    assert version.tags["validation"] == "passed"
    assert version.tags["source_framework"] == "sklearn"
    assert client.get_model_version_by_alias(name, "champion").version == version.version


@pytest.fixture(scope="module")
def postgres_image() -> str:
    build("postgres")
    return "localhost/onnxflow-postgres:latest"


def test_docker_compose_runs_under_podman_compose(
    serving_image, pipeline_image, postgres_image, tmp_path
):
    """infra/docker-compose.yml brought up by ``infra/compose-up.sh`` (podman-compose, each
    healthcheck a gate): PostgreSQL, MLflow, the Prefect server and UI, the deployments, the
    worker; the endpoint waits for ``digits@champion`` until ``onnxflow trigger`` runs the
    on-demand deployment on the compose's worker, then serves it to tritonclient.
    ``podman-compose down -v`` leaves no container or volume behind."""
    import tritonclient.http as triton

    assert ENGINE == "podman", "podman-compose drives podman"
    project = f"onnxflow-test-{uuid.uuid4().hex[:6]}"
    mlflow_port, prefect_port, endpoint_port = free_ports(3)
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "COMPOSE_PROJECT_NAME": project,
        "POSTGRES_IMAGE": postgres_image,
        "MLFLOW_HOST_PORT": str(mlflow_port),
        "PREFECT_HOST_PORT": str(prefect_port),
        "ENDPOINT_HOST_PORT": str(endpoint_port),
    }
    endpoint = f"http://127.0.0.1:{endpoint_port}"

    def in_project(kind: str) -> list[str]:
        label = f"label=com.docker.compose.project={project}"
        listed = engine(
            *(("volume", "ls") if kind == "volume" else ("ps", "-a")), "-q", "--filter", label
        )
        return listed.stdout.split()

    try:
        up = subprocess.run(
            [str(ROOT / "infra" / "compose-up.sh")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        for service in ("postgres", "mlflow", "prefect-server", "endpoint"):
            assert f"==> {service} healthy" in up.stdout, up.stdout
        assert "deployed retrain-and-deploy/scheduled, retrain-and-deploy/on-demand" in up.stdout
        assert answers(f"http://127.0.0.1:{mlflow_port}/health")
        assert answers(f"http://127.0.0.1:{prefect_port}/api/health")
        assert "<!DOCTYPE html>" in httpx.get(f"http://127.0.0.1:{prefect_port}/").text
        # No champion yet: alive, not ready.
        assert answers(f"{endpoint}/v2/health/live")
        assert httpx.get(f"{endpoint}/v2/health/ready", timeout=5).status_code == 503

        triggered = subprocess.run(
            [bin_dir / "onnxflow", "trigger", "--framework", "sklearn", "--wait"],
            env={
                **env,
                "ONNXFLOW_STACK_HOST": "127.0.0.1",
                "ONNXFLOW_STACK_PREFECT_PORT": str(prefect_port),
                "ONNXFLOW_STACK_MLFLOW_PORT": str(mlflow_port),
                "ONNXFLOW_STACK_ENDPOINT_PORTS": f"[{endpoint_port}]",
                "ONNXFLOW_STACK_STATE_DIR": str(tmp_path / "no-local-stack"),
            },
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert triggered.returncode == 0, triggered.stdout[-3000:] + triggered.stderr[-3000:]
        assert "finished COMPLETED" in triggered.stdout
        assert f"{endpoint} serves digits v1" in triggered.stdout

        client = triton.InferenceServerClient(f"127.0.0.1:{endpoint_port}")
        assert client.is_model_ready("digits")
        from sklearn.datasets import load_digits

        digits = load_digits()
        features = triton.InferInput("features", [100, 64], "FP32")
        features.set_data_from_numpy(digits.data[:100].astype(np.float32), binary_data=True)
        result = client.infer("digits", [features])
        assert result.get_response()["model_version"] == "1"
        accuracy = (result.as_numpy("probabilities").argmax(1) == digits.target[:100]).mean()
        assert accuracy > 0.8, accuracy
    finally:
        logs = engine("ps", "-a", "--filter", f"label=com.docker.compose.project={project}")
        print(logs.stdout)
        subprocess.run(
            [bin_dir / "podman-compose", "-f", "infra/docker-compose.yml", "down", "-v"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=300,
        )
    assert in_project("container") == [] and in_project("volume") == []

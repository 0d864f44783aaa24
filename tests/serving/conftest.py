"""Real endpoint processes against a real SQLite MLflow registry, talked to over HTTP.

One registry per session (with its own artifact root) holds three registered models;
four endpoint processes serve them, started together so the session pays one start-up:

* ``digits``: a 64->128->10 MLP, no token (protocol and bad-input tests), reading the
  registry through a real ``mlflow server`` (the production set-up: REST, no MLflow in
  the endpoint process);
* ``multi``: seven inputs and outputs of seven datatypes;
* ``batchy``: ``digits`` again, with dynamic batching on;
* ``reloady``: versions that the tests move ``champion`` between, with a token and a
  fast watcher (auth, admin, reload, refusal).

The pytest process never sets the tracking URI globally: registry calls happen inside
:meth:`Registry.active`, and endpoints get the URI in their environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from onnxflow.mlflow_servers import start_tracking_server
from onnxflow.processes import free_port, log_tail
from onnxflow.serving.launcher import start_background, stop_background, wait_ready
from onnxflow.serving.settings import ServingSettings
from tests.serving import models

TOKEN = "test-token-0123456789"


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.experiment_id: str | None = None

    @contextlib.contextmanager
    def active(self):
        """Point MLflow (this process) at the test registry for the duration."""
        import mlflow

        with pytest.MonkeyPatch.context() as patch:  # the variables are restored after
            patch.setenv("MLFLOW_TRACKING_URI", self.uri)
            mlflow.set_tracking_uri(self.uri)
            if self.experiment_id is None:
                self.experiment_id = mlflow.MlflowClient().create_experiment(
                    "serving-tests", artifact_location=str(self.root / "artifacts")
                )
            patch.setenv("MLFLOW_EXPERIMENT_ID", self.experiment_id)
            try:
                yield
            finally:
                mlflow.set_tracking_uri(None)

    def register(self, name: str, model_path: Path, example, aliases=("champion",)) -> str:
        from onnxflow.registration import register_onnx

        with self.active():
            version = register_onnx(
                model_path,
                model_name=name,
                input_example=example,
                tags={"source_framework": "onnx-helper"},
                aliases=aliases,
            )
        return version.version

    def set_alias(self, name: str, alias: str, version: str) -> None:
        from onnxflow.registration import set_alias

        with self.active():
            set_alias(name, alias, version)

    def stored_folder(self, name: str, version: str) -> Path:
        from mlflow import MlflowClient

        with self.active():
            uri = MlflowClient().get_model_version_download_uri(name, version)
        return Path(uri.removeprefix("file://"))


@dataclass
class Endpoint:
    url: str
    name: str
    state_dir: Path
    token: str | None = None
    grpc: str | None = None

    def client(self, **kwargs) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def log(self) -> str:
        return log_tail(self.state_dir / "endpoint.log", 200)


@contextlib.contextmanager
def serving(registry: Registry | str, root: Path, name: str, **options) -> Iterator[Endpoint]:
    """One endpoint process over the test registry (or another tracking URI), REST and gRPC
    on free ports, state in ``root``, ready, until the block ends; ``options`` are
    :class:`ServingSettings` fields, ``name`` the model the :class:`Endpoint` talks to."""
    uri = registry if isinstance(registry, str) else registry.uri
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # the endpoint inherits it
        settings = ServingSettings(
            port=free_port(), grpc_port=free_port(), cache_dir=root / "cache", **options
        )
        info = start_background(settings, root)
    try:
        wait_ready(info, timeout_s=240)  # a busy 2-core machine: start-up is slow
        yield Endpoint(
            info.url, name, root, options.get("token"), f"127.0.0.1:{settings.grpc_port}"
        )
    finally:
        stop_background(root)


def _example(rows: int = 1, n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, n)).astype(np.float32)


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Registry:
    registry = Registry(tmp_path_factory.mktemp("serving-registry"))
    with registry.active():  # creates the store, before a tracking server opens it too
        pass
    return registry


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving-models")
    return {
        "mlp": models.mlp(root / "mlp" / "model.onnx", seed=0),
        "mlp_v2": models.mlp(root / "mlp2" / "model.onnx", seed=1),
        "mlp_v3": models.mlp(root / "mlp3" / "model.onnx", seed=2),
        "multi": models.multi_io(root / "multi" / "model.onnx"),
    }


@pytest.fixture(scope="session")
def registered(registry, model_files) -> dict[str, str]:
    """Versions: digits 1, multi 1, reloady 1 (champion) and 2 (challenger)."""
    return {
        "digits": registry.register("digits", model_files["mlp"], _example()),
        "multi": registry.register("multi", model_files["multi"], models.multi_example()),
        "reloady_1": registry.register("reloady", model_files["mlp"], _example()),
        "reloady_2": registry.register(
            "reloady", model_files["mlp_v2"], _example(), aliases=("challenger",)
        ),
    }


@contextlib.contextmanager
def tracking_server(registry: Registry, log_path: Path, port: int | None = None):
    """``mlflow server`` on the test registry; yields its URL (ready or not yet).

    ``port``: a fixed one, to restart a killed server where its clients look for it."""
    port = port or free_port()
    # proxied artifacts (runs of experiments created through the server) stay beside its
    # log, not in ./mlartifacts of the working directory
    artifacts = str(log_path.parent / "mlartifacts")
    proc = start_tracking_server(registry.uri, port, log_path, "--artifacts-destination", artifacts)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have killed it already
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(registry, tmp_path_factory) -> str:
    """URL of an ``mlflow server`` on the test registry (it boots while models register)."""
    log_path = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    with tracking_server(registry, log_path) as url:
        yield url


@pytest.fixture(scope="session")
def endpoints(registry, mlflow_server, registered, tmp_path_factory) -> dict[str, Endpoint]:
    """Start all endpoint processes at once, wait for each, stop them at the end."""
    yield from _endpoints(registry, tmp_path_factory.mktemp("endpoints"), mlflow_server)


def _endpoints(registry: Registry, root: Path, server_url: str):
    cache = root / "cache"
    specs = {
        "digits": dict(model="digits@champion", tracking_uri=server_url),
        "multi": dict(model="multi@champion"),
        "batchy": dict(
            model="digits@champion", max_batch_size=32, max_batch_delay_ms=20, inference_threads=1
        ),
        "reloady": dict(model="reloady@champion", token=TOKEN, poll_interval_s=0.5),
    }
    started = {}
    with pytest.MonkeyPatch.context() as patch:
        for key, options in specs.items():  # endpoint processes inherit the tracking URI
            patch.setenv("MLFLOW_TRACKING_URI", options.pop("tracking_uri", registry.uri))
            settings = ServingSettings(
                port=free_port(), cache_dir=cache, log_level="info", **options
            )
            info = start_background(settings, root / key)
            started[key] = (
                info,
                Endpoint(
                    info.url, options["model"].split("@")[0], root / key, options.get("token")
                ),
            )
    try:
        for info, _ in started.values():
            wait_ready(info, timeout_s=240)  # a busy 2-core machine: mlflow server boots slowly
        yield {key: endpoint for key, (_, endpoint) in started.items()}
    finally:
        for _, endpoint in started.values():
            stop_background(endpoint.state_dir)


def _endpoint_fixture(key: str):
    """A session fixture named ``key``: that one of :func:`endpoints`."""

    @pytest.fixture(scope="session", name=key)
    def endpoint(endpoints) -> Endpoint:
        return endpoints[key]

    return endpoint


digits = _endpoint_fixture("digits")
multi = _endpoint_fixture("multi")
batchy = _endpoint_fixture("batchy")
reloady = _endpoint_fixture("reloady")


@pytest.fixture(scope="session")
def local_session(model_files):
    """onnxruntime on the same files, to compare the endpoint's answers with."""
    import onnxruntime as ort

    def make(key: str):
        return ort.InferenceSession(str(model_files[key]), providers=["CPUExecutionProvider"])

    return make


def answers(url: str) -> bool:
    """True when a GET of ``url`` answers 200 (a server's health or ping route)."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def corrupt_stored_model(folder: Path) -> None:
    """Flip one byte of the largest stored model file (weights), keeping its size."""
    files = [p for p in folder.iterdir() if p.name.startswith("model.onnx")]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst

"""Triton's clients against one real ``onnxflow serve`` process: system shared memory over
REST and gRPC through ``tritonclient``, the extensions listed, the unknown-model wording,
and Triton's own example scripts (``simple_*_client.py``) run unmodified as subprocesses.

The process serves Triton's example models ``simple``, ``simple_string`` and
``simple_identity`` (built with onnx.helper, in a registry of this module's own) with
REST, gRPC and ``--shared-memory``; no token, as Triton's example clients send none. The
model-control scripts each get a process of their own serving exactly as many models as
they count in Triton's test repository (7 over HTTP, 8 over gRPC).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from onnxflow.processes import free_port, log_tail
from tests.serving import models
from tests.serving.conftest import Registry, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRITON_MODELS = ("simple", "simple_string", "simple_identity")


class TritonServer:
    def __init__(self, port: int, grpc_port: int, log_path: Path) -> None:
        self.http = f"127.0.0.1:{port}"
        self.url = f"http://{self.http}"
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.log_path = log_path

    def log(self) -> str:
        return log_tail(self.log_path, 100)


def _onnxflow() -> list[str]:
    found = shutil.which("onnxflow", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-c", "from onnxflow.cli import main; main()"]


# Triton's model-control examples count the models of Triton's own test repository (7 over
# HTTP, 8 over gRPC): their servers serve that many, Triton's three plus small extras.
EXTRA_MODELS = tuple(f"extra_{i}" for i in range(5))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """``serve(names)``: an `onnxflow serve --model NAME@champion ... --grpc-port G
    --shared-memory` process serving exactly ``names``, one per set of names."""
    root = tmp_path_factory.mktemp("triton-examples")
    registry = Registry(root / "registry")
    examples = models.triton_examples()
    for name in TRITON_MODELS:
        path = getattr(models, f"triton_{name}")(root / "models" / name / "model.onnx")
        registry.register(name, path, examples[name])
    running: dict[tuple[str, ...], tuple[subprocess.Popen, TritonServer]] = {}

    def serve(names: tuple[str, ...]) -> TritonServer:
        if names in running:
            return running[names][1]
        for name in names:
            if name in EXTRA_MODELS and not (root / "models" / name).exists():
                path = models.triton_simple_identity(root / "models" / name / "model.onnx")
                registry.register(name, path, examples["simple_identity"])
        process, server = _start_server(registry, root / f"serve-{len(running)}", names)
        running[names] = (process, server)
        return server

    try:
        yield serve
    finally:
        for process, _ in running.values():
            process.send_signal(signal.SIGTERM)
        for process, _ in running.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _start_server(registry: Registry, root: Path, names: tuple[str, ...]):
    root.mkdir(parents=True)
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXFLOW_SERVE_")}
    env.update(
        MLFLOW_TRACKING_URI=registry.uri,
        ONNXFLOW_SERVE_CACHE_DIR=str(root / "cache"),
        ONNXFLOW_SERVE_POLL_INTERVAL_S="0",
    )
    argv = [*_onnxflow(), "serve", "--port", str(port), "--grpc-port", str(grpc_port)]
    argv += [arg for name in names for arg in ("--model", f"{name}@champion")]
    log_path = root / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*argv, "--shared-memory"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    running = TritonServer(port, grpc_port, log_path)

    def ready() -> bool:
        assert process.poll() is None, f"onnxflow serve exited:\n{running.log()}"
        try:
            return httpx.get(f"{running.url}/v2/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=180, interval=0.2)
    except BaseException:
        process.kill()
        process.wait(10)
        raise
    return process, running


@pytest.fixture(scope="module")
def server(servers) -> TritonServer:
    """The process serving Triton's three example models."""
    return servers(TRITON_MODELS)


def _region(name: str, key: str, arrays: list[np.ndarray], size: int):
    import tritonclient.utils.shared_memory as shm

    handle = shm.create_shared_memory_region(name, key, size)
    offset = 0
    for arr in arrays:
        shm.set_shared_memory_region(handle, [arr], offset=offset)
        offset += arr.nbytes
    return handle


def test_extensions_and_unknown_model_wording(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    metadata = httpx.get(f"{server.url}/v2").json()
    assert "system_shared_memory" in metadata["extensions"]
    assert "cuda_shared_memory" not in metadata["extensions"]
    grpc = grpcclient.InferenceServerClient(server.grpc)
    assert "system_shared_memory" in grpc.get_server_metadata().extensions
    http = httpclient.InferenceServerClient(server.http)
    a = np.zeros((1, 16), np.int32)
    for call in (
        lambda: http.get_model_metadata("wrong_model_name"),
        lambda: http.infer("wrong_model_name", models.simple_inputs(httpclient, a, a)),
        lambda: grpc.get_model_metadata("wrong_model_name"),
        lambda: grpc.infer("wrong_model_name", models.simple_inputs(grpcclient, a, a)),
    ):
        with pytest.raises(InferenceServerException) as unknown:
            call()
        assert unknown.value.message().startswith("Request for unknown model"), unknown.value


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_system_shared_memory_inputs_and_outputs(server, protocol):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http if protocol == "http" else server.grpc)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 5, dtype=np.int32)
    key = f"/onnxflow-test-{protocol}-{os.getpid()}"
    inputs_handle = _region("in", key + "-in", [a, b], 128)
    outputs_handle = shm.create_shared_memory_region("out", key + "-out", 256)
    try:
        client.register_system_shared_memory(f"{protocol}-in", key + "-in", 128)
        client.register_system_shared_memory(f"{protocol}-out", key + "-out", 192, offset=64)
        status = client.get_system_shared_memory_status(f"{protocol}-out")
        if protocol == "grpc":
            status = [
                {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                for r in status.regions.values()
            ]
        assert status == [
            {"name": f"{protocol}-out", "key": key + "-out", "offset": 64, "byte_size": 192}
        ]
        inputs = [module.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        inputs[0].set_shared_memory(f"{protocol}-in", 64)
        inputs[1].set_shared_memory(f"{protocol}-in", 64, offset=64)
        outputs = [module.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
        outputs[0].set_shared_memory(f"{protocol}-out", 64, offset=64)  # OUTPUT1 travels back
        result = client.infer("simple", inputs, outputs=outputs)
        # OUTPUT0 was written at region offset 64 + 64, its data left out of the response
        written = shm.get_contents_as_numpy(outputs_handle, np.int32, [1, 16], offset=128)
        np.testing.assert_array_equal(written, a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        output0 = result.get_output("OUTPUT0")
        params = output0["parameters"] if protocol == "http" else output0.parameters
        region = params["shared_memory_region"]
        assert (region if protocol == "http" else region.string_param) == f"{protocol}-out"
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(inputs_handle)
        shm.destroy_shared_memory_region(outputs_handle)
    status = client.get_system_shared_memory_status()
    assert (status if protocol == "http" else list(status.regions)) == []


def test_shared_memory_errors_name_the_problem(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(server.http)
    grpc = grpcclient.InferenceServerClient(server.grpc)
    key = f"/onnxflow-test-errors-{os.getpid()}"
    handle = _region("e", key, [np.zeros((1, 16), np.int32)], 64)
    try:
        with pytest.raises(InferenceServerException, match="runs past the 64 bytes"):
            http.register_system_shared_memory("too-big", key, 128)
        with pytest.raises(InferenceServerException, match="no shared-memory object"):
            grpc.register_system_shared_memory("missing", "/onnxflow-no-such-object", 64)
        with pytest.raises(InferenceServerException, match="not a POSIX shared-memory object"):
            http.register_system_shared_memory("escape", "/../../etc/passwd", 8)
        http.register_system_shared_memory("e", key, 64)
        with pytest.raises(InferenceServerException, match="already registered"):
            grpc.register_system_shared_memory("e", key, 64)
        for module, client in ((httpclient, http), (grpcclient, grpc)):
            past = [module.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            past[0].set_shared_memory("e", 64, offset=32)
            past[1].set_shared_memory("e", 64)
            with pytest.raises(InferenceServerException, match="runs past region 'e' of 64"):
                client.infer("simple", past)
            short = [module.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            short[0].set_shared_memory("e", 32)
            short[1].set_shared_memory("e", 64)
            with pytest.raises(InferenceServerException, match="needs 64 bytes"):
                client.infer("simple", short)
            unknown = [module.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            for tensor in unknown:
                tensor.set_shared_memory("nope", 64)
            with pytest.raises(InferenceServerException, match="'nope' is not registered"):
                client.infer("simple", unknown)
            small = models.simple_inputs(
                module, np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32)
            )
            out = module.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("e", 16)
            with pytest.raises(InferenceServerException, match="more than its shared_memory"):
                client.infer("simple", small, outputs=[out])
            # CUDA shared memory: nothing to clear succeeds, registering is refused
            client.unregister_cuda_shared_memory()
            with pytest.raises(InferenceServerException, match="CUDA shared memory is not"):
                client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 64)
        assert http.is_server_live() and grpc.is_server_live()
    finally:
        http.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)


# --- Triton's own example clients, unmodified ----------------------------------------------

EXAMPLES_DIR = Path(
    os.environ.get("ONNXFLOW_TRITON_EXAMPLES", Path(__file__).parent / "triton_examples")
)

# script -> (protocol, the line it prints on success or None if it prints none)
EXAMPLES = {
    "simple_http_infer_client.py": ("http", None),
    "simple_http_async_infer_client.py": ("http", None),
    "simple_http_string_infer_client.py": ("http", "PASS: string"),
    "simple_http_health_metadata.py": ("http", None),
    "simple_http_model_control.py": ("http", "PASS: model control"),
    "simple_http_shm_client.py": ("http", "PASS: system shared memory"),
    "simple_grpc_infer_client.py": ("grpc", "PASS: infer"),
    "simple_grpc_string_infer_client.py": ("grpc", "PASS: string"),
    "simple_grpc_health_metadata.py": ("grpc", None),
    "simple_grpc_model_control.py": ("grpc", "PASS: model control"),
    "simple_grpc_shm_client.py": ("grpc", "PASS: system shared memory"),
}
# The model-control clients first count the models of Triton's test repository.
MODELS = {
    "simple_http_model_control.py": TRITON_MODELS + EXTRA_MODELS[:4],  # 7
    "simple_grpc_model_control.py": TRITON_MODELS + EXTRA_MODELS,  # 8
}
# Clients that cannot pass against this server: why, and what they print where they stop
# (checked, so a client stopping anywhere else still fails the test).
CANNOT_PASS = {
    "simple_http_health_metadata.py": (
        "checks that the server's name is 'triton' (GET /v2 says 'onnxflow')",
        "FAILED : get_server_metadata",
    ),
    "simple_grpc_health_metadata.py": (
        "checks that the server's name is 'triton' (ServerMetadata says 'onnxflow')",
        "FAILED : get_server_metadata",
    ),
    # Passes the index count, load, the config override and unload; then looks for
    # "Invalid file path" in e.status(), which tritonclient fills with the gRPC code
    # (str(rpc_error.code())), never the message, whatever the server answers. The
    # message is checked in tests/serving/test_model_config.py.
    "simple_grpc_model_control.py": (
        "looks for the error message in the status code of a refused load",
        "FAILED: expected 'Invalid file path' for oversized file path; "
        "got 'StatusCode.INVALID_ARGUMENT'",
    ),
}


# Triton's scripts are not in this repository (see triton_examples/README.md): these run
# only when asked for (`make triton-examples TRITON_EXAMPLES=DIR`), and then a missing
# script fails rather than skips.
@pytest.mark.triton_examples
@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_triton_example_client(servers, script):
    path = EXAMPLES_DIR / script
    assert path.exists(), f"{script} is not in {EXAMPLES_DIR} (see triton_examples/README.md)"
    protocol, pass_line = EXAMPLES[script]
    server = servers(MODELS.get(script, TRITON_MODELS))
    url = server.http if protocol == "http" else server.grpc
    done = subprocess.run(
        [sys.executable, str(path), "-u", url], capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    if script in CANNOT_PASS:
        reason, failure = CANNOT_PASS[script]
        assert done.returncode == 1, (reason, output)
        assert done.stdout.strip() == failure if not failure else failure in done.stdout, output
        assert "PASS" not in done.stdout
        return
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{output}\n{server.log()}"
    if pass_line is not None:
        assert pass_line in done.stdout, output

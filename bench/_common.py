"""What the benchmark scripts share: MLflow's tracking server for a run, waiting on an HTTP
endpoint, stopping a process group, timing a command, client threads run at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

sys.path.insert(0, str(ROOT))

from onnxflow.mlflow_servers import start_tracking_server as _start_server  # noqa: E402
from onnxflow.processes import free_port  # noqa: E402


def run_threads(work: Callable[[int], None], n: int) -> float:
    """Run ``work(0)`` ... ``work(n - 1)`` in ``n`` threads at once; the seconds until the
    last one ends."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> float:
    """Seconds until ``url`` answers 200; fails early if ``proc`` exits."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def start_tracking_server(
    work: Path, *options: str, timeout: float = 120, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on ``work/mlflow.db`` (``options``: where artifacts go), ready;
    its log in ``work/mlflow-server.log``. Stopped if it never gets ready."""
    port = free_port()
    proc = _start_server(
        f"sqlite:///{work / 'mlflow.db'}", port, work / "mlflow-server.log", *options, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout, proc)
    except BaseException:  # never leave a server behind
        stop_group(proc)
        raise
    return proc, url


def timed_run(cmd: list[str], cwd: Path, env: Mapping[str, str]) -> tuple[float, str]:
    """Run ``cmd``; (wall seconds, its stdout). Exits with its output if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def register_mlp(
    folder: Path,
    name: str,
    seed: int,
    example,
    alias: str = "champion",
    sizes: tuple[int, ...] = (64, 128, 10),
) -> str:
    """An MLP (``tests.serving.models.mlp``, 64 features unless ``sizes`` says) written in
    ``folder`` and registered as NAME@ALIAS in the current tracking store; its version."""
    from onnxflow.registration import register_onnx
    from tests.serving.models import mlp

    version = register_onnx(
        mlp(folder / "model.onnx", sizes=sizes, seed=seed),
        model_name=name,
        input_example=example,
        tags={"source_framework": "bench"},
        aliases=(alias,),
    )
    return version.version

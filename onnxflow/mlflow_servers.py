"""MLflow's own servers as child processes: ``mlflow server`` (a registry over HTTP) and
``mlflow models serve`` (MLflow's scoring server), as tests and benchmarks start them.

Each runs this interpreter's MLflow on 127.0.0.1 in a session of its own (stop it with its
process group: ``mlflow server`` starts workers), its output appended to a log file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from onnxflow.processes import listen_options, python_module


def start_mlflow(
    args: list[str], port: int, log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """``python -m mlflow ARGS --host 127.0.0.1 --port PORT``; ``env`` on top of this
    process's environment, this interpreter's folder first on PATH (MLflow starts its
    workers by name)."""
    bin_dir = Path(sys.executable).parent
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **(env or {})}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            python_module("mlflow", *args, *listen_options("127.0.0.1", port)),
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_tracking_server(
    backend_store_uri: str,
    port: int,
    log_path: Path,
    *options: str,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """``mlflow server`` with one worker on ``backend_store_uri``; ``options`` such as
    ``--artifacts-destination DIR``. Ready when ``/health`` answers."""
    args = ["server", "--backend-store-uri", backend_store_uri, *options, "--workers", "1"]
    return start_mlflow(args, port, log_path, env)


def start_scoring_server(
    model_uri: str, port: int, log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """``mlflow models serve`` of ``model_uri`` in this environment (``--env-manager
    local``). Ready when ``/ping`` answers."""
    return start_mlflow(
        ["models", "serve", "-m", model_uri, "--env-manager", "local"], port, log_path, env
    )

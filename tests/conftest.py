"""Shared fixtures: a real MLflow store per test, tiny real ONNX models.

Creating an MLflow SQLite store runs all its migrations (about a second), so one
migrated database is made per session and copied into each test's own folder.

An interrupted run leaves nothing behind: SIGTERM (a CI timeout, ``kill``) unwinds the
session like Ctrl-C, so every fixture stops the servers it started; when the run was
started by ``make``, it also stops when make is killed; and whatever a test started and
did not stop is stopped when the session ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

# MLflow servers the tests start need no job runner (it would start a dozen processes).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def pytest_configure(config) -> None:
    from onnxflow.processes import interrupt_on_sigterm, stop_with_make

    interrupt_on_sigterm()
    stop_with_make()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session) -> None:
    """After every fixture's teardown: stop what a test started and left running."""
    from onnxflow.processes import ProcessRecord, process_tree, stop_process

    leftovers = process_tree(os.getpid())[1:]
    children = [
        (pid, ticks)
        for pid, ticks in leftovers
        if _parent(pid) == os.getpid() and not any(helper in _cmdline(pid) for helper in _HELPERS)
    ]
    for pid, ticks in children:
        print(f"\nstopping pid {pid}, left running by a test: {_cmdline(pid)}")
        stop_process(
            ProcessRecord(name=f"leftover {pid}", pid=pid, start_ticks=ticks, argv=[], log_path=""),
            timeout_s=10,
        )


#: Python's own helper processes, which end with the interpreter.
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "loky")


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


@pytest.fixture(scope="session")
def _migrated_db(tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, _migrated_db) -> str:
    """A fresh SQLite tracking store and artifact root inside this test's tmp_path."""
    import mlflow

    shutil.copyfile(_migrated_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default artifact root ./mlruns lands here
    mlflow.set_tracking_uri(uri)
    yield uri
    leaked = mlflow.active_run()
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    assert leaked is None, f"test leaked an active MLflow run: {leaked.info.run_id}"


def run_onnxflow(
    *args: str, cwd: Path, env: Mapping[str, str], timeout_s: float = 300
) -> subprocess.CompletedProcess:
    """``onnxflow ARGS`` in a process of its own (this interpreter), output captured; the
    caller checks the return code."""
    return subprocess.run(
        [sys.executable, "-m", "onnxflow.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def make_linear_onnx(
    path: Path, n_in: int = 64, n_out: int = 10, seed: int = 0, external_data: bool = False
) -> Path:
    """A real softmax-regression model: features[batch, n_in] -> probabilities[batch, n_out]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    W = numpy_helper.from_array(rng.normal(size=(n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(n_out,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_out])],
        [W, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return save_checked_onnx(model, path, external_data, f"{path.name}.data")


def save_checked_onnx(model, path: Path, external_data: bool, location: str) -> Path:
    """Check ``model`` (IR version 9) and save it at ``path``, its weights in ``location``
    beside it with ``external_data``."""
    import onnx

    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external_data,
        location=location,
        size_threshold=0,
    )
    return path


def validation_summary(report_dir: Path, **figures):
    """The ValidationSummary of a model that passed an accuracy check (no parity gap), with
    ``figures`` in place of the ones a test is about."""
    from onnxflow.results import ValidationSummary

    passed = dict(passed=True, metric_name="accuracy", framework_metric=0.9, onnx_metric=0.9)
    model = dict(latency_ms={}, opset=18, ir_version=9, model_bytes=1)
    parity = dict(parity_max_abs=0.0, parity_max_rel=0.0)
    return ValidationSummary(report_dir=report_dir, **{**passed, **parity, **model, **figures})


def point_external_data(path: Path, location: str) -> None:
    """Rewrite the ONNX file at ``path`` so that its weights are read from ``location``
    (relative to its folder), wherever they are."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, str(path))


@pytest.fixture
def linear_onnx(tmp_path) -> Path:
    return make_linear_onnx(tmp_path / "linear" / "model.onnx")

"""The interop commands as a user runs them: real processes, a temporary SQLite store."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np

from tests.conftest import make_linear_onnx
from tests.test_cli import ONNXFLOW


def cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    return subprocess.run(
        [*ONNXFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _versions(cwd: Path, name: str) -> list[tuple[str, int]]:
    db = cwd / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT name, version FROM model_versions WHERE name = ?", (name,)
        ).fetchall()


def test_import_model_registers_an_onnx_model_and_convert_takes_it_back(tmp_path):
    make_linear_onnx(tmp_path / "linear" / "model.onnx", n_in=4, n_out=3)
    np.savez(
        tmp_path / "x.npz", features=np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    )

    out = cli(
        "import-model", "linear/model.onnx", "--name", "byom", "--sample", "x.npz", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "linear/model.onnx: onnx" in out.stdout
    assert "byom v1 is challenger" in out.stdout
    assert _versions(tmp_path, "byom") == [("byom", 1)]

    out = cli("convert", "models:/byom@challenger", "--to", "torch", "--out", "torch", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "✓ probabilities: max abs diff" in out.stdout
    assert "(torch_export, dynamic batch)" in out.stdout
    assert (tmp_path / "torch" / "model.pt2").is_file()


def test_import_model_refuses_a_broken_file_and_registers_nothing(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07 this is not a model")
    np.savez(tmp_path / "x.npz", features=np.zeros((2, 4), np.float32))

    out = cli("import-model", "model.onnx", "--name", "byom", "--sample", "x.npz", cwd=tmp_path)
    assert out.returncode != 0
    assert "error: model.onnx is not a model file onnxflow knows" in out.stderr
    assert _versions(tmp_path, "byom") == []


def test_convert_refuses_a_file_that_is_not_onnx(tmp_path):
    np.savez(tmp_path / "x.npz", features=np.zeros((2, 4), np.float32))
    out = cli("convert", "x.npz", "--sample", "x.npz", cwd=tmp_path)
    assert out.returncode == 1 and "error: Cannot convert x.npz" in out.stderr


def _run_table(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if "│" in line or "|" in line]


def test_run_all_registers_torch_keras_and_sklearn(tmp_path):
    """About 35 s: the three frameworks' real training, export and registration."""
    out = cli("run", "--framework", "all", "--epochs", "2", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_versions(tmp_path, "digits")) == 3
    table = "\n".join(_run_table(out.stdout))
    for framework in ("torch", "keras", "sklearn"):
        assert framework in table, out.stdout

"""The command line, run as a user runs it: a real process, a real (temporary) store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ONNXFLOW = [sys.executable, "-m", "onnxflow.cli"]


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", **(env or {})}
    return subprocess.run(
        [*ONNXFLOW, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_commands(tmp_path):
    out = cli("--help", cwd=tmp_path)
    assert out.returncode == 0
    for command in ("run", "models", "promote"):
        assert command in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing.csv", "--target", "y"], "Data file not found: missing.csv"),
        (["--target", "y"], "without --data"),
        (["--framework", "jax"], "jax"),
        (["--sweep", "8", "--framework", "all"], "--sweep trains one framework"),
        (["--sweep", "0"], "greater than or equal to 1"),
        (["--sweep", "4", "--recipe", "r.py"], "Recipe file not found: r.py"),
        (["--train-workers", "0"], "Invalid value for '--train-workers'"),
        (["--train-workers", "2"], "the built-in models train in one process"),
        (["--recipe", "r.py", "--train-workers", "2", "--train-rdzv", "h"], "is not HOST:PORT"),
        (["--recipe", "r.py", "--train-nodes", "2"], "set train.rdzv (--train-rdzv HOST:PORT)"),
    ],
)
def test_run_refuses_bad_input_before_training(tmp_path, args, message):
    out = cli("run", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert not (tmp_path / "mlflow.db").exists(), "nothing was tracked for a refused run"


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--port", "8081", "--port=8082"], "'--port': given more than once"),
        (["run", "--framework", "torch", "--framework", "keras"], "'--framework': given more than"),
        (["serve", "--model", "a@champion", "--model", "a/3"], "'a' given more than once"),
        (["serve", "--all-models", "x@champion"], "takes one alias name"),
    ],
)
def test_a_repeated_option_is_refused_never_dropped(tmp_path, args, message):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode != 0, out.stdout + out.stderr
    assert message in out.stderr, out.stderr


def test_run_refuses_an_invalid_config_file(tmp_path):
    (tmp_path / "cfg.yaml").write_text("train: {epochs: 0, colour: red}\n")
    out = cli("run", "--config", "cfg.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert "train.epochs" in out.stderr and "train.colour" in out.stderr


def test_promote_and_models_name_what_is_missing(tmp_path):
    out = cli("promote", "digits", "3", cwd=tmp_path)
    assert out.returncode == 1 and "no version 3" in out.stderr
    out = cli("models", "nope", cwd=tmp_path)
    assert out.returncode == 1 and "no registered model 'nope'" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--port", "8081", "--port=8082"], "Invalid value for '--port': given more"),
        (["serve", "--token", "abcdefgh1", "--token", "abcdefgh2"], "'--token': given more"),
        (["run", "--deploy", "--no-deploy"], "Invalid value for '--no-deploy': given more"),
        (
            ["serve", "--model", "digits@champion", "--model", "digits@challenger"],
            "'digits' given more than once",
        ),
    ],
)
def test_an_option_that_cannot_be_honoured_is_an_error(tmp_path, args, message):
    """Click keeps the last value of a repeated option: refused instead, before anything
    starts (`serve --model` repeats on purpose: one endpoint, several models, each once)."""
    out = cli(*args, cwd=tmp_path)
    assert out.returncode != 0, out.stdout + out.stderr
    assert message in out.stderr, out.stderr
    assert not (tmp_path / "mlflow.db").exists()

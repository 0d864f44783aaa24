"""A new user's first runs, as they happen: a fresh Prefect home, a busy machine, two
projects at once, mistakes, and Ctrl-C. Real processes, a real Prefect server, real stores.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from onnxflow.processes import free_port, is_alive, process_tree
from tests.conftest import make_linear_onnx, run_onnxflow

ONNXFLOW = [sys.executable, "-m", "onnxflow.cli"]
#: Long enough to cover a first start (migration, server start-up), which is where it failed.
BUSY_S = 60
BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def project(folder: Path, mlflow_db: Path | None = None) -> Path:
    """A project folder with a tiny ONNX model and a sample to import (and a copy of a
    migrated MLflow store: migrating one is not what these tests are about)."""
    folder.mkdir(parents=True, exist_ok=True)
    if mlflow_db is not None:
        shutil.copyfile(mlflow_db, folder / "mlflow.db")
    make_linear_onnx(folder / "linear" / "model.onnx", n_in=4, n_out=3)
    np.savez(
        folder / "x.npz", features=np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    )
    return folder


def onnxflow_env(folder: Path, prefect_home: Path, **extra: str) -> dict[str, str]:
    """A user's environment with no Prefect configured: only a fresh PREFECT_HOME."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "ONNXFLOW_", "MLFLOW_"))
    }
    return {
        **env,
        "PREFECT_HOME": str(prefect_home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
        # no server another run on this machine left at the stack's address
        "ONNXFLOW_PREFECT_SERVER": "temporary",
        **extra,
    }


def import_model(folder: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*ONNXFLOW, "import-model", "linear/model.onnx", "--name", "byom", "--sample", "x.npz"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def versions(folder: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(folder / "mlflow.db") as conn:
        return conn.execute("SELECT name, version FROM model_versions").fetchall()


@pytest.fixture
def busy_cpu():
    """Every core kept busy (two loops per core, at least two) for BUSY_S seconds;
    the loops are killed when the test ends, whatever happened."""
    loops = [
        subprocess.Popen(
            [sys.executable, "-c", BUSY_LOOP.format(seconds=BUSY_S)], start_new_session=True
        )
        for _ in range(max(2, 2 * (os.cpu_count() or 1)))
    ]
    yield loops
    for loop in loops:
        os.killpg(loop.pid, signal.SIGKILL)
        loop.wait()


def test_first_flow_run_on_a_busy_machine_with_an_empty_prefect_home(
    tmp_path,
    busy_cpu,
    _migrated_db,
):
    """Issue 9's failure: Prefect's temporary server timed out (20 s) migrating a new
    database on a busy machine. Prefect's start-up timeout is left at its default here."""
    folder = project(tmp_path / "project", _migrated_db)
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir()
    started = time.monotonic()
    run = import_model(folder, onnxflow_env(folder, prefect_home))
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-4000:]
    assert "byom v1 is challenger" in out
    assert "Prefect: starting a temporary server" in out
    assert versions(folder) == [("byom", 1)]
    assert (prefect_home / "prefect.db").is_file()
    print(f"first run on a busy machine: {time.monotonic() - started:.1f} s")


def test_two_projects_run_flows_at_the_same_time(tmp_path, _migrated_db):
    """Two clones, one Prefect home (the default ~/.prefect is shared), started together
    on a database that does not exist yet: both finish, each in its own store."""
    prefect_home = tmp_path / "prefect-home"
    folders = [project(tmp_path / name, _migrated_db) for name in ("one", "two")]
    runs = [import_model(folder, onnxflow_env(folder, prefect_home)) for folder in folders]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, out in zip(runs, outputs):
        assert run.returncode == 0, out[-4000:]
    for folder in folders:
        assert versions(folder) == [("byom", 1)]
    assert sum("preparing its database" in out for out in outputs) == 1, (
        "the database is migrated once, by whichever run took the lock first"
    )


BLOCKING_RECIPE = """
import time
from pathlib import Path

def load_data(config):
    Path("in-flow").touch()  # the flow runs: its server is up
    while True:  # until the command is interrupted, however fast the machine
        time.sleep(0.1)

def build_model(info):
    raise AssertionError("never reached")
"""


def test_an_interrupted_command_stops_its_temporary_prefect_server(tmp_path, _migrated_db):
    """SIGTERM while the flow runs: the command ends, and so does every process it
    started (the temporary Prefect server first of all). The flow's first task waits
    until it is interrupted, so the command cannot finish before the signal comes."""
    folder = project(tmp_path / "project", _migrated_db)
    (folder / "recipe.py").write_text(BLOCKING_RECIPE)
    run = subprocess.Popen(
        [*ONNXFLOW, "run", "--recipe", "recipe.py"],
        cwd=folder,
        env=onnxflow_env(folder, tmp_path / "prefect-home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (folder / "in-flow").exists():
        assert run.poll() is None, run.stdout.read()
        time.sleep(0.2)
    tree = process_tree(run.pid)  # the command and the server it started
    assert any("prefect.server.api.server" in _cmd(pid) for pid, _ in tree), tree
    os.kill(run.pid, signal.SIGTERM)
    out, _ = run.communicate(timeout=60)
    assert run.returncode != 0
    assert "Traceback" not in out, out[-3000:]
    _wait_gone(tree)


def test_a_recipe_failing_inside_the_flow_ends_with_one_error_line(tmp_path, _migrated_db):
    """No Prefect traceback in the terminal: the failure is said once, last, naming the
    recipe and the function; the details are in the log file it names."""
    folder = project(tmp_path / "project", _migrated_db)
    (folder / "bad.py").write_text("def build_model(info):\n    return 42\n")
    out = subprocess.run(
        [*ONNXFLOW, "run", "--recipe", "bad.py", "--epochs", "1"],
        cwd=folder,
        env=onnxflow_env(folder, tmp_path / "prefect-home"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    assert lines[-1].startswith("error: ") and "bad.py: build_model(info) returned" in lines[-1]
    first = next(i for i, line in enumerate(lines) if "build_model(info) returned" in line)
    assert len(lines) - first <= 3, "\n".join(lines[first:])
    log_file = Path(lines[-1].rsplit("(details: ", 1)[1].rstrip(")"))
    assert "Traceback" in (folder / log_file).read_text()


@pytest.mark.parametrize("killed", ["pytest", "make"])
def test_an_interrupted_test_run_stops_the_servers_its_fixtures_started(tmp_path, killed):
    """SIGTERM to pytest (a CI timeout), or SIGKILL to the ``make`` that runs it, while a
    fixture's server runs in a session of its own: the fixture's teardown runs, the server
    is gone. (make passes SIGTERM on to its recipe; nothing passes on its SIGKILL.)"""
    (tmp_path / "test_inner.py").write_text(f"""
import sys, time
from pathlib import Path
import pytest
from onnxflow.processes import start_process, stop_process

@pytest.fixture
def server():
    record = start_process("server", [sys.executable, "-m", "http.server", "--bind",
                           "127.0.0.1", "0"], {{}}, Path({str(tmp_path)!r}) / "server.log")
    yield record
    stop_process(record)

def test_waits(server):
    Path({str(tmp_path)!r}, "server.pid").write_text(str(server.pid))
    time.sleep(300)
""")
    repo = Path(__file__).resolve().parents[1]
    pytest_argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.conftest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tmp_path),
        str(tmp_path / "test_inner.py"),
    ]
    if killed == "make":  # make runs a recipe's simple command itself, without a shell
        (tmp_path / "Makefile").write_text(f"test:\n\t{' '.join(pytest_argv)}\n")
        argv = ["make", "-s", "-f", str(tmp_path / "Makefile"), "test"]
    else:
        argv = pytest_argv
    run = subprocess.Popen(
        argv,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        pid_file = tmp_path / "server.pid"
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.1)
        assert pid_file.exists(), run.communicate()[0]
        tree = process_tree(run.pid)
        assert int(pid_file.read_text()) in [pid for pid, _ in tree]
        # that one process only, not its group
        os.kill(run.pid, signal.SIGKILL if killed == "make" else signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
        assert run.returncode != 0, out
        _wait_gone(tree)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


# --- errors, not tracebacks -------------------------------------------------------------


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", **env}
    return run_onnxflow(*args, cwd=cwd, env=full)


def error_line(out: subprocess.CompletedProcess) -> str:
    """The last line on stderr, which must be the one error line."""
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), out.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, out.stderr
    return lines[-1]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_an_unreachable_prefect_server_is_named_with_what_to_do(tmp_path):
    project(tmp_path)
    url = f"{dead_url()}/api"
    out = cli(
        "import-model",
        "linear/model.onnx",
        "--name",
        "byom",
        "--sample",
        "x.npz",
        cwd=tmp_path,
        PREFECT_API_URL=url,
    )
    line = error_line(out)
    assert f"the Prefect server at {url} (PREFECT_API_URL, from the environment)" in line
    assert "unset PREFECT_API_URL" in line


def test_an_unreachable_tracking_store_is_named_with_what_to_do(tmp_path):
    url = dead_url()
    for args in (["models"], ["promote", "digits", "1"]):
        line = error_line(cli(*args, cwd=tmp_path, MLFLOW_TRACKING_URI=url))
        assert f"the MLflow tracking store at {url} (MLFLOW_TRACKING_URI) cannot be reached" in line
        assert "point MLFLOW_TRACKING_URI at a store you can reach" in line


def test_debug_shows_the_traceback(tmp_path):
    url = dead_url()
    out = cli("--debug", "models", cwd=tmp_path, MLFLOW_TRACKING_URI=url)
    assert out.returncode != 0 and "Traceback" in out.stderr
    out = cli("models", cwd=tmp_path, MLFLOW_TRACKING_URI=url, ONNXFLOW_DEBUG="1")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_a_data_file_that_does_not_exist(tmp_path):
    line = error_line(cli("run", "--data", "missing.csv", "--target", "y", cwd=tmp_path))
    assert "missing.csv" in line
    np.savez(tmp_path / "x.npz", features=np.zeros((2, 4), np.float32))
    line = error_line(
        cli("import-model", "missing.onnx", "--name", "m", "--sample", "x.npz", cwd=tmp_path)
    )
    assert "missing.onnx" in line


def test_serve_on_a_port_in_use(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        line = error_line(cli("serve", "--port", str(port), cwd=tmp_path))
    assert f"port {port} on 127.0.0.1 is already in use" in line
    assert "--port" in line


def _wait_gone(tree: list[tuple[int, int]], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(is_alive(p, t) for p, t in tree):
        time.sleep(0.1)
    left = [pid for pid, ticks in tree if is_alive(pid, ticks)]
    assert not left, f"left running: {[_cmd(pid) for pid in left]}"


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return str(pid)

"""Data-parallel training of a recipe (``train.workers``): torchrun's arguments and the
configuration, checked fast; then real worker processes (gloo on CPU) through the whole
chain, a worker killed mid-epoch, and one that hangs."""

from __future__ import annotations

import sqlite3
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from onnxflow.config import PipelineConfig, TrainConfig, rendezvous_address
from onnxflow.recipes.ddp import failure_line, torchrun_args

#: A tiny recipe on two inputs; ``KILL_RANK`` set: that worker SIGKILLs itself on its
#: second training batch (mid-epoch 1), the way the OOM killer ends a process;
#: ``HANG_RANK``: that worker stops itself there (SIGSTOP), the way a hung worker waits.
RECIPE = """
import os
import sqlite3
import signal

import torch

DEFAULTS = {"train": {"epochs": 2, "batch_size": 16}}


class Net(torch.nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.linear = torch.nn.Linear(n_in, n_out)
        self.batches = 0

    def forward(self, features):
        if self.training and os.environ.get("RANK", "-") == os.environ.get("KILL_RANK"):
            self.batches += 1
            if self.batches == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        if self.training and os.environ.get("RANK", "-") == os.environ.get("HANG_RANK"):
            self.batches += 1
            if self.batches == 2:
                os.kill(os.getpid(), signal.SIGSTOP)
        return self.linear(features)


def build_model(info):
    (features,) = info.inputs
    return Net(features.shape[0], info.n_classes)
"""


def _recipe(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ddp_recipe.py"
    path.write_text(textwrap.dedent(RECIPE))
    return path


# -- fast: configuration and torchrun's arguments -------------------------------------------


@pytest.mark.parametrize(
    "train, message",
    [
        ({"workers": 0}, "greater than or equal to 1"),
        ({"nodes": 0}, "greater than or equal to 1"),
        ({"workers": 2, "rdzv": "10.0.0.5"}, "is not HOST:PORT"),
        ({"rdzv": "10.0.0.5:99999"}, "is not HOST:PORT"),
        ({"rdzv": ":29400"}, "is not HOST:PORT"),
        ({"nodes": 2}, "set train.rdzv"),
    ],
)
def test_bad_worker_settings_are_refused(train, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig.model_validate({"recipe": "r.py", "train": train})


def test_workers_are_for_recipes():
    with pytest.raises(ValueError, match="built-in models train in one process"):
        PipelineConfig.model_validate({"train": {"workers": 2}})
    assert PipelineConfig.model_validate({"train": {"workers": 1}}).train.distributed is False


def test_rendezvous_addresses():
    assert rendezvous_address("node-1.cluster:29400") == ("node-1.cluster", 29400)
    assert rendezvous_address("[fd00::5]:29400") == ("fd00::5", 29400)


def test_torchrun_parses_the_arguments_as_meant(tmp_path):
    """torchrun's own parser reads what the launcher and every other machine run."""
    from torch.distributed.run import parse_args

    one = parse_args(torchrun_args(TrainConfig(workers=3), tmp_path / "job.json", "abc"))
    assert (one.nnodes, one.nproc_per_node, one.max_restarts) == ("1", "3", 0)
    assert (one.rdzv_backend, one.rdzv_endpoint, one.rdzv_id) == ("c10d", "localhost:0", "abc")
    assert one.module and one.training_script == "onnxflow.recipes.ddp"
    assert one.training_script_args == ["worker", str(tmp_path / "job.json")]
    config = TrainConfig(workers=2, nodes=4, rdzv="10.0.0.5:29400")
    many = parse_args(torchrun_args(config, tmp_path / "job.json", "abc"))
    assert (many.nnodes, many.nproc_per_node, many.rdzv_endpoint) == ("4", "2", "10.0.0.5:29400")


def test_the_failure_line_names_the_worker_that_died_first():
    killed = {"rank": 1, "pid": 11, "host": "a", "exitcode": -9, "timestamp": 5, "message": ""}
    stopped = {"rank": 0, "pid": 10, "host": "a", "exitcode": -15, "timestamp": 6, "message": ""}
    assert failure_line({"workers": [stopped, killed]}) == (
        "worker rank 1 (pid 11 on a) was killed by SIGKILL; torchrun then stopped rank 0"
    )
    raised = {**stopped, "exitcode": 1, "message": "RecipeError: r.py: fit(...) raised"}
    assert failure_line({"workers": [raised]}) == (
        "worker rank 0 (pid 10 on a) exited with code 1: RecipeError: r.py: fit(...) raised"
    )
    both = [raised, {**raised, "rank": 1, "pid": 11}]
    assert failure_line({"workers": both}) == (
        "worker rank 0 (pid 10 on a) exited with code 1: RecipeError: r.py: fit(...) raised "
        "(rank 1 too)"
    )
    assert failure_line({"error": "RendezvousTimeoutError: "}).startswith("the torchrun launcher")
    # rank 1 stopped answering: rank 0 timed out waiting for it, then torchrun killed rank 1
    waited = {**raised, "message": "RuntimeError: Timed out waiting 15000ms for recv operation"}
    assert failure_line({"workers": [waited, {**killed, "timestamp": 7}]}) == (
        "worker rank 0 (pid 10 on a) exited with code 1: RuntimeError: Timed out waiting 15000ms "
        "for recv operation: train.ddp_timeout_s passed while it waited for rank 1, which hung "
        "or was stopped; torchrun then stopped rank 1"
    )


@pytest.fixture
def group_of_one(tmp_path):
    """This process as the only worker of a real gloo process group."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from onnxflow.config import DataConfig
    from onnxflow.recipes.steps import prepare_recipe_data

    folder = tmp_path_factory.mktemp("digits")
    return prepare_recipe_data(str(_recipe(folder)), DataConfig(), folder / "data")


def test_a_worker_trains_in_ddp_and_rank_0_saves(group_of_one, digits, tmp_path):
    from onnxflow.recipes.steps import train_recipe

    recipe = _recipe(tmp_path)
    trained = train_recipe(str(recipe), digits, TrainConfig(epochs=1, workers=2), tmp_path / "o")
    assert trained is not None and trained.path.name == "model.pt2" and trained.path.exists()
    assert trained.params["workers"] == "1"  # the group's size, whatever was asked


def test_a_keras_recipe_is_refused_in_a_worker(group_of_one, digits, tmp_path):
    from onnxflow.errors import RecipeError
    from onnxflow.recipes.steps import train_recipe

    recipe = tmp_path / "keras_recipe.py"
    recipe.write_text(
        "import keras\n"
        "def build_model(info):\n"
        "    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(info.n_classes)])\n"
    )
    with pytest.raises(RecipeError, match=r"train.workers 2: a keras model trains in one process"):
        train_recipe(str(recipe), digits, TrainConfig(workers=2), tmp_path / "o")


# -- real processes ------------------------------------------------------------------------


def _left_running(folder: Path) -> list[str]:
    """Processes whose command line names ``folder`` (the launcher and its workers do)."""
    found = subprocess.run(["pgrep", "-af", str(folder)], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_train_a_recipe_through_the_whole_chain(
    prefect_harness, mlflow_store, tmp_path
):
    """2 processes (gloo, CPU) train; the flow exports, validates and registers the model
    rank 0 saved, once; the version says it was trained by 2 workers."""
    from mlflow import MlflowClient

    from onnxflow.flows.pipeline import run
    from onnxflow.recipes import with_recipe_defaults

    config = with_recipe_defaults(
        PipelineConfig.model_validate(
            {
                "recipe": str(_recipe(tmp_path)),
                "train": {"workers": 2},
                "validate": {"latency_repeats": 3},
                "register": {"model_name": "ddp-digits"},
            }
        )
    )
    started = time.perf_counter()
    result = run(config=config, out_dir=tmp_path / "run")
    print(f"2-worker chain: {time.perf_counter() - started:.1f} s")
    (chain,) = result.chains
    tags = chain.version.tags
    assert tags["train_workers"] == "2" and tags["validation"] == "passed"
    assert float(tags["accuracy"]) > 0.5, tags  # digits, 2 epochs of a linear model
    assert chain.trained.params["workers"] == "2"
    versions = MlflowClient().search_model_versions("name='ddp-digits'")
    assert [str(v.version) for v in versions] == [chain.version.version]
    run_params = MlflowClient().get_run(versions[0].run_id).data.params
    assert run_params["train.workers"] == "2" and run_params["recipe.workers"] == "2"
    assert not _left_running(tmp_path)


def _failed_run(tmp_path: Path, migrated_db: Path, config: str, **env: str) -> str:
    """`onnxflow run` of the two-worker recipe (``config``: its YAML) that must fail: its
    one error line, after checking that nothing was registered and nothing is left."""
    from tests.test_cli import ONNXFLOW
    from tests.test_first_run import onnxflow_env, project

    folder = project(tmp_path / "project", migrated_db)
    _recipe(folder)
    (folder / "run.yaml").write_text(config)
    started = time.perf_counter()
    out = subprocess.run(
        [*ONNXFLOW, "run", "--recipe", "ddp_recipe.py", "--train-workers", "2"]
        + ["--config", "run.yaml"],
        cwd=folder,
        env=onnxflow_env(folder, tmp_path / "prefect-home", **env),
        capture_output=True,
        text=True,
        timeout=540,
    )
    print(f"the run failed after {time.perf_counter() - started:.1f} s")
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    print(last)
    assert last.startswith("error: ") and "nothing was saved" in last, last
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    with sqlite3.connect(folder / "mlflow.db") as db:
        assert db.execute("select count(*) from model_versions").fetchone() == (0,)
    assert not _left_running(tmp_path), _left_running(tmp_path)
    return last


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_killed_mid_epoch_fails_the_run_cleanly(tmp_path, _migrated_db):
    """Rank 1 SIGKILLed in its first epoch: `onnxflow run` exits 1 with one error line
    naming the worker and the signal; nothing registered, no process left behind."""
    last = _failed_run(tmp_path, _migrated_db, "{}\n", KILL_RANK="1")
    assert "train.workers 2: worker rank 1 " in last and "was killed by SIGKILL" in last, last


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_hung_worker_fails_the_run_after_the_ddp_timeout(tmp_path, _migrated_db):
    """Rank 1 stops (SIGSTOP) in its first epoch: rank 0 waits train.ddp_timeout_s at the
    gradients' all-reduce, then the run fails with one error line that says so; nothing
    registered, no process left behind (the stopped worker included)."""
    last = _failed_run(tmp_path, _migrated_db, "train:\n  ddp_timeout_s: 15\n", HANG_RANK="1")
    assert "train.workers 2: worker rank 0 " in last, last
    assert "train.ddp_timeout_s passed while it waited for rank 1" in last, last


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_machines_meet_at_the_rendezvous(digits, tmp_path):
    """train.nodes 2: the step's launcher and a second torchrun (another machine's, here
    on this one) run the command the step wrote in join.sh; they meet at the c10d
    rendezvous and train as ranks 0 and 1; the step returns the model rank 0 saved."""
    import shlex
    import threading

    from onnxflow.processes import free_port
    from onnxflow.recipes.ddp import train_recipe_ddp

    config = TrainConfig(epochs=1, workers=1, nodes=2, rdzv=f"127.0.0.1:{free_port()}")
    out, outcome = tmp_path / "out", {}

    def step() -> None:
        try:
            outcome["trained"] = train_recipe_ddp(str(_recipe(tmp_path)), digits, config, out)
        except Exception as exc:
            outcome["error"] = exc

    first = threading.Thread(target=step)
    first.start()
    join = out / "ddp" / "join.sh"
    deadline = time.monotonic() + 120
    while not join.exists() and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert join.exists(), outcome
    with open(tmp_path / "other-machine.log", "w") as log:
        other = subprocess.Popen(shlex.split(join.read_text()), stdout=log, stderr=log)
        first.join(timeout=480)
        assert other.wait(timeout=120) == 0, (tmp_path / "other-machine.log").read_text()
    assert "error" not in outcome, outcome
    trained = outcome["trained"]
    assert trained.params["workers"] == "2" and trained.path.exists()
    assert not _left_running(tmp_path)

"""Sweeps on a real local Dask cluster of two worker processes: trials as Prefect tasks on
Dask, MLflow child runs, the best trial registered validated; and a worker killed with
SIGKILL in the middle of a trial, after which the sweep still finishes and says which
trial was lost."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from mlflow import MlflowClient
from prefect import task

from onnxflow.config import PipelineConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
#: Each Dask worker process imports torch, Prefect and MLflow before its first trial: on a
#: busy 2-core machine the sweeps below take 2-3 minutes each.
slow = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def test_the_dask_runner_reports_a_task_whose_worker_died_as_lost(tmp_path):
    """onnxflow's DaskTaskRunner (local cluster of 2 worker processes, no second attempt):
    a task whose worker process dies comes back lost, the other task's result as it was."""
    from prefect import flow

    from onnxflow.config import DaskConfig
    from onnxflow.dask_cluster import task_runner
    from onnxflow.sweep import TrialSpec, future_result

    @flow
    def two_tasks() -> list:
        results = []
        for number in (0, 1):  # one after the other: the death takes no bystander with it
            spec = TrialSpec(number=number, trial_id=number, params={}, run_id=f"r{number}")
            future = _die_or_answer.submit(spec, die=number == 1)
            results.append(future_result(future, spec))
        return results

    started = time.perf_counter()
    on_dask = two_tasks.with_options(task_runner=task_runner(DaskConfig(workers=2)))
    (answered, returned), (lost, lost_returned) = on_dask()
    assert returned and not lost_returned
    assert answered.state == "complete" and answered.value == 0.5
    assert answered.note != str(os.getpid()), "ran in a worker process"
    assert lost.state == "lost" and lost.note.startswith("KilledWorker"), lost
    print(f"\ntwo tasks on a local 2-worker Dask cluster: {time.perf_counter() - started:.1f} s")


@slow
def test_framework_chains_run_side_by_side_on_dask_workers(mlflow_store, tmp_path):
    from onnxflow.flows.pipeline import run

    config = PipelineConfig.model_validate(
        {
            "train": {"epochs": 3, "hidden_sizes": [16]},
            "validate": {"latency_repeats": 3, "max_accuracy_drop": 0.01},
            "dask": {"workers": 2},
        }
    )
    result = run(["sklearn", "torch"], config, tmp_path / "art", dask=True)
    assert not result.failures and {c.framework for c in result.chains} == {"sklearn", "torch"}
    client = MlflowClient()
    versions = client.search_model_versions("name='digits'")
    assert len(versions) == 2 and all(v.tags["validation"] == "passed" for v in versions)
    assert str(client.get_model_version_by_alias("digits", "champion").version) in {
        c.version.version for c in result.chains
    }


def sweep_config(trials: int, epochs: tuple[int, int], **dask) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "train": {"hidden_sizes": [16], "epochs": epochs[0]},
            "validate": {"latency_repeats": 3, "max_accuracy_drop": 0.01},
            "sweep": {
                "trials": trials,
                "space": {
                    "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
                    "epochs": {"low": epochs[0], "high": epochs[1]},
                    "hidden_sizes": {"choices": [[16], [32]]},
                },
                "prune_after_trials": 1,
                "prune_warmup_epochs": 1,
            },
            "dask": {"workers": 2, **dask},
        }
    )


def trial_runs(client: MlflowClient, parent_run_id: str) -> list:
    exp = client.get_experiment_by_name("onnxflow")
    return client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=100
    )


@slow
def test_sweep_on_two_dask_workers_registers_the_best_trial(mlflow_store, tmp_path):
    from onnxflow.flows.sweep import sweep

    started = time.perf_counter()
    result = sweep("torch", sweep_config(4, (2, 3)), tmp_path / "art")
    took = time.perf_counter() - started

    chain = result.chains[0]
    outcome = chain.sweep
    assert len(outcome.trials) == 4 and not outcome.lost
    assert outcome.best is not None and outcome.best.state == "complete"
    complete = [t for t in outcome.trials if t.state == "complete"]
    assert outcome.best.value == max(t.value for t in complete)

    client = MlflowClient()
    version = client.get_model_version("digits", chain.version.version)
    assert version.tags["validation"] == "passed"
    assert client.get_model_version_by_alias("digits", "champion").version == version.version
    parent = client.get_run(version.run_id)
    assert parent.data.tags["sweep_best_trial"] == str(outcome.best.number)
    assert parent.data.tags["sweep_lost"] == "none"
    # the registered model is the best trial's: same settings, same trained file
    assert chain.trained.path == outcome.best.trained.path
    assert parent.data.params["best.epochs"] == str(outcome.best.params["epochs"])

    children = trial_runs(client, version.run_id)
    assert len(children) == 4
    for run in children:
        assert run.data.tags["trial_state"] in ("complete", "pruned")
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert len(history) >= 1, "per-epoch metrics of every trial"
    # the trials ran in Dask worker processes, not in this one
    worker_pids = {run.data.tags["worker_pid"] for run in children}
    assert str(os.getpid()) not in worker_pids
    print(f"\nsweep of 4 trials on 2 local Dask workers: {took:.1f} s")


@slow
def test_a_worker_killed_mid_sweep_loses_its_trial_and_the_sweep_finishes(mlflow_store, tmp_path):
    """The test runs its own 2-worker cluster and hands the flow its address (as for a
    remote cluster); when a trial has logged an epoch, the worker running it is killed."""
    from distributed import Client, LocalCluster

    from onnxflow.flows.sweep import sweep

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs={"allowed_failures": 0},
        ) as cluster,
        Client(cluster) as dask_client,
    ):
        killed: dict[str, object] = {}
        errors: list[BaseException] = []
        stop = threading.Event()

        def kill_a_worker_mid_trial() -> None:
            mlflow = MlflowClient()
            while not stop.is_set():
                try:
                    victim = _worker_mid_trial(mlflow, dask_client)
                except Exception as exc:  # the store is busy: look again
                    errors[:] = [exc]
                    victim = None
                if victim:
                    killed.update(victim)
                    os.kill(victim["pid"], signal.SIGKILL)
                    return
                stop.wait(0.2)

        killer = threading.Thread(target=kill_a_worker_mid_trial, daemon=True)
        killer.start()
        try:
            result = sweep(
                "torch",
                sweep_config(4, (6, 8), address=cluster.scheduler_address),
                tmp_path / "art",
            )
        finally:
            stop.set()
            killer.join(timeout=10)

    assert killed, f"no worker was killed, the test did not exercise a loss: {errors}"
    outcome = result.chains[0].sweep
    lost = outcome.lost
    assert len(lost) == 1 and lost[0].run_id == killed["run_id"], (outcome.trials, killed)
    assert "KilledWorker" in lost[0].note
    assert len(outcome.trials) == 4 and outcome.best is not None

    client = MlflowClient()
    version = client.get_model_version("digits", result.chains[0].version.version)
    assert version.tags["validation"] == "passed"
    parent = client.get_run(version.run_id)
    assert parent.data.tags["sweep_lost"] == str(lost[0].number)
    lost_run = client.get_run(killed["run_id"])
    assert lost_run.data.tags["trial_state"] == "lost" and lost_run.info.status == "FAILED"
    # its Prefect task run is Crashed, not left Running
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[f"trial-{lost[0].number}"]))
        )
    states = [r.state.type.value for r in runs]  # earlier sweeps' trials share the name
    assert "CRASHED" in states and "RUNNING" not in states, states


def _die_task(spec, die: bool):
    from onnxflow.results import TrialResult

    if die:  # what an OOM kill or a lost node does to a worker
        os.kill(os.getpid(), signal.SIGKILL)
    return TrialResult(
        number=spec.number,
        params={},
        run_id=spec.run_id,
        state="complete",
        value=0.5,
        note=str(os.getpid()),
    )


_die_or_answer = task(_die_task, name="die-or-answer")


def _worker_mid_trial(mlflow: MlflowClient, dask_client) -> dict | None:
    """A trial's child run that has logged an epoch and is still running, and the pid of
    the Dask worker process training it (its ``worker_pid`` tag), if that is one of the
    cluster's workers."""
    exp = mlflow.get_experiment_by_name("onnxflow")
    if exp is None:
        return None
    pids = set(dask_client.run(os.getpid).values())  # each worker's pid, from the worker
    for run in mlflow.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
        pid = int(run.data.tags.get("worker_pid", 0))
        mid_trial = pid in pids and "sweep_trial" in run.data.tags
        if mid_trial and mlflow.get_metric_history(run.info.run_id, "val_accuracy"):
            return {"pid": pid, "run_id": run.info.run_id}
    return None


@slow
def test_a_recipe_swept_on_dask_workers_registers_and_promotes_its_best_trial(
    mlflow_store, tmp_path
):
    """``onnxflow run --sweep 3 --recipe swept.py``'s flow: the recipe's trials on two Dask
    worker processes, its own ``width`` swept, the best trial registered and promoted."""
    from onnxflow.flows.sweep import sweep
    from tests.test_recipes import assert_best_trial_registered, swept_recipe_config

    config = swept_recipe_config(tmp_path, 3)
    config = PipelineConfig.model_validate(
        {**config.model_dump(by_alias=True), "dask": {"workers": 2}}
    )
    result = sweep("torch", config, tmp_path / "art")
    chain = result.chains[0]
    assert_best_trial_registered(chain, 3)
    client = MlflowClient()
    champion = client.get_model_version_by_alias("swept", "champion")
    assert str(champion.version) == chain.version.version
    children = trial_runs(client, chain.version.run_id)
    assert str(os.getpid()) not in {run.data.tags["worker_pid"] for run in children}

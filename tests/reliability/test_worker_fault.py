"""The worker is killed in the middle of a flow run.

A real stack (SQLite-backed MLflow and Prefect servers, the process work pool and its
worker, the deployments; no replicas) runs the on-demand deployment with a small torch
config. Once the chain's MLflow run exists, the worker and every process group under it
(the flow run's own session included) get SIGKILL, as when the machine dies. Then what
an operator does: start a worker again and trigger the deployment again.

What must hold: the rerun completes; the registry holds one version per completed
chain, each with its ``onnx_sha256`` and ``validation`` tags, none aliased whose MLflow
run did not finish; ``champion`` is a validated version; the killed flow run ends
Crashed (the stack's heartbeat automation), not Running forever; the killed attempt's
MLflow run is not left RUNNING: the rerun, triggered once the UI shows the run Crashed,
marks it FAILED. (Triggered before that, the rerun leaves it to the next run's sweep.)

Long form only (``make soak``): the stack, two runs and the heartbeat window take
about two minutes (a 60 s heartbeat window in it).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import SMALL_CONFIG, free_ports
from tests.reliability.conftest import wait_for

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.integration,
    pytest.mark.timeout(900),
    pytest.mark.slow,  # long form only (make soak, or -m slow): about 2 minutes
]

TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def flow_run_state(settings, run_id) -> str:
    run = httpx.get(f"{settings.prefect_api_url}/flow_runs/{run_id}", timeout=10).json()
    return run["state"]["type"]


def flow_runs_named(settings, name: str, state: str) -> list[dict]:
    return httpx.post(
        f"{settings.prefect_api_url}/flow_runs/filter",
        timeout=10,
        json={
            "flows": {"name": {"any_": [name]}},
            "flow_runs": {"state": {"type": {"any_": [state]}}},
        },
    ).json()


def running_flow_runs(settings) -> list[dict]:
    return httpx.post(
        f"{settings.prefect_api_url}/flow_runs/filter",
        timeout=10,
        json={"flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}}},
    ).json()


def crash_worker(record) -> list[int]:
    """SIGKILL the worker's process tree, every process group in it: its flow runs run in
    sessions of their own, and a dead machine takes them along."""
    from onnxflow.processes import _pgid, process_tree

    tree = process_tree(record.pid)
    groups = {_pgid(pid) for pid, _ in tree} - {None, os.getpgrp()}
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [pid for pid, _ in tree]


def start_worker(settings):
    """What ``up`` does for the worker, alone: the operator's restart."""
    from onnxflow.processes import start_process, wait_until
    from onnxflow.stack import health, manager

    record = start_process(
        "worker",
        manager.worker_command(settings),
        {**manager.base_env(settings), **manager.worker_env(settings)},
        manager.state_dir(settings) / "logs" / "worker.log",
        cwd=Path.cwd(),
    )
    wait_until(
        record,
        lambda: health.worker_online(settings.prefect_url, settings.work_pool),
        settings.startup_timeout_s,
        "online",
    )
    return record


def test_worker_killed_mid_flow_rerun_completes_and_registry_stays_clean(
    tmp_path, report, monkeypatch
):
    from mlflow import MlflowClient

    from onnxflow.config import PipelineConfig
    from onnxflow.processes import is_alive, stop_process
    from onnxflow.stack import manager
    from onnxflow.stack.deployments import config_parameter, trigger
    from onnxflow.stack.settings import StackSettings

    config = PipelineConfig.model_validate(
        {**SMALL_CONFIG, "train": {"epochs": 4, "hidden_sizes": [32]}, "promote": {"mode": "auto"}}
    )
    name = config.register_.model_name
    parameters = {"frameworks": ["torch"], "config": config_parameter(config), "endpoints": []}
    prefect_port, mlflow_port = free_ports(2)
    settings = StackSettings(
        state_dir=tmp_path / "stack",
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
        endpoint_ports=[],
        worker_query_s=1,
        schedule_paused=True,
        heartbeat_s=30,
        zombie_after_s=60,
    )
    report.fault("worker killed mid-flow", False)
    manager.up(settings)
    restarted = None
    try:
        for key, value in manager.account_env(settings, "endpoint").items():  # read-only login
            monkeypatch.setenv(key, value)
        client = MlflowClient(settings.mlflow_url, settings.mlflow_url)
        worker = next(r for r in manager.read_state(settings) if r.name == "worker")

        # 1. A run, killed with its worker once the chain's MLflow run exists.
        crashed = trigger(settings, parameters)

        def chain_run():
            experiment = client.get_experiment_by_name(config.experiment)
            if experiment is None:
                return None
            runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
            return runs[0] if runs else None

        killed_run = wait_for(chain_run, timeout=180)
        assert killed_run, "the chain's MLflow run never appeared"
        assert flow_run_state(settings, crashed.id) == "RUNNING"
        killed = crash_worker(worker)
        assert len(killed) >= 2, "the flow run was not a process under the worker"
        wait_for(
            lambda: not any(is_alive(p, t) for p, t in [(worker.pid, worker.start_ticks)]),
            timeout=10,
        )
        killed_at = time.monotonic()
        registered_by_killed = (
            client.search_model_versions(f"name='{name}' and run_id='{killed_run.info.run_id}'")
            if _model_exists(client, name)
            else []
        )

        # 2. The operator starts a worker again. The killed run stops heartbeating, and
        #    the stack's automation marks it (and its subflows) Crashed.
        restarted = start_worker(settings)
        wait_for(
            lambda: not running_flow_runs(settings),  # the run and its subflows
            timeout=settings.heartbeat_s + settings.zombie_after_s + 60,
            interval=1,
        )
        final = flow_run_state(settings, crashed.id)
        report.add("zombie_run_crashed_after_s", time.monotonic() - killed_at)
        assert final == "CRASHED", f"killed flow run {crashed.id} is {final}"

        # 3. Seeing it Crashed, the operator triggers the deployment again.
        rerun = trigger(settings, parameters, wait=True, timeout_s=400)
        assert rerun.state.is_completed(), rerun.state
        stuck = running_flow_runs(settings)
        assert stuck == [], [(r["name"], r["state"]["type"]) for r in stuck]

        # 4. The registry: one version per completed chain, tagged, none orphaned.
        chains = flow_runs_named(settings, "train-and-register", "COMPLETED")
        versions = client.search_model_versions(f"name='{name}'")
        assert len(versions) == len(chains) == 1, (
            [(v.version, v.run_id) for v in versions],
            registered_by_killed,
        )
        assert len({v.run_id for v in versions}) == len(versions), "two versions, one run"
        for v in versions:
            assert v.tags.get("onnx_sha256") and v.tags.get("validation") == "passed", v.tags
        model = client.get_registered_model(name)
        for alias, version in model.aliases.items():
            run = client.get_run(client.get_model_version(name, version).run_id)
            assert run.info.status == "FINISHED", (alias, version, run.info.status)
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.tags["validation"] == "passed"

        # 5. The rerun closed the killed attempt's MLflow run: FAILED, not RUNNING forever.
        killed_status = client.get_run(killed_run.info.run_id)
        assert killed_status.info.status == "FAILED", killed_status.info
        assert "abandoned" in killed_status.data.tags
    finally:
        if restarted is not None:
            stop_process(restarted)
        manager.down(settings)
    report.fault("worker killed mid-flow", True)


def _model_exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True

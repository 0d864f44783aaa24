"""A sweep through the real worker: ``onnxflow trigger --sweep 8`` runs the on-demand
deployment, whose flow run on the stack's worker starts a local 2-worker Dask cluster,
runs the trials there, and registers the best trial's validated model through the
tracking server.

Marked slow: eight trials plus the Dask workers' start-up take minutes on 2 busy cores.
"""

from __future__ import annotations

import pytest
import yaml

from tests.integration.conftest import run_on_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]


def test_on_demand_deployment_runs_a_sweep_on_dask_and_registers_the_best(
    stack, mlflow_client, tmp_path
):
    config = tmp_path / "sweep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "train": {"epochs": 4, "hidden_sizes": [32]},
                "validate": {"latency_repeats": 3, "max_accuracy_drop": 0.01},
                "register": {"model_name": "digits-sweep"},
                "promote": {"mode": "review"},
                "sweep": {"space": {"learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}},
            }
        )
    )
    out = run_on_stack(
        stack,
        "onnxflow",
        "trigger",
        "--sweep",
        "8",
        "--dask-workers",
        "2",
        "--config",
        config,
        "--wait",
        timeout_s=1100,
    )
    assert "finished COMPLETED" in out.stdout, out.stdout

    version = mlflow_client.get_model_version_by_alias("digits-sweep", "challenger")
    assert version.tags["validation"] == "passed"
    parent = mlflow_client.get_run(version.run_id)
    tags = parent.data.tags
    assert tags["sweep_trials"] == "8" and tags["sweep_lost"] == "none", tags
    children = mlflow_client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{version.run_id}'"
    )
    assert len(children) == 8
    best = mlflow_client.get_run(tags["sweep_best_run_id"])
    assert best.data.tags["trial_state"] == "complete"
    # the trials ran in the worker's Dask worker processes: two of them at most
    assert len({c.data.tags["worker_pid"] for c in children}) <= 2
    assert parent.data.params["best.learning_rate"] == best.data.params["train.learning_rate"]

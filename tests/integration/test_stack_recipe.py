"""A recipe retrained through the real worker: the on-demand deployment run with a
``recipe`` parameter (a path the worker can read), registered through the tracking server.

Marked slow as well: a transformer's export and validation take a minute or two here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.integration.conftest import run_on_demand

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "text" / "recipe.py"


def test_on_demand_deployment_retrains_a_recipe_on_the_worker(stack, mlflow_client, tmp_path):
    spec = importlib.util.spec_from_file_location("text_recipe", RECIPE)
    text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(text)
    data = text.generate(tmp_path / "tiny.npz", rows=240)
    params = {
        "recipe": str(RECIPE),  # the recipe's code reaches the worker as a readable path
        "config": {
            "data": {"path": str(data)},
            "train": {"epochs": 2},
            "validate": {"latency_repeats": 3},
            "register": {"model_name": "tokens-worker"},
            "promote": {"mode": "review"},
        },
        "endpoints": stack.endpoint_urls,
    }
    run_on_demand(stack, params, timeout_s=800)

    version = mlflow_client.get_model_version_by_alias("tokens-worker", "challenger")
    tags = version.tags
    assert tags["recipe"] == str(RECIPE)
    assert tags["validation"] == "passed" and float(tags["parity_max_abs"]) <= 1e-4
    assert tags["metric_name"] == "accuracy" and "accuracy" in tags
    assert tags["reference_device"] == "cpu"
    assert tags["inputs"] == "ids int64 [batch, 24]; mask int64 [batch, 24]"
    run = mlflow_client.get_run(version.run_id)
    assert run.data.params["recipe.recipe"] == str(RECIPE)
    assert run.data.params["train.batch_size"] == "64"  # the recipe's DEFAULTS, on the worker
    assert any(m == "val_accuracy" for m in run.data.metrics)

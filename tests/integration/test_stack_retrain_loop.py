"""The production loop on the stack, from shifted traffic to a better champion.

A scikit-learn model of the digits (``scan``) is trained through the on-demand deployment
and served by both replicas (capture on, challenger in shadow: the stack's defaults).
Then the scans come from a worn scanner (faded ink, a grey background, sensor noise):
the replicas answer and capture them, labels are fed back, and the monitor deployment
(``onnxflow-monitor/scan``, run on the worker as the pipeline account) sees the drift and
retrains on the original data plus the labelled captured rows. The new version lands as
challenger with its lineage to the capture window and both versions' figures on a common
evaluation set; the replicas run it in shadow; the next monitor run's gate promotes it
(auto mode) and both replicas serve it. Its accuracy on worn scans neither version
trained on is compared with the old champion's, measured through the replicas.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from onnxflow.endpoints import serving_version, wait_until_serving
from onnxflow.stack import manager
from tests.integration.conftest import MONITOR_CONFIG, prefect_http, record_timing, stack_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent
MODEL = "scan"


def worn(x: np.ndarray, rng) -> np.ndarray:
    """A worn scanner: faded ink (half the contrast), a grey background, sensor noise."""
    return np.clip(0.5 * x + 5 + rng.normal(0, 1, x.shape), 0, 16)


def infer(http: httpx.Client, x: np.ndarray, batch: int = 20) -> tuple[list, np.ndarray, set]:
    """Answer ``x`` in requests of ``batch`` rows: (request id, row) per row, the predicted
    classes, and the versions that answered."""
    name = http.get(f"/v2/models/{MODEL}").json()["inputs"][0]["name"]
    ids, predicted, versions = [], [], set()
    for start in range(0, len(x), batch):
        part = x[start : start + batch].astype(np.float32)
        body = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(part.shape),
                    "datatype": "FP32",
                    "data": part.ravel().tolist(),
                }
            ]
        }
        response = http.post(f"/v2/models/{MODEL}/infer", json=body)
        assert response.status_code == 200, response.text
        versions.add(response.headers["x-model-version"])
        scores = np.asarray(response.json()["outputs"][0]["data"]).reshape(len(part), -1)
        predicted += scores.argmax(axis=1).tolist()
        ids += [(response.json()["id"], i) for i in range(len(part))]
    return ids, np.asarray(predicted), versions


def wait_for(what: str, check, timeout_s: float, interval_s: float = 0.5):
    """Until ``check()`` returns something true; that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not after {timeout_s} s")


def captured_rows(folder: Path) -> int:
    import pyarrow.dataset as ds

    if not (folder / f"model={MODEL}").is_dir():
        return 0
    return ds.dataset(folder / f"model={MODEL}", format="parquet", partitioning="hive").count_rows()


def run_monitor(stack, since: str) -> dict:
    """A run of the monitor deployment now (as its schedule would), on the worker."""
    out = subprocess.run(
        [BIN / "onnxflow", "monitor", MODEL, "--on-stack", "--retrain", "--since", since],
        env=stack_env(stack),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0 and " COMPLETED " in out.stdout, out.stdout + out.stderr
    return {"id": out.stdout.split("/runs/flow-run/")[1].split(")")[0], "line": out.stdout}


def subflows(stack, parent_id: str) -> list[str]:
    """Names of the flows run inside a flow run (the Prefect UI's subflow runs)."""
    with prefect_http(stack) as http:
        runs = http.post("/flow_runs/filter", json={"limit": 200}).json()
        flows = {f["id"]: f["name"] for f in http.post("/flows/filter", json={}).json()}
        tasks = http.post(
            "/task_runs/filter", json={"flow_runs": {"id": {"any_": [parent_id]}}}
        ).json()
    parents = {t["id"] for t in tasks}
    return [flows[r["flow_id"]] for r in runs if r.get("parent_task_run_id") in parents]


def test_shifted_traffic_drifts_retrains_shadows_and_promotes_a_better_champion(
    stack, mlflow_client
):
    from sklearn.datasets import load_digits

    from onnxflow.config import DataConfig
    from onnxflow.data import test_split_rows

    started = time.monotonic()
    timeline = []

    def mark(line: str) -> None:
        timeline.append(f"[{time.monotonic() - started:6.1f} s] {line}")
        print(timeline[-1], flush=True)

    X, y = load_digits(return_X_y=True)
    tested = test_split_rows(y, DataConfig())  # the rows no version of scan trains on
    rng = np.random.default_rng(0)
    capture = Path(stack.capture_url)
    policy = MONITOR_CONFIG[MODEL]["policy"]

    # 1. champion v1: scikit-learn on the digits, through the on-demand deployment
    out = subprocess.run(
        [
            BIN / "onnxflow",
            "trigger",
            "--framework",
            "sklearn",
            "--model-name",
            MODEL,
            "--promotion",
            "auto",
            "--wait",
        ],
        env={**stack_env(stack), **manager.account_env(stack, "reviewer")},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    wait_until_serving(stack.endpoint_urls, MODEL, "1", timeout_s=120)
    mark("champion: scan v1 (sklearn) serves on both replicas")

    replica, other = (httpx.Client(base_url=u, timeout=30) for u in stack.endpoint_urls)
    with replica, other:
        # the old champion on worn scans of the test split (answered by the other replica)
        x_eval, y_eval = worn(X[tested], rng), y[tested]
        _, predicted, versions = infer(other, x_eval)
        assert versions == {"1"}
        before = float((predicted == y_eval).mean())
        mark(f"v1 on {len(y_eval)} worn scans of the test split: accuracy {before:.3f}")

        # 2. shifted traffic, labels fed back (to the replica that answered: it holds the ids)
        since = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        pool = np.flatnonzero(~tested)
        rng.shuffle(pool)
        traffic, shadow_rows = pool[:500], pool[500:700]
        ids, predicted, _ = infer(replica, worn(X[traffic], rng))
        labels = [
            {"request_id": r, "row": i, "label": int(v)} for (r, i), v in zip(ids, y[traffic])
        ]
        replica.post(f"/v2/models/{MODEL}/feedback", json={"labels": labels}).raise_for_status()
        live = float((predicted == y[traffic]).mean())
        mark(f"traffic: {len(traffic)} worn scans, live accuracy {live:.3f}; labels fed back")
        rows = wait_for(
            "captured rows", lambda: captured_rows(capture) >= len(traffic) + len(y_eval), 60
        )
        assert rows

        # 3. the monitor deployment: drift -> retrain on evidence -> challenger v2
        first = run_monitor(stack, since)
        champion = mlflow_client.get_model_version(MODEL, "1")
        assert champion.tags["monitor_retrain"] == "yes", champion.tags
        assert float(champion.tags["monitor_drift_share"]) > policy["max_drift_share"]
        assert champion.tags["monitor_labelled_rows"] == str(len(traffic))
        assert mlflow_client.get_model_version_by_alias(MODEL, "champion").version == "1"
        challenger = mlflow_client.get_model_version_by_alias(MODEL, "challenger")
        tags = challenger.tags
        assert challenger.version == "2" and tags["retrain_of_version"] == "1"
        assert tags["retrain_capture_window"] == champion.tags["monitor_window"]
        assert tags["retrain_capture"] == str(capture)
        assert tags["retrain_rows_captured"] == "350"  # 500 labelled, 30% held out
        assert tags["registered_by"] == "pipeline" and tags["validation"] == "passed"
        run_inputs = mlflow_client.get_run(challenger.run_id).inputs.dataset_inputs
        assert run_inputs[0].dataset.name == f"{MODEL}-retrain"
        assert mlflow_client.get_run(challenger.run_id).data.tags["retrain_rows_captured"] == "350"
        assert tags["common_eval_champion_version"] == "1"
        assert float(tags["common_eval_captured_value"]) > float(
            tags["common_eval_champion_captured_value"]
        )
        assert "retrain-on-evidence" in subflows(stack, first["id"])
        mark(
            f"{first['line'].split(' (')[0]}: "
            f"drift share {champion.tags['monitor_drift_share']}, "
            f"live accuracy {champion.tags['monitor_live_accuracy']} -> retrain -> v2 challenger; "
            f"common evaluation ({tags['common_eval_rows']}): v2 {tags['common_eval_value']}, "
            f"v1 {tags['common_eval_champion_value']}"
        )

        # 4. v2 in shadow on the replicas (once their poll sees the challenger); each
        # replica writes its shadow's figures onto v2 every shadow_flush_interval_s
        x_shadow = worn(X[shadow_rows], rng)

        def shadow_evidence():
            _, _, versions = infer(replica, x_shadow[rng.choice(len(x_shadow), 20)])
            assert versions == {"1"}, "the shadow never answers"
            tags = mlflow_client.get_model_version(MODEL, "2").tags
            return int(tags.get("shadow_requests") or 0) >= policy["min_shadow_requests"] and tags

        tags = wait_for("shadow evidence on v2", shadow_evidence, 120, interval_s=0.5)
        mark(
            f"shadow: v2 mirrored {tags['shadow_requests']} requests, agreement with v1 "
            f"{tags['shadow_agreement']}, {tags['shadow_errors']} errors"
        )

        # 5. the next monitor run: no second retrain, the gate promotes v2 (auto mode)
        run_monitor(stack, since)
        assert mlflow_client.get_model_version_by_alias(MODEL, "champion").version == "2"
        decided = mlflow_client.get_model_version(MODEL, "2").tags
        assert decided["retrain_gate"] == "promoted", decided
        assert len(mlflow_client.search_model_versions(f"name='{MODEL}'")) == 2
        took = wait_until_serving(stack.endpoint_urls, MODEL, "2", timeout_s=60)
        mark(
            f"gate: {decided['promotion_reason']}; both replicas serve v2 "
            f"({max(took.values()):.1f} s)"
        )

        # 6. the new champion on the same worn scans, through the replicas
        _, predicted, versions = infer(other, x_eval)
        assert versions == {"2"}
        after = float((predicted == y_eval).mean())
        mark(f"v2 on the same {len(y_eval)} worn scans: accuracy {after:.3f} (v1 {before:.3f})")
        assert after > before + 0.2, (before, after)

    # the audit trail: the pipeline account moved champion onto v2
    audit = subprocess.run(
        [BIN / "onnxflow", "audit", MODEL],
        env={
            **stack_env(stack),
            **manager.account_env(stack, "admin"),
            "MLFLOW_TRACKING_URI": stack.mlflow_url,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "pipeline" in audit.stdout and "champion" in audit.stdout, audit.stdout
    record_timing("retrain_loop_s", time.monotonic() - started)
    assert [serving_version(u, MODEL) for u in stack.endpoint_urls] == ["2", "2"]

"""Hostile clients against the real stack: can anyone get a version served as champion
without the promotion policy's consent and an audit record?

On the session's stack (the ``stack`` fixture, PostgreSQL-backed MLflow with the policy),
a model registered by the pipeline (``register_onnx``, as the flows do) has a champion
and an unvalidated challenger a data scientist registered. Then a data scientist (EDIT on
the model), a reviewer, the endpoint account, the pipeline and an anonymous client try
every route MLflow exposes that moves, deletes, renames or stages the champion away, or
forges what the policy judges (evidence tags, the stored model, the audit trail), through
both the REST API and the UI's ``/ajax-api`` variant. Every attempt must be refused, every
attempt on an alias-changing route must be in the audit trail, the chain must verify, and
``champion`` must still resolve to the same version.

The figures (attempts, refused, audited) print at the end and go to
``test-results/hostile.json``. ``make soak`` runs the sweep ``ONNXFLOW_SOAK_ROUNDS``
times (default 10); ``make test`` once (a few seconds on the running stack).
"""

from __future__ import annotations

import json
import os
import uuid

import httpx
import pytest

from onnxflow.stack import manager
from onnxflow.stack.audit import fetch_rows, verify_chain
from tests.integration.conftest import RESULTS, add_data_scientist
from tests.integration.test_promotion_policy import EVIDENCE, tiny_onnx

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(600)]

ROUNDS = int(os.environ.get("ONNXFLOW_SOAK_ROUNDS", "10")) if os.environ.get("ONNXFLOW_SOAK") else 1
PREFIXES = ("/api/2.0", "/ajax-api/2.0")  # every prefix MLflow serves these routes under


def _client(stack, user: str | None, password: str | None = None) -> httpx.Client:
    auth = None
    if user is not None:
        auth = (user, password or manager.account_env(stack, user)["MLFLOW_TRACKING_PASSWORD"])
    return httpx.Client(base_url=stack.mlflow_url, auth=auth, timeout=30)


@pytest.fixture(scope="module")
def target(stack, tmp_path_factory, monkeypatch_module):
    """A model with a champion (validated, registered by the pipeline) and an unvalidated
    version; a data scientist with EDIT on it."""
    import numpy as np

    from onnxflow.registration import register_onnx

    for key, value in manager.account_env(stack, "pipeline").items():
        monkeypatch_module.setenv(key, value)
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)
    folder = tmp_path_factory.mktemp("hostile")
    name = f"hostile-{uuid.uuid4().hex[:6]}"
    with _client(stack, "pipeline") as http:
        experiment = http.post("/api/2.0/mlflow/experiments/create", json={"name": name})
        assert experiment.status_code == 200, experiment.text
    monkeypatch_module.setenv("MLFLOW_EXPERIMENT_ID", experiment.json()["experiment_id"])
    model_path = folder / "model.onnx"
    versions = []
    for _ in range(2):
        model_path.write_bytes(tiny_onnx())
        evidence = {k: v for k, v in EVIDENCE.items() if k != "onnx_sha256"}
        versions.append(
            register_onnx(
                model_path,
                model_name=name,
                input_example=np.zeros((1, 4), dtype=np.float32),
                tags=evidence,
                aliases=("challenger",),
            ).version
        )
    champion, challenger = versions
    with _client(stack, "reviewer") as reviewer:
        moved = reviewer.post(
            "/api/2.0/mlflow/registered-models/alias",
            json={"name": name, "alias": "champion", "version": champion},
        )
        assert moved.status_code == 200, moved.text
    scientist, password = add_data_scientist(stack, name)
    with _client(stack, scientist, password) as http:
        unvalidated = http.post(
            "/api/2.0/mlflow/model-versions/create",
            json={"name": name, "source": f"models:/{name}/{challenger}"},
        )
        assert unvalidated.status_code == 200, unvalidated.text
    return {
        "model": name,
        "champion": champion,
        "challenger": challenger,
        "unvalidated": unvalidated.json()["model_version"]["version"],
        "scientist": (scientist, password),
    }


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _moves(t: dict) -> list[tuple[str, str, dict]]:
    """(method, route, body) of every request that would change NAME@champion."""
    name = t["model"]
    out = []
    for prefix in PREFIXES:
        for version in (t["challenger"], t["unvalidated"]):
            body = {"name": name, "alias": "champion", "version": version}
            out.append(("POST", f"{prefix}/mlflow/registered-models/alias", body))
        out += [
            (
                "DELETE",
                f"{prefix}/mlflow/registered-models/alias",
                {"name": name, "alias": "champion"},
            ),
            (
                "POST",
                f"{prefix}/mlflow/registered-models/rename",
                {"name": name, "new_name": f"{name}-x"},
            ),
            (
                "DELETE",
                f"{prefix}/mlflow/model-versions/delete",
                {"name": name, "version": t["champion"]},
            ),
            ("DELETE", f"{prefix}/mlflow/registered-models/delete", {"name": name}),
            (
                "POST",
                f"{prefix}/mlflow/model-versions/transition-stage",
                {
                    "name": name,
                    "version": t["unvalidated"],
                    "stage": "Production",
                    "archive_existing_versions": True,
                },
            ),
        ]
    return out


def _forgeries(t: dict) -> list[tuple[str, str, dict]]:
    """Requests that would forge what the policy judges a version by, or the trail."""
    name, version = t["model"], t["unvalidated"]
    out = []
    for prefix in PREFIXES:
        for key, value in (
            ("validation", "passed"),
            ("onnx_sha256", "0" * 64),
            ("accuracy", "1.0"),
        ):
            body = {"name": name, "version": version, "key": key, "value": value}
            out.append(("POST", f"{prefix}/mlflow/model-versions/set-tag", body))
        out.append(
            (
                "POST",
                f"{prefix}/mlflow/model-versions/set-tag",
                {"name": name, "version": version, "key": "registered_by", "value": "x"},
            )
        )
        # Who asked for a version: the server's to write, from a redeemed run ticket only.
        for key in ("requested_by", "run_ticket"):
            body = {"name": name, "version": version, "key": key, "value": "made-up"}
            out.append(("POST", f"{prefix}/mlflow/model-versions/set-tag", body))
        ticketed = {
            "name": name,
            "source": "runs:/0/model",
            "tags": [{"key": "run_ticket", "value": "made-up"}],
        }
        out.append(("POST", f"{prefix}/mlflow/model-versions/create", ticketed))
    out.append(("POST", "/api/2.0/onnxflow/audit", {}))
    out.append(("DELETE", "/api/2.0/onnxflow/audit", {}))
    return out


def _consented(role: str, kind: str, path: str, body: dict, t: dict) -> bool:
    """What the policy lets these roles do by design, so not an attack: a reviewer (and
    the pipeline, auto promotion) moving champion onto the validated challenger; the
    pipeline writing evidence (it is the pipeline's to write)."""
    if role in ("reviewer", "pipeline") and kind == "move" and path.endswith("/alias"):
        return body.get("version") == t["challenger"]
    return (
        role == "pipeline"
        and kind == "forge"
        and body.get("key") in {"validation", "onnx_sha256", "accuracy"}
    )


def _prefect_routes(stack) -> list[tuple[str, str, dict]]:
    """Prefect routes that run code with the pipeline's credentials or change what runs."""
    with httpx.Client(base_url=stack.prefect_api_url, timeout=10) as http:
        assert http.get("/health").status_code == 200  # the probe stays open
    deployment = "00000000-0000-0000-0000-000000000000"
    return [
        ("POST", f"/deployments/{deployment}/create_flow_run", {"parameters": {}}),
        ("PATCH", f"/deployments/{deployment}", {"job_variables": {"command": "id"}}),
        ("POST", "/deployments/filter", {}),
        ("POST", "/flow_runs/", {"flow_id": deployment}),
        ("PATCH", f"/work_pools/{stack.work_pool}", {"base_job_template": {}}),
        ("POST", "/deployments/", {"name": "x", "flow_id": deployment}),
    ]


def _send(client: httpx.Client, method: str, path: str, body: dict) -> int:
    if method == "GET":
        return client.get(path, params=body).status_code
    return client.request(method, path, json=body).status_code


def test_no_role_gets_a_version_served_as_champion_without_the_policy(stack, target):
    t = target
    scientist, password = t["scientist"]
    clients = {
        "data scientist": _client(stack, scientist, password),
        "reviewer": _client(stack, "reviewer"),
        "endpoint": _client(stack, "endpoint"),
        "pipeline": _client(stack, "pipeline"),
        "anonymous": _client(stack, None),
        "wrong password": _client(stack, "reviewer", "not-the-reviewer-password"),
    }
    before = {r["seq"] for r in fetch_rows(stack.mlflow_url)}
    attempts = refused = 0
    moves_sent: list[str] = []
    accepted = []
    try:
        for _ in range(ROUNDS):
            for role, client in clients.items():
                for kind, requests in (("move", _moves(t)), ("forge", _forgeries(t))):
                    for method, path, body in requests:
                        if _consented(role, kind, path, body, t):
                            continue
                        status = _send(client, method, path, body)
                        attempts += 1
                        if status in (401, 403, 404, 405):
                            refused += 1
                        else:
                            accepted.append((role, method, path, status))
                        if kind == "move":
                            moves_sent.append(role)
    finally:
        for client in clients.values():
            client.close()
    # Prefect's API: nobody without its login, MLflow passwords included.
    prefect_logins = {
        "anonymous": None,
        "reviewer's MLflow login": (
            "reviewer",
            manager.account_env(stack, "reviewer")["MLFLOW_TRACKING_PASSWORD"],
        ),
        "pipeline's MLflow login": (
            "pipeline",
            manager.account_env(stack, "pipeline")["MLFLOW_TRACKING_PASSWORD"],
        ),
    }
    for _ in range(ROUNDS):
        for role, login in prefect_logins.items():
            with httpx.Client(base_url=stack.prefect_api_url, auth=login, timeout=10) as http:
                for method, path, body in _prefect_routes(stack):
                    status = _send(http, method, path, body)
                    attempts += 1
                    if status == 401:
                        refused += 1
                    else:
                        accepted.append((f"prefect {role}", method, path, status))
    rows = fetch_rows(stack.mlflow_url)
    new = [r for r in rows if r["seq"] not in before and r["model"] == t["model"]]
    audited = sum(1 for r in new if r["decision"] == "refused" and r["action"] != "run_ticket")
    # The pipeline's made-up tickets (at creation, and as a late set-tag) reached the
    # server's check: refused and on the record.
    tickets_audited = sum(1 for r in new if r["action"] == "run_ticket")
    assert tickets_audited == ROUNDS * len(PREFIXES) * 2, tickets_audited
    assert all(r["decision"] == "refused" for r in new if r["action"] == "run_ticket")
    figures = {
        "rounds": ROUNDS,
        "roles": len(clients) + len(prefect_logins),
        "attempts": attempts,
        "refused": refused,
        "alias_changing_attempts": len(moves_sent),
        "audited": audited,
        "run_tickets_refused_and_audited": tickets_audited,
        "accepted": accepted,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(figures, indent=2))
    print(
        f"\nhostile sweep: {attempts} attempts by {figures['roles']} roles, {refused} refused, "
        f"{len(moves_sent)} on alias-changing routes, {audited} of them in the audit trail"
    )
    assert accepted == [], accepted
    assert audited == len(moves_sent), (audited, len(moves_sent))
    assert verify_chain(rows) is None
    with _client(stack, "endpoint") as http:
        resolved = http.get(
            "/api/2.0/mlflow/registered-models/alias",
            params={"name": t["model"], "alias": "champion"},
        )
    assert resolved.json()["model_version"]["version"] == t["champion"]


def test_flow_runs_cannot_change_what_the_worker_executes(stack):
    """Even with Prefect's login, a flow run cannot set the command, the environment or
    the folder the worker runs it with: the work pool's base job template fixes them and
    the server refuses other job variables; a deployment updated with them cannot run."""
    from tests.integration.conftest import prefect_http

    with prefect_http(stack) as http:
        deployment = http.get("/deployments/name/retrain-and-deploy/on-demand").json()["id"]
        pool = http.get(f"/work_pools/{stack.work_pool}").json()
        assert pool["base_job_template"]["job_configuration"]["command"] is None
        assert pool["base_job_template"]["variables"]["additionalProperties"] is False
        for variables in (
            {"command": "sh -c 'id > /tmp/pwned'"},
            {"env": {"PYTHONPATH": "/tmp/evil"}},
            {"working_dir": "/tmp"},
        ):
            run = http.post(
                f"/deployments/{deployment}/create_flow_run",
                json={"job_variables": variables, "state": {"type": "SCHEDULED"}},
            )
            assert run.status_code == 422, (variables, run.status_code, run.text)
        # Prefect's server stores a deployment update's job variables unchecked, but no run
        # of that deployment can then be created (and the template has no place for them).
        try:
            patched = http.patch(
                f"/deployments/{deployment}", json={"job_variables": {"command": "id"}}
            )
            assert patched.status_code == 204, patched.text
            run = http.post(
                f"/deployments/{deployment}/create_flow_run",
                json={"state": {"type": "SCHEDULED"}},
            )
            assert run.status_code == 422, (run.status_code, run.text)
        finally:
            restored = http.patch(f"/deployments/{deployment}", json={"job_variables": {}})
            assert restored.status_code == 204, restored.text

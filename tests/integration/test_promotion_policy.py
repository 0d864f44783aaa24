"""The promotion policy, rule by rule, through a real ``mlflow server --app-name onnxflow-auth``.

One MLflow server per backend (SQLite in a temporary folder, and a fresh PostgreSQL
database), with the stack's accounts provisioned as ``make up`` does and a policy file
that guards two models differently. Every request is a real HTTP request as one account
(basic auth); every attempt's audit record is read back from the tracking store.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from onnxflow.errors import StackError
from onnxflow.processes import ProcessRecord, start_process, stop_process, wait_until
from onnxflow.stack import accounts
from onnxflow.stack.audit import read_trail
from onnxflow.stack.manager import MLFLOW_APP
from onnxflow.stack.policy import load_policy
from tests.conftest import run_onnxflow
from tests.integration.conftest import GRANT, PG_ADMIN_URL, edit_grant, free_ports

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ALIAS = "/api/2.0/mlflow/registered-models/alias"
UI_ALIAS = "/ajax-api/2.0/mlflow/registered-models/alias"
CREATE = "/api/2.0/mlflow/model-versions/create"
STORED = "(digest of the stored model.onnx)"  # new_version puts the real digest here
EVIDENCE = {
    "validation": "passed",
    "onnx_sha256": STORED,
    "parity_max_abs": "1e-06",
    "parity_max_rel": "1e-05",
    "metric_name": "accuracy",
    "accuracy": "0.95",
}
POLICY = {
    "models": {
        # Reviewed by its own role, never promoted by the pipeline, four eyes.
        "strict": {"reviewers": "strict-reviewers", "allow_auto": False, "four_eyes": True},
    },
}


def tiny_onnx() -> bytes:
    """A valid one-node ONNX model, different on every call (its doc string)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.doc_string = uuid.uuid4().hex
    return model.SerializeToString()


class Server:
    """The running server, its passwords, and helpers to act as one account."""

    def __init__(
        self, url: str, credentials: accounts.Credentials, backend: str, database_uri: str = ""
    ) -> None:
        self.url, self.credentials, self.backend = url, credentials, backend
        self.database_uri = database_uri  # SQLAlchemy URI of the tracking database
        self.passwords = dict(credentials.passwords)

    def http(self, user: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=(user, self.passwords[user]), timeout=30)

    def call(self, user: str, method: str, path: str, **kwargs) -> httpx.Response:
        with self.http(user) as client:
            return client.request(method, path, **kwargs)

    def ok(self, user: str, method: str, path: str, **kwargs) -> dict:
        response = self.call(user, method, path, **kwargs)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def add_user(self, name: str, roles: tuple[str, ...] = (), edit: tuple[str, ...] = ()) -> str:
        """As the admin: a user, their roles, EDIT on some models (how a team adds people)."""
        self.passwords[name] = f"pw-{uuid.uuid4().hex}"
        self.ok(
            "admin",
            "POST",
            "/api/2.0/mlflow/users/create",
            json={"username": name, "password": self.passwords[name]},
        )
        listed = self.ok(
            "admin", "GET", "/api/3.0/mlflow/roles/list", params={"workspace": "default"}
        )["roles"]
        for role in roles:
            role_id = next(r["id"] for r in listed if r["name"] == role)
            self.ok(
                "admin",
                "POST",
                "/api/3.0/mlflow/roles/assign",
                json={"username": name, "role_id": role_id},
            )
        for model in edit:
            self.ok("admin", "POST", GRANT, json=edit_grant(name, model))
        return name

    def new_model(self, prefix: str = "m", owner: str = "pipeline") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}" if prefix != "strict" else "strict"
        if (
            prefix == "strict"
            and self.call(
                owner, "GET", "/api/2.0/mlflow/registered-models/get", params={"name": name}
            ).status_code
            == 200
        ):
            return name
        self.ok(owner, "POST", "/api/2.0/mlflow/registered-models/create", json={"name": name})
        return name

    def new_version(self, model: str, tags: dict[str, str], user: str = "pipeline") -> str:
        """A run holding a real ``model/model.onnx`` (uploaded as ``user``), registered as
        a version by ``user``; the evidence tags are written by the pipeline, as on the
        stack (``onnx_sha256``: :data:`STORED` becomes the uploaded file's digest)."""
        experiment = self.ok(
            user,
            "POST",
            "/api/2.0/mlflow/experiments/create",
            json={"name": f"e-{uuid.uuid4().hex}"},
        )["experiment_id"]
        run = self.ok(
            user, "POST", "/api/2.0/mlflow/runs/create", json={"experiment_id": experiment}
        )["run"]["info"]["run_id"]
        model_bytes = tiny_onnx()
        put = self.call(
            user, "PUT", f"{self.files(experiment, run)}/model/model.onnx", content=model_bytes
        )
        assert put.status_code == 200, put.text
        digest = hashlib.sha256(b"model.onnx\0" + model_bytes).hexdigest()
        tags = {k: (digest if v == STORED else v) for k, v in tags.items()}
        created = self.ok(
            user,
            "POST",
            CREATE,
            json={
                "name": model,
                "source": f"runs:/{run}/model",
                "run_id": run,
                "tags": [{"key": k, "value": v} for k, v in tags.items() if user in ("pipeline",)],
            },
        )
        version = created["model_version"]["version"]
        if user != "pipeline":
            for key, value in tags.items():
                self.set_tag("pipeline", model, version, key, value)
        return version

    def create_tagged(self, user: str, model: str, key: str, value: str) -> httpx.Response:
        """``user`` asks for a new version of ``model`` (no files) carrying one tag; the
        server's answer as it comes."""
        return self.call(
            user,
            "POST",
            CREATE,
            json={
                "name": model,
                "source": "runs:/0/model",
                "tags": [{"key": key, "value": value}],
            },
        )

    @staticmethod
    def files(experiment: str, run: str) -> str:
        return f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/{run}/artifacts"

    def set_tag(self, user: str, model: str, version: str, key: str, value: str) -> None:
        self.ok(
            user,
            "POST",
            "/api/2.0/mlflow/model-versions/set-tag",
            json={"name": model, "version": version, "key": key, "value": value},
        )

    def set_alias(
        self, user: str, model: str, version: str, alias: str = "champion", path: str = ALIAS
    ) -> httpx.Response:
        return self.call(
            user, "POST", path, json={"name": model, "alias": alias, "version": version}
        )

    def alias(self, model: str, alias: str = "champion") -> str | None:
        response = self.call("endpoint", "GET", ALIAS, params={"name": model, "alias": alias})
        return response.json()["model_version"]["version"] if response.status_code == 200 else None

    def model_version(self, model: str, version: str) -> dict:
        return self.ok(
            "endpoint",
            "GET",
            "/api/2.0/mlflow/model-versions/get",
            params={"name": model, "version": version},
        )["model_version"]

    def run_of(self, model: str, version: str) -> tuple[str, str]:
        """The run a version was registered from, and its experiment: (run id, experiment id)."""
        run_id = self.model_version(model, version)["run_id"]
        run = self.ok("endpoint", "GET", "/api/2.0/mlflow/runs/get", params={"run_id": run_id})
        return run_id, run["run"]["info"]["experiment_id"]

    def tags(self, model: str, version: str) -> dict[str, str]:
        mv = self.model_version(model, version)
        return {t["key"]: t.get("value", "") for t in mv.get("tags", [])}

    def onnxflow(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        """``onnxflow ARGS`` against this server, logged in as the endpoint account."""
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": "endpoint",
            "MLFLOW_TRACKING_PASSWORD": self.passwords["endpoint"],
        }
        return run_onnxflow(*args, cwd=cwd, env=env, timeout_s=120)

    def trail(self, model: str) -> list[dict[str, str]]:
        with pytest.MonkeyPatch.context() as patch:  # the variables are restored after
            patch.setenv("MLFLOW_TRACKING_USERNAME", "endpoint")
            patch.setenv("MLFLOW_TRACKING_PASSWORD", self.passwords["endpoint"])
            return read_trail(model, self.url)


def _postgres_database():
    import psycopg

    name = f"onnxflow_auth_{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(f"{PG_ADMIN_URL}/postgres", connect_timeout=3, autocommit=True)
    conn.execute(f'CREATE DATABASE "{name}"')
    return conn, name


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"auth-{request.param}")
    conn = None
    if request.param == "postgresql":
        try:
            conn, name = _postgres_database()
        except Exception as exc:
            pytest.fail(f"no PostgreSQL at {PG_ADMIN_URL} (set ONNXFLOW_TEST_POSTGRES): {exc}")
        backend = f"postgresql://{PG_ADMIN_URL.split('://', 1)[1]}/{name}"
        auth_db = backend
    else:
        backend = f"sqlite:///{folder / 'mlflow.db'}"
        auth_db = f"sqlite:///{folder / 'auth.db'}"
    policy_path = folder / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(POLICY))
    credentials = accounts.load_credentials(folder / "credentials")
    ini = accounts.write_auth_config(folder / "auth.ini", auth_db)
    accounts.provision(auth_db, credentials, accounts.reviewer_roles(load_policy(policy_path)))
    (port,) = free_ports(1)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "ONNXFLOW_PROMOTION_POLICY": str(policy_path),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials.passwords[accounts.SECRET_KEY],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--workers",
        "1",
        "--app-name",
        MLFLOW_APP,
    ]
    record: ProcessRecord = start_process(
        "mlflow", argv, env, folder / "mlflow.log", url=f"http://127.0.0.1:{port}"
    )
    try:
        wait_until(
            record, lambda: httpx.get(f"{record.url}/health").status_code == 200, 120, "healthy"
        )
        database = backend.replace("postgresql://", "postgresql+psycopg://")
        yield Server(record.url, credentials, request.param, database)
    finally:
        stop_process(record)
        if conn is not None:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()


# --- rule 1: reviewers


def test_a_data_scientist_with_edit_on_the_model_is_refused_champion_naming_the_rule(server):
    model = server.new_model()
    version = server.new_version(model, EVIDENCE)
    alice = server.add_user(f"alice-{uuid.uuid4().hex[:4]}", edit=(model,))

    refused = server.set_alias(alice, model, version)
    assert refused.status_code == 403
    body = refused.json()
    assert body["error_code"] == "PERMISSION_DENIED"
    assert "rule 'reviewers'" in body["message"] and "'reviewers'" in body["message"]
    assert server.alias(model) is None
    # The same request from the UI (its ajax route) gets the same answer.
    ui = server.set_alias(alice, model, version, path=UI_ALIAS)
    assert ui.status_code == 403 and "rule 'reviewers'" in ui.json()["message"]
    # Deleting the alias is a move too.
    assert server.set_alias("reviewer", model, version).status_code == 200
    deleted = server.call(alice, "DELETE", ALIAS, json={"name": model, "alias": "champion"})
    assert deleted.status_code == 403 and "rule 'reviewers'" in deleted.json()["message"]
    assert server.alias(model) == version
    # Aliases the policy does not protect follow MLflow's permissions: EDIT may set them.
    assert server.set_alias(alice, model, version, alias="candidate").status_code == 200


def test_the_endpoint_account_is_read_only_for_aliases(server):
    model = server.new_model()
    version = server.new_version(model, EVIDENCE)
    assert server.set_alias("endpoint", model, version).status_code == 403
    # Not a protected alias, but the endpoint has no EDIT: MLflow's own permission refuses.
    assert server.set_alias("endpoint", model, version, alias="challenger").status_code == 403
    assert server.alias(model, "challenger") is None


def test_the_endpoint_writes_live_evidence_and_nothing_else(server):
    """The shadow's figures and report reach the challenger's version from the read-only
    endpoint account (the serving replicas); any other tag or file stays refused."""
    model = server.new_model()
    version = server.new_version(model, EVIDENCE)
    set_tag = "/api/2.0/mlflow/model-versions/set-tag"
    for key in ("shadow_agreement", "canary_stopped"):
        server.ok(
            "endpoint",
            "POST",
            set_tag,
            json={"name": model, "version": version, "key": key, "value": "0.97"},
        )
    assert server.tags(model, version)["shadow_agreement"] == "0.97"
    for key in ("validation", "accuracy", "audit.champion_set_by"):
        refused = server.call(
            "endpoint",
            "POST",
            set_tag,
            json={"name": model, "version": version, "key": key, "value": "x"},
        )
        assert refused.status_code == 403, key
    assert server.tags(model, version)["validation"] == "passed"
    # A data scientist without EDIT on the model gets no such licence.
    bob = server.add_user(f"bob-{uuid.uuid4().hex[:4]}")
    refused = server.call(
        bob,
        "POST",
        set_tag,
        json={"name": model, "version": version, "key": "shadow_agreement", "value": "1.0"},
    )
    assert refused.status_code == 403

    run_id, experiment = server.run_of(model, version)
    files = f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/{run_id}/artifacts"
    report = server.call("endpoint", "PUT", f"{files}/shadow/report.md", content=b"# shadow\n")
    assert report.status_code == 200, report.text
    listed = server.ok(
        "endpoint",
        "GET",
        "/api/2.0/mlflow/artifacts/list",
        params={"run_id": run_id, "path": "shadow"},
    )
    assert [f["path"] for f in listed["files"]] == ["shadow/report.md"]
    for path in ("model/model.onnx", "shadow/../model/model.onnx", "report.md"):
        put = server.call("endpoint", "PUT", f"{files}/{path}", content=b"x")
        assert put.status_code == 403, path
    other = "0" * 32  # no such run: nothing is written under its name
    put = server.call(
        "endpoint",
        "PUT",
        f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/{other}/artifacts/shadow/report.md",
        content=b"x",
    )
    assert put.status_code == 403


def test_the_pipeline_promotes_where_auto_is_allowed_and_is_refused_where_it_is_not(server):
    model = server.new_model()
    version = server.new_version(model, EVIDENCE)
    assert server.set_alias("pipeline", model, version, alias="challenger").status_code == 200
    assert server.set_alias("pipeline", model, version).status_code == 200
    assert server.alias(model) == version

    strict = server.new_model("strict")
    strict_version = server.new_version(strict, EVIDENCE)
    assert (
        server.set_alias("pipeline", strict, strict_version, alias="challenger").status_code == 200
    )
    refused = server.set_alias("pipeline", strict, strict_version)
    assert refused.status_code == 403
    assert "auto promotion is off for 'strict'" in refused.json()["message"]


def test_a_reviewer_of_another_role_may_not_move_champion_of_a_model_it_does_not_review(server):
    strict = server.new_model("strict")
    version = server.new_version(strict, EVIDENCE)
    refused = server.set_alias("reviewer", strict, version)  # in 'reviewers', not 'strict-...'
    assert refused.status_code == 403
    assert "'strict-reviewers'" in refused.json()["message"]


# --- rule 2: evidence


@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"validation": "failed"}, "validation='failed', expected 'passed'"),
        ({"validation": None}, "no 'validation' tag"),
        ({"onnx_sha256": None}, "no 'onnx_sha256' tag"),
        ({"parity_max_abs": None}, "no 'parity_max_abs' tag"),
        ({"accuracy": None}, "no 'accuracy' tag (its metric_name)"),
    ],
)
def test_a_reviewer_is_refused_a_version_without_the_evidence(server, change, phrase):
    model = server.new_model()
    tags = {k: v for k, v in {**EVIDENCE, **change}.items() if v is not None}
    version = server.new_version(model, tags)
    refused = server.set_alias("reviewer", model, version)
    assert refused.status_code == 403
    message = refused.json()["message"]
    assert "rule 'evidence'" in message and phrase in message
    assert server.alias(model) is None


def test_an_override_reason_lets_a_reviewer_promote_without_evidence_and_is_recorded(server):
    model = server.new_model()
    version = server.new_version(model, {"validation": "failed"})
    reason = "INC-42: validation data was corrupt; parity checked by hand"
    server.ok(
        "reviewer",
        "POST",
        "/api/2.0/mlflow/model-versions/set-tag",
        json={"name": model, "version": version, "key": "promotion_override", "value": reason},
    )
    assert server.set_alias("reviewer", model, version).status_code == 200
    assert server.alias(model) == version
    tags = server.tags(model, version)
    assert tags["audit.champion_set_by"] == "reviewer"
    assert tags["audit.champion_override_reason"] == reason
    # Setting the override is on the record itself, with its reason, then the move.
    override, moved = server.trail(model)
    assert (override["action"], override["user"], override["override_reason"]) == (
        "override",
        "reviewer",
        reason,
    )
    assert (moved["action"], moved["decision"], moved["override_reason"]) == (
        "set_alias",
        "allowed",
        reason,
    )
    # Only the model's reviewers may write an override; nobody may rewrite the evidence.
    dana = server.add_user(f"dana-{uuid.uuid4().hex[:4]}", edit=(model,))
    for user, key in ((dana, "promotion_override"), ("reviewer", "validation")):
        refused = server.call(
            user,
            "POST",
            "/api/2.0/mlflow/model-versions/set-tag",
            json={"name": model, "version": version, "key": key, "value": "passed"},
        )
        assert refused.status_code == 403, (user, key)
    # The override does not make a non-reviewer a reviewer.
    assert server.set_alias("endpoint", model, version).status_code == 403


# --- rule 3: four eyes


def test_four_eyes_a_reviewer_may_not_promote_a_version_they_registered(server):
    strict = server.new_model("strict")
    bob = server.add_user(f"bob-{uuid.uuid4().hex[:4]}", roles=("strict-reviewers",))
    carol = server.add_user(f"carol-{uuid.uuid4().hex[:4]}", roles=("strict-reviewers",))
    version = server.new_version(strict, EVIDENCE, user=bob)
    assert server.tags(strict, version)["registered_by"] == bob  # stamped by the server

    refused = server.set_alias(bob, strict, version)
    assert refused.status_code == 403
    assert "rule 'four_eyes'" in refused.json()["message"]
    assert server.set_alias(carol, strict, version).status_code == 200
    assert server.alias(strict) == version


TICKETS = "/api/2.0/onnxflow/run-tickets"


def test_run_ticket_the_server_stamps_who_asked_and_four_eyes_compares_against_them(server):
    strict = server.new_model("strict")
    dana = server.add_user(f"dana-{uuid.uuid4().hex[:4]}", roles=("strict-reviewers",))
    erin = server.add_user(f"erin-{uuid.uuid4().hex[:4]}", roles=("strict-reviewers",))
    issued = server.ok(dana, "POST", TICKETS, json={"model": strict})
    assert issued["user"] == dana and issued["model"] == strict
    ticket = issued["ticket"]

    # The pipeline registers the run's version presenting the ticket: the server writes
    # requested_by (the pipeline cannot choose it) and drops the ticket tag.
    version = server.new_version(strict, {**EVIDENCE, "run_ticket": ticket})
    tags = server.tags(strict, version)
    assert tags["requested_by"] == dana and tags["registered_by"] == "pipeline"
    assert "run_ticket" not in tags

    # Used once: presenting it again is refused (and audited), so is a made-up one.
    for presented, why in ((ticket, "already used"), ("made-up", "unknown run ticket")):
        again = server.create_tagged("pipeline", strict, "run_ticket", presented)
        assert again.status_code == 403 and why in again.json()["message"], again.text

    # Four eyes: the reviewer who asked for the version may not promote it; another may.
    refused = server.set_alias(dana, strict, version)
    assert refused.status_code == 403 and "rule 'four_eyes'" in refused.json()["message"]
    assert server.set_alias(erin, strict, version).status_code == 200
    assert server.alias(strict) == version

    rows = [r for r in server.trail(strict) if r["action"].startswith("run_ticket")]
    assert [r["user"] for r in rows if r["action"] == "run_ticket_issued"][-1] == dana
    redeemed = [r for r in rows if r["action"] == "run_ticket"]
    assert [r["decision"] for r in redeemed[-3:]] == ["allowed", "refused", "refused"]
    assert redeemed[-3]["to_version"] == version and dana in redeemed[-3]["message"]


def test_run_tickets_cannot_be_forged_borrowed_or_presented_by_others(server):
    model, other = server.new_model(), server.new_model()
    ticket = server.ok("reviewer", "POST", TICKETS, json={"model": model})["ticket"]
    version = server.new_version(model, EVIDENCE)
    # requested_by is the server's alone, on an existing version or a new one.
    forged = server.call(
        "pipeline",
        "POST",
        "/api/2.0/mlflow/model-versions/set-tag",
        json={"name": model, "version": version, "key": "requested_by", "value": "someone"},
    )
    assert forged.status_code == 403 and "written by the MLflow server" in forged.text
    forged_at_creation = server.create_tagged("pipeline", model, "requested_by", "someone")
    assert forged_at_creation.status_code == 403
    # A ticket is presented by the pipeline only, on a new version of its model only.
    for user, name in (("reviewer", model), ("pipeline", other)):
        refused = server.create_tagged(user, name, "run_ticket", ticket)
        assert refused.status_code == 403, (user, name, refused.text)
    late = server.call(
        "pipeline",
        "POST",
        "/api/2.0/mlflow/model-versions/set-tag",
        json={"name": model, "version": version, "key": "run_ticket", "value": ticket},
    )
    assert late.status_code == 403 and "created only" in late.text
    # The serving replicas' account gets no ticket; nobody without a login does.
    assert server.call("endpoint", "POST", TICKETS, json={"model": model}).status_code == 403
    anonymous = httpx.post(f"{server.url}{TICKETS}", json={"model": model}, timeout=30)
    assert anonymous.status_code == 401
    # Still unused after all that: the pipeline redeems it for the reviewer.
    redeemed = server.new_version(model, {**EVIDENCE, "run_ticket": ticket})
    assert server.tags(model, redeemed)["requested_by"] == "reviewer"


def test_nobody_but_the_server_writes_registered_by_or_audit_tags(server):
    model = server.new_model()
    version = server.new_version(model, EVIDENCE)
    for key in ("registered_by", "audit.champion_set_by"):
        refused = server.call(
            "pipeline",
            "POST",
            "/api/2.0/mlflow/model-versions/set-tag",
            json={"name": model, "version": version, "key": key, "value": "someone-else"},
        )
        assert refused.status_code == 403, key
        assert "written by the MLflow server" in refused.json()["message"]
    forged = server.create_tagged("pipeline", model, "registered_by", "reviewer")
    assert forged.status_code == 403
    assert server.tags(model, version)["registered_by"] == "pipeline"


# --- the audit trail


def test_every_alias_attempt_is_audited_with_who_from_to_decision_and_rule(server, tmp_path):
    model = server.new_model()
    good = server.new_version(model, EVIDENCE)
    bad = server.new_version(model, {"validation": "failed"})
    attempts = [
        ("pipeline", good, "challenger", 200),
        ("reviewer", good, "champion", 200),
        ("endpoint", good, "champion", 403),
        ("reviewer", bad, "champion", 403),
    ]
    for user, version, alias, status in attempts:
        assert server.set_alias(user, model, version, alias=alias).status_code == status
    # The policy allows a reviewer to remove champion; MLflow's permissions do not (EDIT is
    # not DELETE): the policy adds rules, it never lifts MLflow's.
    deleted = server.call("reviewer", "DELETE", ALIAS, json={"name": model, "alias": "champion"})
    assert deleted.status_code == 403
    assert server.alias(model) == good

    rows = server.trail(model)
    got = [
        (r["user"], r["alias"], r["from_version"], r["to_version"], r["decision"], r["rule"])
        for r in rows
    ]
    assert got == [
        ("pipeline", "challenger", "-", good, "allowed", "unprotected"),
        ("reviewer", "champion", "-", good, "allowed", "ok"),
        ("endpoint", "champion", good, good, "refused", "reviewers"),
        ("reviewer", "champion", good, bad, "refused", "evidence"),
        ("reviewer", "champion", good, "-", "refused", "mlflow_403"),
    ]
    assert all(r["time"].endswith("Z") and r["via"] == "api" for r in rows)
    assert "rule 'evidence'" in rows[3]["message"]
    assert server.tags(model, bad)["audit.champion_refused"].endswith("reviewer: rule evidence")

    # `onnxflow audit MODEL` prints the same trail.
    printed = server.onnxflow("audit", model, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 1 + len(got)
    assert "refused" in lines[3] and "endpoint" in lines[3] and "reviewers" in lines[3]
    assert server.passwords["endpoint"] not in printed.stdout + printed.stderr


def test_the_audit_trail_is_the_servers_alone_whatever_an_account_pre_creates(server):
    """Weakness 7: a data scientist pre-created the audit experiment and rewrote it. The
    trail is now a table no route writes: an experiment of that name changes nothing."""
    model = server.new_model()
    dana = server.add_user(f"dana-{uuid.uuid4().hex[:4]}", edit=(model,))
    server.ok(
        dana, "POST", "/api/2.0/mlflow/experiments/create", json={"name": f"onnxflow-audit/{model}"}
    )
    version = server.new_version(model, EVIDENCE)
    assert server.set_alias("reviewer", model, version).status_code == 200
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert server.call(dana, method, "/api/2.0/onnxflow/audit").status_code in (403, 405)
        assert server.call("admin", method, "/api/2.0/onnxflow/audit").status_code == 405
    assert httpx.get(f"{server.url}/api/2.0/onnxflow/audit").status_code == 401
    (row,) = server.trail(model)
    assert (row["user"], row["decision"], row["action"]) == ("reviewer", "allowed", "set_alias")


# --- an attacker's routes (issue 18)


def test_evidence_is_written_by_the_pipeline_alone(server):
    """Weakness 2: evidence tags were ordinary tags any EDIT holder (or a reviewer) wrote."""
    model = server.new_model()
    version = server.new_version(model, {**EVIDENCE, "validation": "failed"})
    dana = server.add_user(f"dana-{uuid.uuid4().hex[:4]}", edit=(model,))
    for user in (dana, "reviewer", "admin", "endpoint"):
        for key, value in (("validation", "passed"), ("onnx_sha256", "00"), ("accuracy", "1")):
            refused = server.call(
                user,
                "POST",
                "/api/2.0/mlflow/model-versions/set-tag",
                json={"name": model, "version": version, "key": key, "value": value},
            )
            assert refused.status_code == 403, (user, key)
        deleted = server.call(
            user,
            "DELETE",
            "/api/2.0/mlflow/model-versions/delete-tag",
            json={"name": model, "version": version, "key": "validation"},
        )
        assert deleted.status_code == 403, user
    assert server.tags(model, version)["validation"] == "failed"
    # A version created with evidence tags by anyone but the pipeline is refused whole.
    forged = server.create_tagged(dana, model, "validation", "passed")
    assert forged.status_code == 403 and "pipeline" in forged.json()["message"]
    # Notes stay free for anyone with EDIT.
    server.set_tag(dana, model, version, "note.why", "looked at it")


def test_a_model_replaced_after_validation_is_refused_by_its_digest(server):
    """The server recomputes onnx_sha256 from the stored model.onnx at promotion; the files
    of a registered run are the pipeline's alone."""
    model = server.new_model()
    version = server.new_version(model, EVIDENCE)
    run_id, experiment = server.run_of(model, version)
    dana = server.add_user(f"dana-{uuid.uuid4().hex[:4]}", edit=(model,))
    server.ok("admin", "POST", GRANT, json=edit_grant(dana, experiment, "experiment"))
    target = f"{server.files(experiment, run_id)}/model/model.onnx"
    assert server.call(dana, "PUT", target, content=tiny_onnx()).status_code == 403
    # Someone who reaches the files anyway (here: the pipeline's own account) swaps them.
    assert server.call("pipeline", "PUT", target, content=tiny_onnx()).status_code == 200
    refused = server.set_alias("reviewer", model, version)
    assert refused.status_code == 403
    assert "cannot be verified" in refused.json()["message"]
    server.set_tag("reviewer", model, version, "promotion_override", "trust me")
    assert server.set_alias("reviewer", model, version).status_code == 403  # no override
    assert server.alias(model) is None


def test_a_model_holding_champion_cannot_be_renamed_deleted_or_staged_away(server):
    """Weaknesses 3 and 7: renames moved champion, its rules and trail between names;
    deleting the version that held champion removed it with no check and no record."""
    model = server.new_model()
    version = server.new_version(model, EVIDENCE)
    assert server.set_alias("reviewer", model, version).status_code == 200
    other = server.new_model()
    attempts = [
        (
            "reviewer",
            "POST",
            "/api/2.0/mlflow/registered-models/rename",
            {"name": model, "new_name": f"{model}-x"},
        ),
        (
            "pipeline",
            "POST",
            "/api/2.0/mlflow/registered-models/rename",
            {"name": model, "new_name": f"{model}-x"},
        ),
        (
            "admin",
            "POST",
            "/ajax-api/2.0/mlflow/registered-models/rename",
            {"name": model, "new_name": other},
        ),
        (
            "pipeline",
            "DELETE",
            "/api/2.0/mlflow/model-versions/delete",
            {"name": model, "version": version},
        ),
        (
            "admin",
            "DELETE",
            "/api/2.0/mlflow/model-versions/delete",
            {"name": model, "version": version},
        ),
        ("admin", "DELETE", "/api/2.0/mlflow/registered-models/delete", {"name": model}),
        (
            "admin",
            "POST",
            "/api/2.0/mlflow/model-versions/transition-stage",
            {
                "name": model,
                "version": version,
                "stage": "Production",
                "archive_existing_versions": False,
            },
        ),
    ]
    for user, method, path, body in attempts:
        refused = server.call(user, method, path, json=body)
        assert refused.status_code == 403, (user, path, refused.text)
        assert (
            "Promotion policy" in refused.json()["message"] or "stage" in refused.json()["message"]
        )
    assert server.alias(model) == version
    rows = server.trail(model)
    got = [(r["action"], r["user"], r["decision"]) for r in rows[1:]]
    assert got == [
        ("rename", "reviewer", "refused"),
        ("rename", "pipeline", "refused"),
        ("rename", "admin", "refused"),
        ("delete_version", "pipeline", "refused"),
        ("delete_version", "admin", "refused"),
        ("delete_model", "admin", "refused"),
        ("transition_stage", "admin", "refused"),
    ]
    # A model without a protected alias, rules or history may be renamed: on the record.
    fresh = server.new_model()
    server.ok(
        "pipeline",
        "POST",
        "/api/2.0/mlflow/registered-models/rename",
        json={"name": fresh, "new_name": f"{fresh}-r"},
    )
    assert [(r["action"], r["decision"]) for r in server.trail(fresh)] == [("rename", "allowed")]


def test_unauthenticated_attempts_are_on_the_record(server):
    model = server.new_model()
    version = server.new_version(model, EVIDENCE)
    body = {"name": model, "alias": "champion", "version": version}
    assert httpx.post(f"{server.url}{ALIAS}", json=body).status_code == 401
    assert (
        httpx.post(
            f"{server.url}{UI_ALIAS}", json=body, auth=("reviewer", "wrong-password-123")
        ).status_code
        == 401
    )
    rows = server.trail(model)
    assert [(r["user"], r["decision"], r["rule"]) for r in rows] == [
        ("(unauthenticated)", "refused", "unauthenticated"),
        ("(unauthenticated: reviewer)", "refused", "unauthenticated"),
    ]


def test_an_alias_onto_a_version_not_yet_created_is_refused_not_let_through(server):
    """Weakness 4: a request for a version that did not exist yet skipped the checks and
    raced the version's creation. Now the check and the change hold the model's lock,
    and a missing version is the policy's refusal."""
    import threading

    model = server.new_model()
    dana = server.add_user(f"dana-{uuid.uuid4().hex[:4]}", edit=(model,))
    server.new_version(model, EVIDENCE)
    landed, stop = [], threading.Event()

    def promote_next() -> None:
        with server.http("reviewer") as client:
            while not stop.is_set():
                for ahead in range(2, 6):
                    response = client.post(
                        ALIAS, json={"name": model, "alias": "champion", "version": str(ahead)}
                    )
                    if response.status_code == 200:
                        landed.append(str(ahead))

    thread = threading.Thread(target=promote_next)
    thread.start()
    try:
        for _ in range(4):  # unvalidated versions (a data scientist's), created meanwhile
            server.new_version(model, {}, user=dana)
    finally:
        stop.set()
        thread.join()
    assert landed == [], f"champion landed on unvalidated versions {landed}"
    assert server.alias(model) is None
    missing = [r for r in server.trail(model) if r["rule"] == "no_version"]
    assert missing, "a request for a version that did not exist is on the record"


def test_the_endpoint_account_has_least_privilege(server):
    """Weakness 6: the endpoint created experiments, models, versions and files."""
    model = server.new_model()
    version = server.new_version(model, EVIDENCE)
    attempts = [
        ("POST", "/api/2.0/mlflow/experiments/create", {"name": f"x-{uuid.uuid4().hex}"}),
        ("POST", "/api/2.0/mlflow/runs/create", {"experiment_id": "0"}),
        ("POST", "/api/2.0/mlflow/registered-models/create", {"name": f"x-{uuid.uuid4().hex}"}),
        ("POST", "/api/2.0/mlflow/model-versions/create", {"name": model, "source": "runs:/0/m"}),
        ("POST", ALIAS, {"name": model, "alias": "challenger", "version": version}),
        (
            "DELETE",
            "/api/2.0/mlflow/model-versions/delete-tag",
            {"name": model, "version": version, "key": "shadow_x"},
        ),
        (
            "POST",
            "/api/2.0/mlflow/registered-models/set-tag",
            {"name": model, "key": "k", "value": "v"},
        ),
    ]
    for method, path, body in attempts:
        assert server.call("endpoint", method, path, json=body).status_code == 403, path
    # What it needs still works: reads (also those sent as POST) and the live evidence.
    assert (
        server.call(
            "endpoint", "POST", "/api/2.0/mlflow/runs/search", json={"experiment_ids": ["0"]}
        ).status_code
        == 200
    )
    server.set_tag("endpoint", model, version, "shadow_agreement", "0.99")


def test_audit_verify_detects_a_tampered_row(server, tmp_path):
    """Weakness 7: the trail was editable. Edit a row in the database, as someone with
    access to it would: `onnxflow audit --verify` fails naming the row; restored, it passes."""
    import sqlalchemy as sa

    model = server.new_model()
    version = server.new_version(model, EVIDENCE)
    assert server.set_alias("endpoint", model, version).status_code == 403

    def verify() -> subprocess.CompletedProcess:
        return server.onnxflow("audit", model, "--verify", cwd=tmp_path)

    intact = verify()
    assert intact.returncode == 0, intact.stderr
    assert "audit chain intact" in intact.stdout
    (row,) = server.trail(model)
    engine = sa.create_engine(server.database_uri)
    update = sa.text("UPDATE onnxflow_audit SET decision = :d WHERE seq = :s")
    try:
        with engine.begin() as conn:
            conn.execute(update, {"d": "allowed", "s": row["seq"]})
        tampered = verify()
        assert tampered.returncode == 1
        assert f"row {row['seq']} was altered" in tampered.stderr
    finally:
        with engine.begin() as conn:
            conn.execute(update, {"d": "refused", "s": row["seq"]})
        engine.dispose()
    assert verify().returncode == 0


# --- logins


def test_a_wrong_password_is_a_clear_error_naming_the_account(server):
    check_password = accounts.Credentials(
        folder=server.credentials.folder, passwords={**server.passwords, "endpoint": "x" * 16}
    )
    accounts.check_login(server.url, server.credentials, "endpoint")  # the right one passes
    with pytest.raises(StackError, match="refuses the password of the 'endpoint' account"):
        accounts.check_login(server.url, check_password, "endpoint")
    assert httpx.get(f"{server.url}/api/2.0/mlflow/registered-models/search").status_code == 401


@pytest.mark.parametrize(
    "login, phrase",
    [
        (
            {
                "MLFLOW_TRACKING_USERNAME": "endpoint",
                "MLFLOW_TRACKING_PASSWORD": "not-the-password",
            },
            "refuses the login of MLFLOW_TRACKING_USERNAME='endpoint'",
        ),
        ({}, "refuses no login (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"),
    ],
)
def test_the_endpoint_stops_at_start_up_with_a_clear_error_on_a_refused_login(
    server,
    tmp_path,
    login,
    phrase,
):
    (port,) = free_ports(1)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ONNXFLOW_"))},
        **login,
        "MLFLOW_TRACKING_URI": server.url,
        "ONNXFLOW_SERVE_MODEL": "m@champion",
        "ONNXFLOW_SERVE_PORT": str(port),
        "ONNXFLOW_SERVE_CACHE_DIR": str(tmp_path),
    }
    ended = subprocess.run(
        [sys.executable, "-m", "onnxflow.serving"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ended.returncode == 1
    assert phrase in ended.stderr, ended.stderr
    assert "not-the-password" not in ended.stderr + ended.stdout


def test_auto_promotion_refused_by_the_policy_leaves_the_version_for_a_reviewer(
    server,
    monkeypatch,
):
    from onnxflow.config import PromoteConfig
    from onnxflow.errors import RegistryError
    from onnxflow.promote import promote
    from onnxflow.registration import set_alias

    strict = server.new_model("strict")
    version = server.new_version(strict, {**EVIDENCE, "accuracy": "0.999"})  # beats champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.passwords["pipeline"])
    champion_before = server.alias(strict)
    decision = promote(strict, [version], PromoteConfig(mode="auto"))
    assert decision.decision == "awaiting_review"
    assert "rule 'reviewers'" in decision.reason and "auto promotion is off" in decision.reason
    assert server.alias(strict) == champion_before
    assert server.alias(strict, "challenger") == version
    # `onnxflow promote` (set_alias) says the rule instead of a traceback.
    with pytest.raises(RegistryError, match="rule 'reviewers'"):
        set_alias(strict, "champion", version)


def test_a_version_the_pipeline_registers_is_verified_and_promoted(server, monkeypatch, tmp_path):
    """The digest check on the real path: ``register_onnx`` logs the model (an MLflow
    logged model, ``models:/m-...``) as the pipeline; the server recomputes its digest."""
    import numpy as np

    from onnxflow.registration import register_onnx

    model_path = tmp_path / "model.onnx"
    model_path.write_bytes(tiny_onnx())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.passwords["pipeline"])
    name = f"real-{uuid.uuid4().hex[:6]}"
    experiment = server.ok(
        "pipeline", "POST", "/api/2.0/mlflow/experiments/create", json={"name": name}
    )["experiment_id"]
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    evidence = {k: v for k, v in EVIDENCE.items() if k != "onnx_sha256"}
    registered = register_onnx(
        model_path,
        model_name=name,
        input_example=np.zeros((1, 4), dtype=np.float32),
        tags=evidence,
        aliases=("challenger",),
    )
    promoted = server.set_alias("reviewer", name, registered.version)
    assert promoted.status_code == 200, promoted.text
    assert server.alias(name) == registered.version

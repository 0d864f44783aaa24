"""``mlflow server --app-name onnxflow-auth``: MLflow's basic-auth app plus the promotion policy.

The app is MLflow's own ``basic-auth`` app (users, passwords, permissions, roles) with
one more ``before_request`` hook, registered ahead of basic-auth's. It recognises a
request by the MLflow handler Flask routed it to (``request.endpoint``), so every path
variant of a route (``/api/2.0``, ``/api/3.0``, ``/ajax-api`` the UI calls) is judged alike:

* **everything that changes what NAME@ALIAS resolves to** goes through the policy: set
  and delete an alias (:func:`onnxflow.stack.policy.decide`, plus the digest of the
  stored ``model.onnx`` recomputed against the version's ``onnx_sha256``); renaming a
  model that holds a protected alias or has rules of its own, or into a name that has
  (refused: carrying rules and trail across names is what let a rename swap champions);
  deleting a version that a protected alias points at, or a model that holds one
  (refused: move the alias first, through the policy); stage transitions (refused:
  ``models:/NAME/Production`` would resolve outside the policy);
* **atomic per model**: each such request, and every request that creates a version or
  writes a version tag, holds the model's lock (:class:`ModelLocks`, an ``flock`` shared
  by the server's workers) from the check until the response, so no version appears and
  no evidence changes between the check and the change;
* **evidence only from the pipeline**: version tags are the pipeline accounts' to write
  (:func:`onnxflow.stack.policy.tag_writers`), except the server's own (``registered_by``,
  ``audit.*``: nobody), the serving replicas' (``shadow_*``, ``canary_*``), the override
  reason (the model's reviewers; audited) and ``note.*`` (MLflow's EDIT); files of a run
  that a version was registered from are the pipeline's alone;
* **least privilege** for the serving replicas' account (``live_evidence_accounts``): it
  reads, writes the live evidence (tags ``shadow_*``/``canary_*``, files under
  ``shadow/`` of an existing run) and nothing else;
* after a new model version is created, the server tags it ``registered_by`` with the
  account that created it, and ``requested_by`` with the person behind a run ticket the
  pipeline presented (:mod:`onnxflow.stack.tickets`; issued at
  ``POST /api/2.0/onnxflow/run-tickets``); the four-eyes rule reads both.

Every such request, allowed or refused, authenticated or not, is appended by
:mod:`onnxflow.stack.audit` to the hash-chained table once the response is known; the
chain is served read-only at ``GET /api/2.0/onnxflow/audit``.

Configuration: ``MLFLOW_AUTH_CONFIG_PATH`` (basic-auth's ini), ``ONNXFLOW_PROMOTION_POLICY``
(the policy's YAML file; unset: the defaults of :class:`PromotionPolicy`),
``ONNXFLOW_POLICY_LOCK_DIR`` (the lock files; default: a folder in the system's temporary
directory named after the backend store, so all workers of one server share it).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from onnxflow.stack import audit, tickets
from onnxflow.stack.policy import (
    LIVE_EVIDENCE_FOLDER,
    REGISTERED_BY,
    REQUESTED_BY,
    Decision,
    PromotionPolicy,
    decide,
    is_live_evidence_tag,
    load_policy,
    tag_writers,
)

log = logging.getLogger(__name__)

POLICY_ENV = "ONNXFLOW_PROMOTION_POLICY"
LOCK_DIR_ENV = "ONNXFLOW_POLICY_LOCK_DIR"
#: Handlers (Flask endpoint names) that change what an alias resolves to.
SET_ALIAS, DELETE_ALIAS = "_set_registered_model_alias", "_delete_registered_model_alias"
RENAME, DELETE_MODEL = "_rename_registered_model", "_delete_registered_model"
DELETE_VERSION, TRANSITION = "_delete_model_version", "_transition_stage"
CREATE_VERSION = "_create_model_version"
SET_TAG, DELETE_TAG = "_set_model_version_tag", "_delete_model_version_tag"
MOVES = {
    SET_ALIAS: "set_alias",
    DELETE_ALIAS: "delete_alias",
    RENAME: "rename",
    DELETE_MODEL: "delete_model",
    DELETE_VERSION: "delete_version",
    TRANSITION: "transition_stage",
}
AUDIT_ROUTE = "onnxflow_audit"
TICKET_ROUTE = "onnxflow_run_tickets"
GUARDED = {*MOVES, CREATE_VERSION, SET_TAG, DELETE_TAG}
#: A write through the artifact proxy into a run: .../EXPERIMENT/RUN/artifacts/PATH
ARTIFACT_WRITE = re.compile(
    r"/mlflow-artifacts/(?P<op>artifacts|mpu/create|mpu/complete|mpu/abort)/"
    r"(?P<experiment>[^/]+)/(?P<run>[0-9a-f]{32})/artifacts/(?P<path>.+)$"
)
READ_METHODS = ("GET", "HEAD", "OPTIONS")


def create_app(app=None):
    """The factory ``mlflow server --app-name onnxflow-auth`` (uvicorn ``--factory``) calls."""
    from mlflow.server import app as mlflow_flask_app
    from mlflow.server.auth import create_app as basic_auth_app

    flask_app = app or mlflow_flask_app
    guard = AliasGuard(load_policy(os.environ.get(POLICY_ENV) or None))
    flask_app.before_request(guard.before_request)  # ahead of basic-auth's own hook
    served = basic_auth_app(flask_app)
    _let_live_evidence_through(flask_app)
    flask_app.after_request(guard.after_request)
    flask_app.teardown_request(guard.teardown_request)
    flask_app.add_url_rule(audit.ROUTE, AUDIT_ROUTE, guard.audit_rows, methods=["GET"])
    flask_app.add_url_rule(tickets.ROUTE, TICKET_ROUTE, guard.issue_ticket, methods=["POST"])
    if hasattr(served, "middleware"):  # FastAPI under uvicorn: it serves the artifact proxy
        served.middleware("http")(guard.artifact_writes)
    log.warning(
        "onnxflow promotion policy on: protected aliases %s",
        ", ".join(guard.policy.protected_aliases),
    )
    return served


def _let_live_evidence_through(flask_app) -> None:
    """Wrap basic-auth's ``before_request`` hook: it is skipped for a request the guard
    has judged itself (``g.onnxflow_live_evidence``): live evidence from a serving
    replica, a read of the audit trail."""
    from flask import g
    from mlflow.server import auth

    hooks = flask_app.before_request_funcs.setdefault(None, [])
    basic_auth_hook = auth._before_request
    if basic_auth_hook not in hooks:
        raise RuntimeError("MLflow's basic-auth hook is not registered: cannot wrap it")

    def before_request():
        if g.get("onnxflow_live_evidence"):
            return None
        return basic_auth_hook()

    hooks[hooks.index(basic_auth_hook)] = before_request


def _forbidden(message: str, status: int = 403, code: str = "PERMISSION_DENIED"):
    from flask import jsonify

    response = jsonify({"error_code": code, "message": message})
    response.status_code = status
    return response


class ModelLocks:
    """One ``flock`` per registered model (and one for the audit chain), shared by every
    worker process of the server: the check and the change happen under it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    @classmethod
    def for_server(cls) -> ModelLocks:
        if os.environ.get(LOCK_DIR_ENV):
            return cls(Path(os.environ[LOCK_DIR_ENV]))
        store = os.environ.get("_MLFLOW_SERVER_FILE_STORE", "default")
        tag = hashlib.sha256(store.encode()).hexdigest()[:16]
        return cls(Path(tempfile.gettempdir()) / f"onnxflow-policy-{os.getuid()}-{tag}")

    def acquire(self, key: str) -> int:
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def release(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class AliasGuard:
    """The Flask hooks: judge, lock, audit; the artifact proxy's middleware."""

    def __init__(self, policy: PromotionPolicy, locks: ModelLocks | None = None) -> None:
        self.policy = policy
        self.locks = locks or ModelLocks.for_server()

    # --- before: authenticate, lock, judge

    def before_request(self):
        from flask import g, request

        handler = request.endpoint
        if handler == AUDIT_ROUTE:
            return self._audit_reader()
        live_user = self._live_user_write(handler)
        if live_user is not None:
            return live_user
        if handler == TICKET_ROUTE:  # any authenticated person (not the replicas: above)
            return self._audit_reader()
        if handler not in GUARDED:
            return None
        from mlflow.server.auth import authenticate_request, store
        from werkzeug.datastructures import Authorization

        message = self._message(handler)
        model = getattr(message, "name", "") or ""
        via = "ui" if request.path.startswith("/ajax-api") else "api"
        authorization = authenticate_request()
        if not isinstance(authorization, Authorization):
            if handler in MOVES:  # an unauthenticated attempt is on the record too
                claimed = request.authorization.username if request.authorization else None
                g.onnxflow_attempt = self._attempt(
                    handler, message, f"(unauthenticated{': ' + claimed if claimed else ''})"
                )
                g.onnxflow_verdict = Decision(allowed=False, rule="ok", message="no login")
                g.onnxflow_unauthenticated = True
            return authorization  # basic-auth's 401
        user = store.get_user(authorization.username)
        names = {model, getattr(message, "new_name", "") or ""} - {""}
        g.onnxflow_locks = [self.locks.acquire(f"model:{n}") for n in sorted(names)]
        if handler == SET_ALIAS or handler == DELETE_ALIAS:
            return self._judge_alias(user, message, via)
        if handler in MOVES:
            return self._judge_move(user, handler, message, via)
        return self._judge_tags(user, handler, message, via)

    def _audit_reader(self):
        """The trail's read route: any authenticated account (basic-auth, failing closed on
        a route it does not know, is skipped for it)."""
        from flask import g
        from mlflow.server.auth import authenticate_request
        from werkzeug.datastructures import Authorization

        authorization = authenticate_request()
        if not isinstance(authorization, Authorization):
            return authorization
        g.onnxflow_live_evidence = True  # basic-auth's check skipped: judged here
        return None

    def _message(self, handler: str):
        from mlflow.protos import model_registry_pb2 as pb
        from mlflow.server.handlers import _get_request_message

        proto = {
            SET_ALIAS: pb.SetRegisteredModelAlias,
            DELETE_ALIAS: pb.DeleteRegisteredModelAlias,
            RENAME: pb.RenameRegisteredModel,
            DELETE_MODEL: pb.DeleteRegisteredModel,
            DELETE_VERSION: pb.DeleteModelVersion,
            TRANSITION: pb.TransitionModelVersionStage,
            CREATE_VERSION: pb.CreateModelVersion,
            SET_TAG: pb.SetModelVersionTag,
            DELETE_TAG: pb.DeleteModelVersionTag,
        }[handler]
        try:
            return _get_request_message(proto())
        except Exception:
            return proto()

    def _attempt(self, handler: str, message, user: str, current: str | None = None):
        action = MOVES.get(handler, "evidence")
        version = getattr(message, "version", "") or None
        alias = getattr(message, "alias", "") or ""
        if handler == RENAME:
            alias, version = "", None
        return {
            "model": getattr(message, "name", "") or "-",
            "alias": alias,
            "user": user,
            "from_version": current,
            "to_version": version,
            "action": action,
            "via": "ui" if _path().startswith("/ajax-api") else "api",
            "protected": alias in self.policy.protected_aliases,
        }

    def _live_user_write(self, handler: str | None):
        """The serving replicas' account writes its live evidence and nothing else."""
        from flask import request

        if request.method in READ_METHODS or not request.authorization:
            return None
        username = request.authorization.username
        if username not in self.policy.live_evidence_accounts:
            return None
        if handler is None or handler in MOVES or handler == SET_TAG:
            return None  # no such route; or judged (and audited) below
        if handler.startswith(("_search", "_get")):
            return None  # reads sent as POST
        return _forbidden(
            f"Least privilege: {username!r} (a serving replica's account) may read, and "
            f"write the live evidence (version tags shadow_*/canary_*, files under "
            f"{LIVE_EVIDENCE_FOLDER} of a run), nothing else."
        )

    def _judge_alias(self, user, message, via: str):
        from flask import g, request
        from mlflow.server.auth import store
        from mlflow.server.handlers import _get_model_registry_store

        setting = request.endpoint == SET_ALIAS
        model, alias = message.name, message.alias
        version = message.version if setting else None
        if not model or not alias or (setting and not version):
            return None  # MLflow's handler answers the malformed request
        registry = _get_model_registry_store()
        current = _alias_version(registry, model, alias)
        tags = _version_tags(registry, model, version) if version is not None else None
        roles = {r.name for r in store.list_user_roles(user.id)}
        decision = decide(
            self.policy,
            model=model,
            alias=alias,
            version=version,
            user=user.username,
            is_admin=user.is_admin,
            roles=roles,
            version_tags=tags,
        )
        if decision.allowed and version is not None and alias in self.policy.protected_aliases:
            decision = self._check_digest(registry, model, version, tags, decision)
        g.onnxflow_attempt = {
            **self._attempt(request.endpoint, message, user.username, current),
            "via": via,
        }
        g.onnxflow_verdict = decision
        if decision.allowed:
            return None  # MLflow's own permission check and handler come next
        log.warning("refused: %s", decision.message)
        if decision.rule == "no_version":
            return _forbidden(decision.message, 404, "RESOURCE_DOES_NOT_EXIST")
        return _forbidden(decision.message)

    def _check_digest(self, registry, model, version, tags, decision: Decision) -> Decision:
        """The version's ``onnx_sha256`` against its stored files, recomputed here: a
        model replaced after validation is refused, override or not."""
        wanted = (tags or {}).get("onnx_sha256")
        if not wanted:
            return decision  # the evidence rule already judged its absence
        try:
            found = stored_digest(registry.get_model_version(model, version))
        except Exception as exc:
            found, problem = None, f"the server could not read its model.onnx ({exc})"
        else:
            problem = f"its stored model.onnx has sha256 {found}, the tag says {wanted}"
        if found == wanted:
            return decision
        return Decision(
            allowed=False,
            rule="evidence",
            message=(
                f"Promotion policy, rule 'evidence': {model!r} version {version} cannot be "
                f"verified: {problem}. The files are not the ones validated; no override "
                f"lifts this."
            ),
        )

    def _judge_move(self, user, handler: str, message, via: str):
        """Rename, delete version, delete model, transition stage: refused while they
        would change what a protected alias resolves to; audited either way."""
        from flask import g
        from mlflow.server.handlers import _get_model_registry_store

        registry = _get_model_registry_store()
        model = message.name
        held = _protected_aliases(registry, model, self.policy.protected_aliases)
        g.onnxflow_attempt = {**self._attempt(handler, message, user.username), "via": via}
        refusal = None
        if handler == TRANSITION:
            refusal = (
                "stages",
                "onnxflow promotes with aliases; a stage (models:/NAME/STAGE) would "
                "resolve outside the promotion policy, so stage transitions are refused.",
            )
        elif handler == RENAME:
            new = message.new_name
            ruled = [n for n in (model, new) if n in self.policy.models]
            history = [n for n in (model, new) if n and _has_trail(n)]
            if held or ruled or history:
                why = "; ".join(
                    [f"{model!r} holds {', '.join(held.values())}"] * bool(held)
                    + [f"{', '.join(map(repr, ruled))} has rules of its own"] * bool(ruled)
                    + [f"{', '.join(map(repr, history))} has an audit trail"] * bool(history)
                )
                refusal = (
                    "rename",
                    f"Promotion policy, rule 'rename': renaming {model!r} to {new!r} is "
                    f"refused ({why}): a name's protected aliases, rules and trail do not "
                    f"move between names. Create a new model instead.",
                )
        elif handler == DELETE_VERSION and message.version in held:
            refusal = (
                "alias_holder",
                f"Promotion policy, rule 'alias_holder': {model!r} version "
                f"{message.version} holds {held[message.version]}; move it through the "
                f"policy before deleting the version.",
            )
        elif handler == DELETE_MODEL and held:
            refusal = (
                "alias_holder",
                f"Promotion policy, rule 'alias_holder': {model!r} holds "
                f"{', '.join(held.values())}; move it through the policy before deleting "
                f"the model.",
            )
        if refusal is None:
            g.onnxflow_verdict = Decision(
                allowed=True, rule="ok", message=f"{user.username}: {MOVES[handler]}"
            )
            return None
        g.onnxflow_verdict = Decision(allowed=False, rule="ok", message=refusal[1])
        g.onnxflow_rule = refusal[0]
        return _forbidden(refusal[1])

    def _judge_tags(self, user, handler: str, message, via: str):
        """Version tags by writer (:func:`tag_writers`); the override is audited."""
        from flask import g, request
        from mlflow.server.auth import store

        if handler == CREATE_VERSION:
            keys = [t.key for t in message.tags]
        else:
            keys = [message.key]
        roles = {r.name for r in store.list_user_roles(user.id)}
        reviewers = self.policy.rules_for(message.name).reviewers
        refused = []
        for key in keys:
            writer = tag_writers(self.policy, key)
            if writer == "server":
                refused.append((key, "the MLflow server itself (who registered it, the audit)"))
            elif writer == "live" and user.username in self.policy.live_evidence_accounts:
                continue
            elif writer == "reviewers" and not (reviewers in roles or user.is_admin):
                refused.append((key, f"members of the role {reviewers!r} (an audited reason)"))
            elif writer == "pipeline" and user.username not in self.policy.pipeline_accounts:
                refused.append((key, "the pipeline accounts (it is validation evidence)"))
        if refused:
            text = "; ".join(f"{k!r} is written by {who}" for k, who in refused)
            return _forbidden(f"Version tag refused for {user.username!r}: {text}.")
        if user.username in self.policy.live_evidence_accounts:
            if handler != SET_TAG or request.method != "POST" or not is_live_evidence_tag(keys[0]):
                return _forbidden(
                    f"Least privilege: {user.username!r} writes only shadow_*/canary_* tags."
                )
            g.onnxflow_live_evidence = True
        if tickets.RUN_TICKET_TAG in keys:
            refusal = self._redeem(user, handler, message, via)
            if refusal is not None:
                return refusal
        if handler == CREATE_VERSION:
            g.onnxflow_stamp_registered_by = user.username
        if self.policy.override_tag in keys:
            value = getattr(message, "value", "") if handler == SET_TAG else ""
            g.onnxflow_attempt = {
                **self._attempt(handler, message, user.username),
                "action": "override" if value else "override_removed",
                "via": via,
            }
            g.onnxflow_verdict = Decision(
                allowed=True,
                rule="ok",
                message=f"{user.username} set the evidence override",
                override_reason=value or None,
            )
        return None

    def _redeem(self, user, handler: str, message, via: str):
        """A run ticket presented by the pipeline on a new version: the server redeems
        it and will stamp ``requested_by`` itself; refused (and audited) otherwise."""
        from flask import g
        from mlflow.server.handlers import _get_tracking_store

        ticket = next(
            (t.value for t in getattr(message, "tags", []) if t.key == tickets.RUN_TICKET_TAG),
            "",
        )
        if handler != CREATE_VERSION:
            asker, why = None, "a run ticket is presented when the version is created only"
        else:
            try:
                asker, why = tickets.redeem(_get_tracking_store().engine, ticket, message.name)
            except Exception as exc:  # fail closed
                asker, why = None, f"the server could not check the ticket ({exc})"
        g.onnxflow_attempt = {
            **self._attempt(handler, message, user.username),
            "action": "run_ticket",
            "via": via,
            "protected": False,
        }
        if asker is None:
            text = f"Run ticket refused for {user.username!r}: {why}."
            g.onnxflow_verdict = Decision(allowed=False, rule="ok", message=text)
            g.onnxflow_rule = "run_ticket"
            return _forbidden(text)
        g.onnxflow_verdict = Decision(
            allowed=True, rule="ok", message=f"{REQUESTED_BY}={asker} (ticket redeemed)"
        )
        g.onnxflow_requested_by = (asker, ticket)
        return None

    def issue_ticket(self):
        """``POST /api/2.0/onnxflow/run-tickets`` ``{"model": NAME}``: a single-use ticket
        bound to the authenticated caller and the model (audited)."""
        from flask import jsonify, request
        from mlflow.server.handlers import _get_tracking_store

        user = request.authorization.username
        body = request.get_json(silent=True) or {}
        model = str(body.get("model") or "")
        if not model:
            return _forbidden(
                "give the model the run will register", 400, "INVALID_PARAMETER_VALUE"
            )
        engine = _get_tracking_store().engine
        ticket, expires = tickets.issue(engine, user, model, self.policy.run_ticket_ttl_s)
        record = audit.AliasAttempt(
            model=model,
            alias="",
            user=user,
            from_version=None,
            to_version=None,
            decision="allowed",
            rule="ok",
            message=f"run ticket issued to {user!r} (expires in {self.policy.run_ticket_ttl_s} s)",
            via="ui" if request.path.startswith("/ajax-api") else "api",
            time_ms=int(time.time() * 1000),
            protected=False,
            action="run_ticket_issued",
        )
        fd = self.locks.acquire("audit-chain")
        try:
            audit.record(engine, record)
        finally:
            ModelLocks.release(fd)
        return jsonify({"ticket": ticket, "user": user, "model": model, "expires_ms": expires})

    # --- after: audit what happened, stamp new versions; teardown: unlock

    def after_request(self, response):
        from flask import g

        requested = g.pop("onnxflow_requested_by", None)
        attempt = g.pop("onnxflow_attempt", None)
        if requested is not None and response.status_code != 200:
            _release_ticket(requested[1])  # MLflow refused the version: the ticket stands
        if attempt is not None:
            if requested is not None and response.status_code == 200:
                attempt["to_version"] = str(response.get_json()["model_version"]["version"])
            self._audit(attempt, g.pop("onnxflow_verdict"), g.pop("onnxflow_rule", None), response)
        user = g.pop("onnxflow_stamp_registered_by", None)
        if user is not None and response.status_code == 200:
            self._stamp(user, response, requested[0] if requested else None)
        return response

    def teardown_request(self, _exc=None):
        from flask import g

        for fd in g.pop("onnxflow_locks", []):
            ModelLocks.release(fd)

    def _audit(self, attempt: dict, decision: Decision, rule: str | None, response) -> None:
        from flask import g
        from mlflow.server.handlers import _get_model_registry_store, _get_tracking_store

        if g.pop("onnxflow_unauthenticated", False):
            verdict, rule, message = "refused", "unauthenticated", "no valid login (401)"
        elif response.status_code == 200:
            verdict, rule, message = "allowed", decision.rule, decision.message
        elif not decision.allowed:
            verdict, rule, message = "refused", rule or decision.rule, decision.message
        else:  # the policy let it through; MLflow's permissions or handler refused it
            verdict, rule = "refused", f"mlflow_{response.status_code}"
            message = f"MLflow answered {response.status_code}: {_body_message(response)}"
        protected = attempt.pop("protected")
        record = audit.AliasAttempt(
            **attempt,
            decision=verdict,
            rule=rule,
            message=message,
            override_reason=decision.override_reason if verdict == "allowed" else None,
            time_ms=int(time.time() * 1000),
            protected=protected,
        )
        fd = self.locks.acquire("audit-chain")
        try:
            audit.record(_get_tracking_store().engine, record, _get_model_registry_store())
        except Exception:  # the response stands; the failure is loud in the server's log
            log.exception("could not write the audit record of %s", record)
        finally:
            ModelLocks.release(fd)

    def audit_rows(self):
        """``GET /api/2.0/onnxflow/audit``: the whole chain, for any authenticated account
        (basic-auth's hook has already refused anonymous callers)."""
        from flask import jsonify
        from mlflow.server.handlers import _get_tracking_store

        return jsonify({"rows": audit.read_rows(_get_tracking_store().engine)})

    def _stamp(self, user: str, response, requested_by: str | None = None) -> None:
        from mlflow.entities.model_registry import ModelVersionTag
        from mlflow.server.handlers import _get_model_registry_store

        registry = _get_model_registry_store()
        try:
            version = response.get_json()["model_version"]
            name, number = version["name"], version["version"]
            registry.set_model_version_tag(name, number, ModelVersionTag(REGISTERED_BY, user))
            if requested_by is not None:
                registry.set_model_version_tag(
                    name, number, ModelVersionTag(REQUESTED_BY, requested_by)
                )
                registry.delete_model_version_tag(name, number, tickets.RUN_TICKET_TAG)
        except Exception:
            log.exception("could not stamp the new model version (%s, %s)", user, requested_by)

    # --- the artifact proxy (FastAPI): live evidence files, frozen registered runs

    async def artifact_writes(self, request, call_next):
        """Writes through the artifact proxy: a serving replica's shadow report (written by
        the proxy's own handler), nothing else from that account; a run a version was
        registered from is the pipeline's alone. Everything else goes on to basic-auth."""
        if request.method in READ_METHODS or "/mlflow-artifacts/" not in request.url.path:
            return await call_next(request)
        import asyncio

        from fastapi.responses import JSONResponse
        from mlflow.server.auth import _authenticate_fastapi_request

        user = await asyncio.to_thread(_authenticate_fastapi_request, request)
        if user is None:
            return await call_next(request)  # basic-auth answers 401
        write = ARTIFACT_WRITE.search(request.url.path)
        name = user.username
        if name in self.policy.live_evidence_accounts:
            if (
                write is not None
                and request.method == "PUT"
                and write["op"] == "artifacts"
                and await asyncio.to_thread(self._is_live_evidence_file, write)
            ):
                from mlflow.server.artifact_router import upload_artifact

                relative = request.url.path.partition("/mlflow-artifacts/artifacts/")[2]
                return await upload_artifact(relative, request)
            return JSONResponse(
                {
                    "error_code": "PERMISSION_DENIED",
                    "message": f"Least privilege: {name!r} writes files only under "
                    f"{LIVE_EVIDENCE_FOLDER} of an existing run.",
                },
                status_code=403,
            )
        if (
            write is not None
            and name not in self.policy.pipeline_accounts
            and await asyncio.to_thread(_is_registered_run, write["run"])
        ):
            return JSONResponse(
                {
                    "error_code": "PERMISSION_DENIED",
                    "message": f"Run {write['run']} is the source of a registered model "
                    f"version: its files (the model, the validation report) are written "
                    f"by the pipeline accounts only; refused for {name!r}.",
                },
                status_code=403,
            )
        return await call_next(request)

    def _is_live_evidence_file(self, upload: re.Match) -> bool:
        """A file under shadow/ in a run that exists in that experiment."""
        from mlflow.server.handlers import _get_tracking_store

        relative = upload["path"]
        if not relative.startswith(LIVE_EVIDENCE_FOLDER) or ".." in relative.split("/"):
            return False
        try:
            run = _get_tracking_store().get_run(upload["run"])
        except Exception:
            return False
        return run.info.experiment_id == upload["experiment"]


def _release_ticket(ticket: str) -> None:
    from mlflow.server.handlers import _get_tracking_store

    try:
        tickets.release(_get_tracking_store().engine, ticket)
    except Exception:
        log.exception("could not release a run ticket")


def _path() -> str:
    from flask import request

    return request.path


def _is_registered_run(run_id: str) -> bool:
    from mlflow.server.handlers import _get_model_registry_store

    try:
        found = _get_model_registry_store().search_model_versions(
            f"run_id = '{run_id}'", max_results=1
        )
    except Exception:
        return True  # cannot tell: fail closed
    return len(found) > 0


def stored_digest(version) -> str:
    """``onnx_digest`` of a version's stored ``model.onnx`` (and its external data), read
    through the server's own artifact store."""
    from urllib.parse import urlparse

    from mlflow.server.handlers import _get_artifact_repo_mlflow_artifacts, _get_tracking_store
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from onnxflow.onnxfiles import onnx_digest

    source = version.source or ""
    model_id = getattr(version, "model_id", None)
    if not model_id and source.startswith("models:/m-"):  # a logged model's own URI
        model_id = source[len("models:/") :].split("/")[0]
    if model_id and source.startswith("models:/"):
        location = _get_tracking_store().get_logged_model(model_id).artifact_location
    elif source.startswith("runs:/"):
        run_id, _, path = source[len("runs:/") :].partition("/")
        location = _get_tracking_store().get_run(run_id).info.artifact_uri.rstrip("/")
        location = f"{location}/{path}" if path else location
    else:
        location = source
    with tempfile.TemporaryDirectory() as tmp:
        if location.startswith("mlflow-artifacts:"):
            relative = urlparse(location).path.lstrip("/")
            local = _get_artifact_repo_mlflow_artifacts().download_artifacts(relative, tmp)
        else:
            local = get_artifact_repository(location).download_artifacts("", tmp)
        return onnx_digest(Path(local) / "model.onnx")


def _protected_aliases(registry, model: str, protected: list[str]) -> dict[str, str]:
    """version -> its protected aliases ("champion"), for the model's current aliases."""
    try:
        aliases = registry.get_registered_model(model).aliases or {}
    except Exception:
        return {}
    held: dict[str, list[str]] = {}
    if isinstance(aliases, dict):
        pairs = aliases.items()
    else:
        pairs = ((a.alias, a.version) for a in aliases)
    for alias, version in pairs:
        if alias in protected:
            held.setdefault(str(version), []).append(alias)
    return {v: ", ".join(a) for v, a in held.items()}


def _has_trail(model: str) -> bool:
    from mlflow.server.handlers import _get_tracking_store

    try:
        rows = audit.read_rows(_get_tracking_store().engine)
    except Exception:
        return True
    return any(r["model"] == model for r in rows)


def _alias_version(registry, model: str, alias: str) -> str | None:
    try:
        return str(registry.get_model_version_by_alias(model, alias).version)
    except Exception:
        return None


def _version_tags(registry, model: str, version: str) -> dict[str, str] | None:
    try:
        return dict(registry.get_model_version(model, version).tags or {})
    except Exception:
        return None


def _body_message(response) -> str:
    try:
        body = response.get_json(silent=True)
    except Exception:
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:500]
    return response.get_data(as_text=True)[:500]

"""``mlflow server --app-name onnxflow-auth``: MLflow's basic-auth app plus the promotion policy.

The app is MLflow's own ``basic-auth`` app (users, passwords, permissions, roles) with
one more ``before_request`` hook, registered ahead of basic-auth's so that an alias
request is judged by the policy, with a message naming the rule, before MLflow's
generic permission check:

* set or delete an alias (``/api/2.0/mlflow/registered-models/alias`` and the
  ``/ajax-api/`` route the UI calls): :func:`onnxflow.stack.policy.decide`; a refusal
  is a 403 whose JSON ``message`` the UI shows;
* set or delete a version tag the server owns (``registered_by``, ``audit.*``): admins
  only;
* after a new model version is created, the server tags it ``registered_by`` with the
  account that created it (the four-eyes rule reads it);
* the live evidence of the serving replicas: an account in the policy's
  ``live_evidence_accounts`` (the ``endpoint``, READ otherwise) may set version tags
  ``shadow_*``/``canary_*`` and put files under ``shadow/`` in an existing run through the
  artifact proxy, and nothing more. For those requests alone basic-auth's permission check
  is skipped: its Flask hook is wrapped (tags), and the artifact proxy's own upload
  handler is called from a middleware outside basic-auth's (files; FastAPI serves them).

Every alias request, allowed or refused (by the policy or by MLflow's permissions), is
recorded by :mod:`onnxflow.stack.audit` once the response is known.

Configuration: ``MLFLOW_AUTH_CONFIG_PATH`` (basic-auth's ini), ``ONNXFLOW_PROMOTION_POLICY``
(the policy's YAML file; unset: the defaults of :class:`PromotionPolicy`).
"""

from __future__ import annotations

import logging
import os
import re
import time

from onnxflow.stack import audit
from onnxflow.stack.policy import (
    LIVE_EVIDENCE_FOLDER,
    REGISTERED_BY,
    Decision,
    PromotionPolicy,
    decide,
    is_live_evidence_tag,
    is_reserved_tag,
    load_policy,
)

log = logging.getLogger(__name__)

POLICY_ENV = "ONNXFLOW_PROMOTION_POLICY"
ALIAS_PATH = "/mlflow/registered-models/alias"
CREATE_VERSION_PATH = "/mlflow/model-versions/create"
VERSION_TAG_PATHS = ("/mlflow/model-versions/set-tag", "/mlflow/model-versions/delete-tag")
#: PUT of one file through the artifact proxy: .../artifacts/EXPERIMENT/RUN/artifacts/PATH
ARTIFACT_PUT = re.compile(
    r"^/api/2\.0/mlflow-artifacts/artifacts/(?P<experiment>[^/]+)/(?P<run>[0-9a-f]{32})"
    r"/artifacts/(?P<path>.+)$"
)


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
    if hasattr(served, "middleware"):  # FastAPI under uvicorn: it serves the artifact proxy
        served.middleware("http")(guard.live_evidence_upload)
    log.warning(
        "onnxflow promotion policy on: protected aliases %s",
        ", ".join(guard.policy.protected_aliases),
    )
    return served


def _let_live_evidence_through(flask_app) -> None:
    """Wrap basic-auth's ``before_request`` hook: it is skipped for a request the guard
    has judged to be live evidence from a serving replica (``g.onnxflow_live_evidence``)."""
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


def _forbidden(message: str):
    from flask import jsonify

    response = jsonify({"error_code": "PERMISSION_DENIED", "message": message})
    response.status_code = 403
    return response


class AliasGuard:
    """The Flask hooks: judge alias and reserved-tag requests, audit alias requests."""

    def __init__(self, policy: PromotionPolicy) -> None:
        self.policy = policy

    # --- before: authenticate, then judge

    def before_request(self):
        from flask import g, request
        from werkzeug.datastructures import Authorization

        path = request.path
        alias = path.endswith(ALIAS_PATH) and request.method in ("POST", "DELETE")
        tag = path.endswith(VERSION_TAG_PATHS) and request.method in ("POST", "DELETE")
        create = path.endswith(CREATE_VERSION_PATH) and request.method == "POST"
        if not (alias or tag or create):
            return None
        from mlflow.server.auth import authenticate_request, store

        authorization = authenticate_request()
        if not isinstance(authorization, Authorization):
            return authorization  # basic-auth's 401
        user = store.get_user(authorization.username)
        if alias:
            return self._judge_alias(user, via="ui" if path.startswith("/ajax-api") else "api")
        if user.is_admin:
            return None
        keys = self._tag_keys(create)
        reserved = sorted(k for k in keys if is_reserved_tag(k))
        if reserved:
            return _forbidden(
                f"Tags {', '.join(reserved)} are written by the MLflow server "
                f"itself (who registered a version, the audit trail); "
                f"{user.username!r} may not set or delete them."
            )
        if create:
            g.onnxflow_stamp_registered_by = user.username
        elif (
            request.method == "POST"
            and user.username in self.policy.live_evidence_accounts
            and all(is_live_evidence_tag(k) for k in keys)
        ):
            g.onnxflow_live_evidence = True
        return None

    async def live_evidence_upload(self, request, call_next):
        """A serving replica's shadow report, written by the artifact proxy's own handler;
        every other request goes on to basic-auth's middleware and MLflow."""
        upload = ARTIFACT_PUT.match(request.url.path) if request.method == "PUT" else None
        if upload is None:
            return await call_next(request)
        import asyncio

        from mlflow.server.artifact_router import upload_artifact
        from mlflow.server.auth import _authenticate_fastapi_request

        user = await asyncio.to_thread(_authenticate_fastapi_request, request)
        if user is None or not await asyncio.to_thread(self._is_live_evidence_file, user, upload):
            return await call_next(request)
        relative = request.url.path.partition("/mlflow-artifacts/artifacts/")[2]
        return await upload_artifact(relative, request)

    def _is_live_evidence_file(self, user, upload: re.Match) -> bool:
        """A serving replica's file under shadow/ in a run that exists in that experiment."""
        from mlflow.server.handlers import _get_tracking_store

        relative = upload["path"]
        if user.username not in self.policy.live_evidence_accounts:
            return False
        if not relative.startswith(LIVE_EVIDENCE_FOLDER) or ".." in relative.split("/"):
            return False
        try:
            run = _get_tracking_store().get_run(upload["run"])
        except Exception:
            return False
        return run.info.experiment_id == upload["experiment"]

    def _tag_keys(self, create: bool) -> list[str]:
        from flask import request
        from mlflow.protos.model_registry_pb2 import (
            CreateModelVersion,
            DeleteModelVersionTag,
            SetModelVersionTag,
        )
        from mlflow.server.handlers import _get_request_message

        if create:
            return [t.key for t in _get_request_message(CreateModelVersion()).tags]
        message = SetModelVersionTag() if request.method == "POST" else DeleteModelVersionTag()
        return [_get_request_message(message).key]

    def _judge_alias(self, user, via: str):
        from flask import g, request
        from mlflow.protos.model_registry_pb2 import (
            DeleteRegisteredModelAlias,
            SetRegisteredModelAlias,
        )
        from mlflow.server.auth import store
        from mlflow.server.handlers import _get_model_registry_store, _get_request_message

        setting = request.method == "POST"
        message = _get_request_message(
            SetRegisteredModelAlias() if setting else DeleteRegisteredModelAlias()
        )
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
        g.onnxflow_alias_attempt = (model, alias, user.username, current, version, decision, via)
        if decision.allowed or decision.rule == "no_version":
            return None  # MLflow's own permission check and handler come next
        log.warning("refused: %s", decision.message)
        return _forbidden(decision.message)

    # --- after: audit what happened, stamp new versions

    def after_request(self, response):
        from flask import g

        attempt = g.pop("onnxflow_alias_attempt", None)
        if attempt is not None:
            self._audit(attempt, response)
        user = g.pop("onnxflow_stamp_registered_by", None)
        if user is not None and response.status_code == 200:
            self._stamp(user, response)
        return response

    def _audit(self, attempt, response) -> None:
        from mlflow.server.handlers import _get_model_registry_store, _get_tracking_store

        model, alias, user, current, version, decision, via = attempt
        decision: Decision
        if response.status_code == 200:
            verdict, rule, message = "allowed", decision.rule, decision.message
        elif not decision.allowed:
            verdict, rule, message = "refused", decision.rule, decision.message
        else:  # the policy let it through; MLflow's permissions or handler refused it
            verdict, rule = "refused", f"mlflow_{response.status_code}"
            message = f"MLflow answered {response.status_code}: {_body_message(response)}"
        record = audit.AliasAttempt(
            model=model,
            alias=alias,
            user=user,
            from_version=current,
            to_version=version,
            decision=verdict,
            rule=rule,
            message=message,
            via=via,
            override_reason=decision.override_reason if verdict == "allowed" else None,
            time_ms=int(time.time() * 1000),
            protected=alias in self.policy.protected_aliases,
        )
        try:
            audit.record(_get_tracking_store(), _get_model_registry_store(), record)
        except Exception:  # the response stands; the failure is loud in the server's log
            log.exception("could not write the audit record of %s", record)

    def _stamp(self, user: str, response) -> None:
        from mlflow.entities.model_registry import ModelVersionTag
        from mlflow.server.handlers import _get_model_registry_store

        try:
            version = response.get_json()["model_version"]
            _get_model_registry_store().set_model_version_tag(
                version["name"], version["version"], ModelVersionTag(REGISTERED_BY, user)
            )
        except Exception:
            log.exception("could not tag the new model version with %s=%s", REGISTERED_BY, user)


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

"""The promotion policy's rules and the stack's credentials, without a server.

The same rules through a real MLflow server: tests/integration/test_promotion_policy.py.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import yaml

from onnxflow.errors import StackError
from onnxflow.stack import accounts
from onnxflow.stack.policy import (
    PromotionPolicy,
    decide,
    is_reserved_tag,
    load_policy,
    tag_writers,
)

EVIDENCE = {
    "validation": "passed",
    "onnx_sha256": "ab",
    "parity_max_abs": "1e-6",
    "parity_max_rel": "1e-5",
    "metric_name": "accuracy",
    "accuracy": "0.9",
}


def judge(
    policy=None,
    *,
    user="reviewer",
    roles=("reviewers",),
    tags=EVIDENCE,
    alias="champion",
    version="2",
    model="digits",
    is_admin=False,
):
    return decide(
        policy or PromotionPolicy(),
        model=model,
        alias=alias,
        version=version,
        user=user,
        is_admin=is_admin,
        roles=set(roles),
        version_tags=tags,
    )


def test_a_reviewer_may_move_champion_onto_a_validated_version():
    decision = judge()
    assert decision.allowed and decision.rule == "ok" and decision.override_reason is None


def test_only_reviewers_may_move_a_protected_alias():
    decision = judge(user="alice", roles=())
    assert not decision.allowed and decision.rule == "reviewers"
    assert "'alice', who is not in the role 'reviewers'" in decision.message
    assert judge(user="alice", roles=(), alias="candidate").allowed  # not protected
    assert judge(user="alice", roles=(), version=None).rule == "reviewers"  # delete
    assert judge(user="root", roles=(), is_admin=True).allowed


def test_auto_promotion_by_the_pipeline_follows_the_model_setting():
    assert judge(user="pipeline", roles=()).allowed
    policy = PromotionPolicy(models={"digits": {"allow_auto": False}})
    decision = judge(policy, user="pipeline", roles=())
    assert not decision.allowed and "auto promotion is off for 'digits'" in decision.message
    assert judge(policy, user="pipeline", roles=(), model="other").allowed


@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"validation": "failed"}, "validation='failed', expected 'passed'"),
        ({"onnx_sha256": None}, "no 'onnx_sha256' tag"),
        ({"parity_max_rel": ""}, "no 'parity_max_rel' tag"),
        ({"accuracy": None}, "no 'accuracy' tag (its metric_name)"),
    ],
)
def test_the_version_must_carry_the_evidence(change, phrase):
    tags = {k: v for k, v in {**EVIDENCE, **change}.items() if v is not None}
    decision = judge(tags=tags)
    assert not decision.allowed and decision.rule == "evidence" and phrase in decision.message


def test_an_override_reason_bypasses_the_evidence_and_is_returned_for_the_audit():
    decision = judge(tags={"validation": "failed", "promotion_override": "INC-1: hand-checked"})
    assert decision.allowed and decision.override_reason == "INC-1: hand-checked"
    assert judge(tags={"promotion_override": "  "}).rule == "evidence"  # blank is no reason
    assert judge(tags={**EVIDENCE, "promotion_override": "x"}).override_reason is None


def test_four_eyes_where_configured():
    tags = {**EVIDENCE, "registered_by": "reviewer"}
    assert judge(tags=tags).allowed  # off by default
    policy = PromotionPolicy(models={"digits": {"four_eyes": True}})
    decision = judge(policy, tags=tags)
    assert not decision.allowed and decision.rule == "four_eyes"
    assert judge(policy, tags=tags, user="bob").allowed


def test_per_model_reviewer_roles():
    policy = PromotionPolicy(models={"fraud": {"reviewers": "risk"}})
    assert not judge(policy, model="fraud").allowed
    assert judge(policy, model="fraud", roles=("risk",)).allowed
    assert accounts.reviewer_roles(policy) == {"reviewers": "*", "risk": "fraud"}


def test_policy_file_defaults_and_typos(tmp_path):
    assert load_policy(None) == PromotionPolicy()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_policy(empty) == PromotionPolicy()
    partial = tmp_path / "p.yaml"
    partial.write_text(yaml.safe_dump({"models": {"digits": {"four_eyes": True}}}))
    rules = load_policy(partial).rules_for("digits")
    assert rules.four_eyes and rules.reviewers == "reviewers" and rules.allow_auto
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"models": {"digits": {"four_eye": True}}}))
    with pytest.raises(ValueError, match="four_eye"):
        load_policy(typo)
    with pytest.raises(ValueError, match="not a file"):
        load_policy(tmp_path / "missing.yaml")


def test_reserved_tags():
    assert is_reserved_tag("registered_by") and is_reserved_tag("audit.champion_set_by")
    assert not is_reserved_tag("validation")


def test_credentials_are_created_once_private_and_never_in_repr(tmp_path, monkeypatch):
    for account in (*accounts.ACCOUNTS, accounts.SECRET_KEY):
        monkeypatch.delenv(
            f"ONNXFLOW_AUTH_{account.upper().replace('-', '_')}_PASSWORD", raising=False
        )
    folder = tmp_path / "credentials"
    first = accounts.load_credentials(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for account in accounts.ACCOUNTS:
        assert stat.S_IMODE(first.path(account).stat().st_mode) == 0o600
        assert len(first.passwords[account]) >= 12
    assert accounts.load_credentials(folder).passwords == first.passwords
    assert first.passwords["reviewer"] not in repr(first)
    assert first.env_for("endpoint") == {
        "MLFLOW_TRACKING_USERNAME": "endpoint",
        "MLFLOW_TRACKING_PASSWORD": first.passwords["endpoint"],
    }

    monkeypatch.setenv("ONNXFLOW_AUTH_REVIEWER_PASSWORD", "from-the-environment")
    assert accounts.load_credentials(folder).passwords["reviewer"] == "from-the-environment"
    monkeypatch.setenv("ONNXFLOW_AUTH_REVIEWER_PASSWORD", "short")
    with pytest.raises(StackError, match="at least 12"):
        accounts.load_credentials(folder)
    monkeypatch.delenv("ONNXFLOW_AUTH_REVIEWER_PASSWORD")

    os.chmod(first.path("pipeline"), 0o644)
    with pytest.raises(StackError, match="chmod 600"):
        accounts.load_credentials(folder)


def test_the_stack_gives_each_process_its_own_account(tmp_path, monkeypatch):
    from onnxflow.stack import manager
    from onnxflow.stack.settings import StackSettings

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    monkeypatch.setenv("ONNXFLOW_AUTH_ADMIN_PASSWORD", "the-admin-password")
    settings = StackSettings(state_dir=tmp_path)
    credentials = accounts.load_credentials(manager.credentials_dir(settings))
    assert manager.worker_env(settings)["MLFLOW_TRACKING_USERNAME"] == "pipeline"
    assert manager.endpoint_env(settings, 8080)["MLFLOW_TRACKING_USERNAME"] == "endpoint"
    base = manager.base_env(settings)
    assert "MLFLOW_TRACKING_USERNAME" not in base and "ONNXFLOW_AUTH_ADMIN_PASSWORD" not in base
    command = manager.mlflow_server_command(settings)
    assert command[-2:] == ["--app-name", "onnxflow-auth"]
    assert not any(p in " ".join(command) for p in credentials.passwords.values())
    server_env = manager.mlflow_server_env(settings, credentials)
    assert "MLFLOW_TRACKING_PASSWORD" not in server_env
    off = StackSettings(state_dir=tmp_path, auth=False)
    assert "--app-name" not in manager.mlflow_server_command(off)
    assert "MLFLOW_TRACKING_USERNAME" not in manager.worker_env(off)


def test_every_version_tag_has_one_writer_and_evidence_is_the_default():
    from onnxflow.stack.policy import tag_writers

    policy = PromotionPolicy()
    writers = {
        key: tag_writers(policy, key)
        for key in (
            "validation",
            "onnx_sha256",
            "f1",
            "a_tag_added_later",
            "registered_by",
            "audit.x",
            "shadow_agreement",
            "promotion_override",
            "note.why",
        )
    }
    assert writers == {
        "validation": "pipeline",
        "onnx_sha256": "pipeline",
        "f1": "pipeline",
        "a_tag_added_later": "pipeline",
        "registered_by": "server",
        "audit.x": "server",
        "shadow_agreement": "live",
        "promotion_override": "reviewers",
        "note.why": "anyone",
    }


def test_four_eyes_fails_closed_and_compares_the_person_who_asked_for_the_run():
    policy = PromotionPolicy(default={"four_eyes": True})
    unstamped = judge(policy, tags=EVIDENCE)  # no registered_by: nobody can vouch
    assert (unstamped.allowed, unstamped.rule) == (False, "four_eyes")
    asked = {**EVIDENCE, "registered_by": "pipeline", "requested_by": "reviewer"}
    assert judge(policy, tags=asked).rule == "four_eyes"
    other = {**EVIDENCE, "registered_by": "pipeline", "requested_by": "alice"}
    assert judge(policy, tags=other).allowed


def test_the_audit_chain_detects_an_edit_a_deletion_and_an_insertion(tmp_path):
    import sqlalchemy as sa

    from onnxflow.stack import audit

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    for n in range(3):
        attempt = audit.AliasAttempt(
            model="m",
            alias="champion",
            user=f"u{n}",
            from_version=None,
            to_version=str(n),
            decision="refused",
            rule="reviewers",
            message="no",
            via="api",
            time_ms=n,
        )
        assert audit.record(engine, attempt) == n + 1
    rows = audit.read_rows(engine)
    assert audit.verify_chain(rows) is None
    edited = [dict(r) for r in rows]
    edited[1]["decision"] = "allowed"
    assert "row 2 was altered" in audit.verify_chain(edited)
    assert "row 2 is missing" in audit.verify_chain([rows[0], rows[2]])
    forged = {**rows[1], "seq": 2}
    assert "row 3 does not follow" in audit.verify_chain([rows[0], forged, {**rows[1], "seq": 3}])
    engine.dispose()


def test_requested_by_is_the_servers_and_the_ticket_tag_is_one_name():
    from onnxflow.registration import RUN_TICKET_TAG, _take_run_ticket, hold_run_tickets
    from onnxflow.stack import tickets

    policy = PromotionPolicy()
    assert is_reserved_tag("requested_by") and tag_writers(policy, "requested_by") == "server"
    # Presented by the pipeline alone (it is not the server's, the live or a note).
    assert tag_writers(policy, tickets.RUN_TICKET_TAG) == "pipeline"
    assert RUN_TICKET_TAG == tickets.RUN_TICKET_TAG
    hold_run_tickets(["a", "b"])  # one per new version, then none
    assert [_take_run_ticket() for _ in range(3)] == ["a", "b", None]


def test_a_flow_run_imports_only_recipes_the_deployment_allows(tmp_path, monkeypatch):
    from onnxflow.config import PipelineConfig
    from onnxflow.errors import RecipeError
    from onnxflow.flows.retrain import retrain_and_deploy
    from onnxflow.recipes import EXAMPLES_DIR, RECIPE_DIRS_ENV, allowed_recipe_dirs, check_recipe

    allowed, outside = tmp_path / "recipes", tmp_path / "elsewhere"
    allowed.mkdir(), outside.mkdir()
    marker = tmp_path / "imported"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    (allowed / "good.py").write_text("X = 1\n")
    (outside / "evil.py").write_text(evil)
    (allowed / "link.py").symlink_to(outside / "evil.py")  # a link out of the folder
    (allowed / "sub").symlink_to(outside, target_is_directory=True)
    assert check_recipe(str(allowed / "good.py"), [allowed]) == str(allowed / "good.py")
    for ref in (
        str(outside / "evil.py"),
        str(allowed / ".." / "elsewhere" / "evil.py"),  # .. escapes
        str(allowed / "link.py"),
        str(allowed / "sub" / "evil.py"),
        "recipes/good.py",  # relative: depends on the worker's folder
        "os",  # a module: importing it runs code the deployment did not choose
        str(allowed / "missing.py"),
        str(allowed),
    ):
        with pytest.raises(RecipeError, match="refused"):
            check_recipe(ref, [allowed])
    # The worker's list (make up sets it); the project's examples/ by default.
    monkeypatch.delenv(RECIPE_DIRS_ENV, raising=False)
    assert allowed_recipe_dirs() == [EXAMPLES_DIR]
    assert check_recipe(str(EXAMPLES_DIR / "text" / "recipe.py"), allowed_recipe_dirs())
    monkeypatch.setenv(RECIPE_DIRS_ENV, json.dumps([str(allowed)]))
    # The flow fails at once, before any line of the recipe runs (as a parameter or in
    # the config).
    for kwargs in (
        {"recipe": str(outside / "evil.py")},
        {"config": PipelineConfig(recipe=str(outside / "evil.py"))},
    ):
        with pytest.raises(RecipeError, match="outside the folders"):
            retrain_and_deploy.fn(**kwargs)
    assert not marker.exists()

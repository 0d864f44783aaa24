"""Who may move a protected alias (``champion``), and onto which versions: the rules.

The MLflow server checks every alias request against a :class:`PromotionPolicy`
(:mod:`onnxflow.stack.mlflow_app` wires it into the server). This module holds only the
rules, as plain functions of the request, the account and the version's tags, so they
are tested without a server:

1. **reviewers**: only members of the model's reviewer group (an MLflow role) may set,
   move or delete a protected alias; the pipeline's account too where ``allow_auto`` is
   on for the model (``promote.mode: auto``);
2. **evidence**: the target version carries ``validation: passed``, ``onnx_sha256``, the
   parity tags and its metric; a version tagged ``promotion_override`` (a reason) passes
   without them, and the reason is audited;
3. **four eyes** (where configured): the account moving the alias is not the one that
   registered the version (the server stamps ``registered_by`` on every new version).

The policy file is YAML; every field has a default, so an empty file is a valid policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Version tags the server writes itself; no account but an admin may set or delete them.
REGISTERED_BY = "registered_by"
#: Who asked for the run that produced a version (the authenticated ``onnxflow trigger``).
REQUESTED_BY = "requested_by"
RESERVED_TAG_PREFIX = "audit."
#: Version tags anyone with EDIT on the model may write (free-form notes).
NOTE_TAG_PREFIX = "note."
ANY = "*"


class ModelRules(BaseModel):
    """How one registered model's protected aliases are guarded (``None``: the default's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reviewers: str | None = Field(
        None, description="MLflow role (group) whose members may move protected aliases."
    )
    allow_auto: bool | None = Field(
        None, description="The pipeline's accounts may move protected aliases (auto promotion)."
    )
    four_eyes: bool | None = Field(
        None,
        description="The account moving the alias must not be the one that registered the version.",
    )
    required_tags: dict[str, str] | None = Field(
        None, description=f"Version tags the target must carry; value {ANY!r}: any value."
    )
    require_metric: bool | None = Field(
        None, description="The version's metric tag (named by its metric_name tag) must exist."
    )


class PromotionPolicy(BaseModel):
    """The whole policy: defaults, then per-model overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protected_aliases: list[str] = Field(
        ["champion"],
        description="Aliases the rules guard; any other alias follows MLflow's "
        "own permissions (EDIT on the registered model).",
    )
    pipeline_accounts: list[str] = Field(
        ["pipeline"], description="Accounts of the pipeline (auto promotion)."
    )
    live_evidence_accounts: list[str] = Field(
        ["endpoint"],
        description="Accounts of the serving replicas: with READ alone they may write "
        "the live evidence onto a version (tags shadow_* and canary_*, files under "
        "shadow/ in its run), and nothing else.",
    )
    run_ticket_ttl_s: int = Field(
        6 * 3600,
        gt=0,
        description="How long a run ticket (onnxflow trigger's proof of who asked) stays "
        "redeemable.",
    )
    override_tag: str = Field(
        "promotion_override",
        description="A version tag whose value (the reason) lets a "
        "reviewer promote a version without the evidence; the reason is audited.",
    )
    default: ModelRules = Field(
        ModelRules(
            reviewers="reviewers",
            allow_auto=True,
            four_eyes=False,
            required_tags={
                "validation": "passed",
                "onnx_sha256": ANY,
                "parity_max_abs": ANY,
                "parity_max_rel": ANY,
                "metric_name": ANY,
            },
            require_metric=True,
        ),
        description="Rules of every model not listed in ``models`` (and their defaults).",
    )
    models: dict[str, ModelRules] = Field(
        {}, description="Per registered model: the fields that differ from ``default``."
    )

    def rules_for(self, model: str) -> ModelRules:
        """The default's rules with the model's own fields on top (all fields set)."""
        base = self.default.model_dump()
        own = self.models.get(model)
        if own is not None:
            base.update({k: v for k, v in own.model_dump().items() if v is not None})
        fallback = PromotionPolicy.model_fields["default"].default.model_dump()
        return ModelRules(**{k: (fallback[k] if v is None else v) for k, v in base.items()})


def load_policy(path: Path | str | None) -> PromotionPolicy:
    """The policy in ``path`` (YAML), or the defaults when ``path`` is None."""
    if path is None:
        return PromotionPolicy()
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"promotion policy {path} is not a file")
    return PromotionPolicy.model_validate(yaml.safe_load(path.read_text()) or {})


class Decision(BaseModel):
    """The verdict on one alias request; ``rule`` names the rule that refused it."""

    model_config = ConfigDict(frozen=True)

    allowed: bool
    rule: Literal["reviewers", "evidence", "four_eyes", "unprotected", "ok", "no_version"]
    message: str
    override_reason: str | None = None


def decide(
    policy: PromotionPolicy,
    *,
    model: str,
    alias: str,
    version: str | None,
    user: str,
    is_admin: bool,
    roles: set[str],
    version_tags: dict[str, str] | None,
) -> Decision:
    """May ``user`` point ``alias`` of ``model`` at ``version`` (None: delete the alias)?"""
    if alias not in policy.protected_aliases:
        return Decision(
            allowed=True, rule="unprotected", message=f"{alias!r} is not a protected alias"
        )
    rules = policy.rules_for(model)
    target = f"version {version}" if version is not None else "nothing (delete)"
    is_pipeline = user in policy.pipeline_accounts
    if not (is_admin or rules.reviewers in roles or (is_pipeline and rules.allow_auto)):
        who = (
            f"the pipeline account {user!r} (auto promotion is off for {model!r})"
            if is_pipeline
            else f"{user!r}, who is not in the role {rules.reviewers!r}"
        )
        return Decision(
            allowed=False,
            rule="reviewers",
            message=(
                f"Promotion policy, rule 'reviewers': only members of the MLflow role "
                f"{rules.reviewers!r} may move {alias!r} of {model!r}; refused for {who}."
            ),
        )
    if version is None:
        if not (is_admin or rules.reviewers in roles):  # auto promotion moves, never removes
            return Decision(
                allowed=False,
                rule="reviewers",
                message=(
                    f"Promotion policy, rule 'reviewers': only members of the MLflow role "
                    f"{rules.reviewers!r} may remove {alias!r} of {model!r}; the pipeline "
                    f"account {user!r} may move it (auto promotion), never remove it."
                ),
            )
        return Decision(allowed=True, rule="ok", message=f"{user} removed {alias!r}")
    if version_tags is None:
        return Decision(
            allowed=False, rule="no_version", message=f"{model!r} has no version {version}"
        )

    override = (version_tags.get(policy.override_tag) or "").strip() or None
    missing = missing_evidence(rules, version_tags)
    if missing and override is None:
        return Decision(
            allowed=False,
            rule="evidence",
            message=(
                f"Promotion policy, rule 'evidence': {model!r} {target} lacks the validation "
                f"evidence {alias!r} requires: {'; '.join(missing)}. Run it through the "
                f"pipeline's validation, or tag it {policy.override_tag!r} with a reason."
            ),
        )
    # The person behind the version: who asked for the run (``requested_by``, stamped from
    # the authenticated trigger) and who registered it; both must differ from the mover.
    # Four eyes fails closed: a version without ``registered_by`` is not promoted under it.
    behind = {version_tags.get(REGISTERED_BY), version_tags.get(REQUESTED_BY)} - {None, ""}
    if rules.four_eyes and (not version_tags.get(REGISTERED_BY) or user in behind):
        return Decision(
            allowed=False,
            rule="four_eyes",
            message=(
                f"Promotion policy, rule 'four_eyes': {user!r} registered or asked for "
                f"{model!r} {target} (or nobody is recorded as having registered it) "
                f"and may not also move {alias!r} onto it; another reviewer must."
            ),
        )
    return Decision(
        allowed=True,
        rule="ok",
        message=f"{user} moved {alias!r} to {target}"
        + (f" (evidence overridden: {override})" if missing else ""),
        override_reason=override if missing else None,
    )


def missing_evidence(rules: ModelRules, tags: dict[str, str]) -> list[str]:
    """What the version lacks of the required tags, one phrase per missing piece."""
    missing = []
    for key, wanted in (rules.required_tags or {}).items():
        found = tags.get(key)
        if found is None or found == "":
            missing.append(f"no {key!r} tag")
        elif wanted != ANY and found != wanted:
            missing.append(f"{key}={found!r}, expected {wanted!r}")
    if rules.require_metric:
        metric = tags.get("metric_name")
        if metric and not tags.get(metric):
            missing.append(f"no {metric!r} tag (its metric_name)")
    return missing


def is_reserved_tag(key: str) -> bool:
    """Version tags only the server writes (no account, not even the admin): who
    registered it, who asked for it (from a run ticket), the audit marks."""
    return key in (REGISTERED_BY, REQUESTED_BY) or key.startswith(RESERVED_TAG_PREFIX)


def tag_writers(policy: PromotionPolicy, key: str) -> str:
    """Who may write version tag ``key``: ``server``, ``live`` (serving replicas),
    ``reviewers`` (the override, audited), ``anyone`` (notes: MLflow's EDIT) or
    ``pipeline`` (everything else: the evidence the policy judges a version by).

    Every tag that is not explicitly someone else's is evidence: a new tag the pipeline
    starts writing is protected without a list to keep in step."""
    if is_reserved_tag(key):
        return "server"
    if is_live_evidence_tag(key):
        return "live"
    if key == policy.override_tag:
        return "reviewers"
    if key.startswith(NOTE_TAG_PREFIX):
        return "anyone"
    return "pipeline"


#: Version tags a serving replica writes: the challenger's shadow and canary figures.
LIVE_EVIDENCE_TAG_PREFIXES = ("shadow_", "canary_")
#: Where in a run a serving replica writes its files (the shadow report).
LIVE_EVIDENCE_FOLDER = "shadow/"


def is_live_evidence_tag(key: str) -> bool:
    """A version tag the serving replicas write (shadow and canary figures)."""
    return key.startswith(LIVE_EVIDENCE_TAG_PREFIXES)

"""The audit trail of alias moves: one MLflow run per attempt, in one experiment per model.

Every request to set or delete an alias of a registered model, allowed or refused,
becomes a finished run in the experiment ``onnxflow-audit/<model>`` of the tracking
store, with tags ``audit.*`` (who, when, alias, from and to version, decision, rule,
message, override reason). In the MLflow UI the experiment is the model's audit table;
an allowed move of a protected alias also tags the target version
(``audit.champion_set_by`` ...), so its page says who promoted it. The MLflow server
writes these records itself, through its own stores (:func:`record`); no account can
write into the audit experiments (they are created by the server, owned by nobody).

``onnxflow audit MODEL`` reads them back (:func:`read_trail`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

EXPERIMENT_PREFIX = "onnxflow-audit/"
FIELDS = (
    "time",
    "user",
    "alias",
    "from_version",
    "to_version",
    "decision",
    "rule",
    "override_reason",
    "message",
    "via",
)


def experiment_name(model: str) -> str:
    return f"{EXPERIMENT_PREFIX}{model}"


@dataclass(frozen=True)
class AliasAttempt:
    """One request to move an alias, and what the server answered."""

    model: str
    alias: str
    user: str
    from_version: str | None
    to_version: str | None  # None: a delete
    decision: str  # "allowed" | "refused"
    rule: str
    message: str
    via: str  # "ui" (ajax-api) or "api"
    override_reason: str | None = None
    time_ms: int = 0
    protected: bool = True  # a protected alias also marks the target version

    def tags(self) -> dict[str, str]:
        return {
            "audit.model": self.model,
            "audit.alias": self.alias,
            "audit.user": self.user,
            "audit.from_version": self.from_version or "-",
            "audit.to_version": self.to_version or "-",
            "audit.decision": self.decision,
            "audit.rule": self.rule,
            "audit.message": self.message[:4000],
            "audit.via": self.via,
            "audit.override_reason": (self.override_reason or "")[:4000],
            "audit.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time_ms / 1000)),
        }

    def run_name(self) -> str:
        move = f"{self.from_version or '-'} -> {self.to_version or 'deleted'}"
        return f"{self.alias} {move} by {self.user}: {self.decision}"


def record(tracking_store, registry_store, attempt: AliasAttempt) -> str:
    """Write ``attempt`` as a finished run of the model's audit experiment; returns its id.

    A move of a protected alias also tags the target version, so its page in the UI shows
    who moved the alias there and when (or who was refused).
    """
    from mlflow.entities import RunStatus, RunTag
    from mlflow.entities.model_registry import ModelVersionTag

    experiment_id = _experiment_id(tracking_store, experiment_name(attempt.model))
    tags = [RunTag(k, v) for k, v in attempt.tags().items()]
    run = tracking_store.create_run(
        experiment_id=experiment_id,
        user_id=attempt.user,
        start_time=attempt.time_ms,
        tags=tags,
        run_name=attempt.run_name(),
    )
    tracking_store.update_run_info(
        run.info.run_id, RunStatus.FINISHED, attempt.time_ms, attempt.run_name()
    )
    if attempt.protected and attempt.to_version is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(attempt.time_ms / 1000))
        if attempt.decision == "allowed":
            marks = {
                f"audit.{attempt.alias}_set_by": attempt.user,
                f"audit.{attempt.alias}_set_at": stamp,
            }
            if attempt.override_reason:
                marks[f"audit.{attempt.alias}_override_reason"] = attempt.override_reason
        else:
            marks = {
                f"audit.{attempt.alias}_refused": f"{stamp} {attempt.user}: rule {attempt.rule}"
            }
        for key, value in marks.items():
            registry_store.set_model_version_tag(
                attempt.model, attempt.to_version, ModelVersionTag(key, value[:5000])
            )
    return run.info.run_id


def _experiment_id(tracking_store, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = tracking_store.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return tracking_store.create_experiment(name)
    except MlflowException:  # another worker created it in between
        return tracking_store.get_experiment_by_name(name).experiment_id


def read_trail(model: str, client=None) -> list[dict[str, str]]:
    """The model's audit records, oldest first, as dicts of :data:`FIELDS`."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name(model))
    if experiment is None:
        return []
    rows, token = [], None
    while True:
        page = client.search_runs(
            [experiment.experiment_id],
            order_by=["attributes.start_time"],
            max_results=1000,
            page_token=token,
        )
        for run in page:
            tags = run.data.tags
            row = {f: tags.get(f"audit.{f}", "") for f in FIELDS}
            row["time"] = tags.get("audit.time", "")
            rows.append(row)
        token = page.token
        if not token:
            return rows


def format_trail(model: str, rows: list[dict[str, str]]) -> str:
    """The trail as a plain-text table (what ``onnxflow audit`` prints)."""
    if not rows:
        return f"no alias moves recorded for {model!r}"
    header = ("time", "user", "alias", "from", "to", "decision", "rule", "via", "detail")
    lines = [
        [
            r["time"],
            r["user"],
            r["alias"],
            r["from_version"],
            r["to_version"],
            r["decision"],
            r["rule"],
            r["via"],
            (
                f"override: {r['override_reason']}"
                if r["override_reason"]
                else (r["message"] if r["decision"] == "refused" else "")
            ),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header[:-1])]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)) + "  detail"]
    out += [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in lines
    ]
    return "\n".join(out)

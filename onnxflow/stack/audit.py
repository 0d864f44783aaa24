"""The audit trail: an append-only, hash-chained table the MLflow server alone writes.

Every request that could change what ``NAME@ALIAS`` resolves to (set or delete an alias,
rename a model, delete a version or a model, transition a stage), allowed or refused,
authenticated or not, and every change of a version's evidence override, becomes one row
of the table ``onnxflow_audit`` in the tracking database. No MLflow route writes that
table; the server inserts through its own database connection (:func:`record`) and
serves it read-only at ``GET /api/2.0/onnxflow/audit`` (any authenticated account).

Each row carries ``prev_hash`` (the previous row's hash) and ``hash`` = sha256 over
``prev_hash`` and the row's fields, so editing, inserting or deleting a row breaks the
chain: ``onnxflow audit --verify`` (:func:`verify_chain`) recomputes it and names the
first broken row. What a chain cannot show: someone with write access to the database
who rewrites every hash after their edit; compare the head hash ``--verify`` prints
with one kept elsewhere to detect that.

An allowed move of a protected alias also tags the target version
(``audit.champion_set_by`` ...) so its page in the UI says who promoted it; those tags
are reserved to the server (:func:`onnxflow.stack.policy.is_reserved_tag`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

TABLE = "onnxflow_audit"
ROUTE = "/api/2.0/onnxflow/audit"
GENESIS = "0" * 64
FIELDS = (
    "seq",
    "time",
    "model",
    "action",
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
#: The fields the hash covers, in this order (``seq`` included: a gap is a deletion).
HASHED = FIELDS


@dataclass(frozen=True)
class AliasAttempt:
    """One request that could move an alias (or change evidence), and the answer."""

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
    action: str = "set_alias"  # set_alias, delete_alias, rename, delete_version, ...

    def row(self) -> dict[str, str]:
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time_ms / 1000)),
            "model": self.model,
            "action": self.action,
            "user": self.user,
            "alias": self.alias or "-",
            "from_version": self.from_version or "-",
            "to_version": self.to_version or "-",
            "decision": self.decision,
            "rule": self.rule,
            "override_reason": (self.override_reason or "")[:4000],
            "message": self.message[:4000],
            "via": self.via,
        }


def row_hash(prev_hash: str, row: dict) -> str:
    """sha256 over the previous hash and the row's fields (canonical JSON)."""
    body = json.dumps([prev_hash, *(str(row.get(f, "")) for f in HASHED)], ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def _table(metadata=None):
    import sqlalchemy as sa

    metadata = metadata or sa.MetaData()
    return sa.Table(
        TABLE,
        metadata,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        *(sa.Column(f, sa.Text, nullable=False) for f in FIELDS[1:]),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


_CREATED: set[int] = set()


def record(engine, attempt: AliasAttempt, registry_store=None) -> int:
    """Append ``attempt`` to the chain in one transaction; returns its ``seq``.

    The caller serialises appends (the server holds its audit lock); the primary key on
    ``seq`` makes a lost race an error rather than a fork. A move of a protected alias
    also tags the target version (who moved it there and when, or who was refused).
    """
    import sqlalchemy as sa

    table = _table()
    if id(engine) not in _CREATED:
        table.metadata.create_all(engine, checkfirst=True)
        _CREATED.add(id(engine))
    row = attempt.row()
    with engine.begin() as conn:
        last = conn.execute(
            sa.select(table.c.seq, table.c.hash).order_by(table.c.seq.desc()).limit(1)
        ).first()
        seq, prev = (last.seq + 1, last.hash) if last else (1, GENESIS)
        row["seq"] = seq
        conn.execute(table.insert().values(**row, prev_hash=prev, hash=row_hash(prev, row)))
    if registry_store is not None and attempt.protected and attempt.to_version is not None:
        try:
            _mark_version(registry_store, attempt, row["time"])
        except Exception:  # e.g. no such version: the row above is the record
            pass
    return seq


def _mark_version(registry_store, attempt: AliasAttempt, stamp: str) -> None:
    from mlflow.entities.model_registry import ModelVersionTag

    if attempt.action != "set_alias":
        return
    if attempt.decision == "allowed":
        marks = {
            f"audit.{attempt.alias}_set_by": attempt.user,
            f"audit.{attempt.alias}_set_at": stamp,
        }
        if attempt.override_reason:
            marks[f"audit.{attempt.alias}_override_reason"] = attempt.override_reason
    else:
        marks = {f"audit.{attempt.alias}_refused": f"{stamp} {attempt.user}: rule {attempt.rule}"}
    for key, value in marks.items():
        registry_store.set_model_version_tag(
            attempt.model, attempt.to_version, ModelVersionTag(key, value[:5000])
        )


def read_rows(engine) -> list[dict[str, str]]:
    """Every row of the chain, oldest first (what the read route serves)."""
    import sqlalchemy as sa

    table = _table()
    if not sa.inspect(engine).has_table(TABLE):
        return []
    with engine.connect() as conn:
        result = conn.execute(sa.select(table).order_by(table.c.seq))
        return [{k: (v if k == "seq" else str(v)) for k, v in r._mapping.items()} for r in result]


def verify_chain(rows: list[dict]) -> str | None:
    """None when the chain is intact, else what is wrong and at which row."""
    prev, expected_seq = GENESIS, 1
    for row in rows:
        seq = int(row["seq"])
        if seq != expected_seq:
            return f"row {expected_seq} is missing (next row is {seq}): rows were deleted"
        if row["prev_hash"] != prev:
            return f"row {seq} does not follow row {seq - 1} (prev_hash differs)"
        if row_hash(prev, row) != row["hash"]:
            return f"row {seq} was altered after it was written (its hash does not match)"
        prev, expected_seq = row["hash"], seq + 1
    return None


def fetch_rows(tracking_uri: str | None = None) -> list[dict]:
    """The whole chain from the MLflow server, as MLflow's client logs in (env)."""
    from mlflow.tracking import get_tracking_uri
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = tracking_uri or get_tracking_uri()
    response = http_request(get_default_host_creds(uri), ROUTE, "GET")
    if response.status_code != 200:
        from mlflow.exceptions import MlflowException

        raise MlflowException(
            f"{uri}{ROUTE} answered {response.status_code}: {response.text[:300]}"
        )
    return response.json()["rows"]


def read_trail(model: str, tracking_uri: str | None = None) -> list[dict[str, str]]:
    """The model's rows, oldest first, as dicts of :data:`FIELDS`."""
    return [r for r in fetch_rows(tracking_uri) if r["model"] == model]


def format_trail(model: str, rows: list[dict[str, str]]) -> str:
    """The trail as a plain-text table (what ``onnxflow audit`` prints)."""
    if not rows:
        return f"no alias moves recorded for {model!r}"
    header = ("seq", "time", "user", "action", "alias", "from", "to", "decision", "rule", "via")
    keys = ("seq", "time", "user", "action", "alias", "from_version", "to_version")
    keys += ("decision", "rule", "via")
    lines = []
    for r in rows:
        detail = (
            f"override: {r['override_reason']}"
            if r["override_reason"]
            else (r["message"] if r["decision"] == "refused" else "")
        )
        lines.append([str(r[k]) for k in keys] + [detail])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "  detail"]
    out += [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in lines
    ]
    return "\n".join(out)

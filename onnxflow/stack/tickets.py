"""Run tickets: who asked for a run, vouched for by the MLflow server, not by Prefect.

Prefect has one shared login, so a flow run cannot say which person created it. The
person's own MLflow login can: ``onnxflow trigger`` first asks the MLflow server for a
ticket (``POST /api/2.0/onnxflow/run-tickets``, authenticated as that person); the server
stores sha256(ticket) -> the authenticated username, the model it is for and its expiry
in its own table ``onnxflow_run_tickets`` (no MLflow route writes it) and audits the
issue. The ticket travels as a flow-run parameter; the pipeline presents it as the
version tag :data:`RUN_TICKET_TAG` when it creates the version, and the server, not the
pipeline, writes ``requested_by`` = the stored username, drops the ticket tag and marks
the ticket used. An unknown, used, expired or other model's ticket is refused (audited).
"""

from __future__ import annotations

import hashlib
import secrets
import time

TABLE = "onnxflow_run_tickets"
ROUTE = "/api/2.0/onnxflow/run-tickets"
#: The version tag the pipeline presents a ticket as, on model-version creation only.
RUN_TICKET_TAG = "run_ticket"

_CREATED: set[int] = set()


def _table(metadata=None):
    import sqlalchemy as sa

    metadata = metadata or sa.MetaData()
    return sa.Table(
        TABLE,
        metadata,
        sa.Column("ticket_sha256", sa.String(64), primary_key=True),
        sa.Column("user", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("issued_ms", sa.BigInteger, nullable=False),
        sa.Column("expires_ms", sa.BigInteger, nullable=False),
        sa.Column("used_ms", sa.BigInteger, nullable=True),
    )


def _ready(engine):
    table = _table()
    if id(engine) not in _CREATED:
        table.metadata.create_all(engine, checkfirst=True)
        _CREATED.add(id(engine))
    return table


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


def issue(engine, user: str, model: str, ttl_s: int) -> tuple[str, int]:
    """A new ticket for ``user`` (the authenticated caller) and ``model``; only its hash is
    stored. Returns the ticket and its expiry (ms since the epoch)."""
    table = _ready(engine)
    ticket = secrets.token_urlsafe(32)
    now = int(time.time() * 1000)
    expires = now + ttl_s * 1000
    with engine.begin() as conn:
        conn.execute(
            table.insert().values(
                ticket_sha256=_digest(ticket),
                user=user,
                model=model,
                issued_ms=now,
                expires_ms=expires,
                used_ms=None,
            )
        )
    return ticket, expires


def redeem(engine, ticket: str, model: str) -> tuple[str | None, str]:
    """Mark ``ticket`` used (one atomic UPDATE: two presentations cannot both win).

    Returns (the user who asked, "") or (None, why it was refused)."""
    import sqlalchemy as sa

    table = _ready(engine)
    now = int(time.time() * 1000)
    key = _digest(ticket)
    with engine.begin() as conn:
        row = conn.execute(sa.select(table).where(table.c.ticket_sha256 == key)).first()
        if row is None:
            return None, "unknown run ticket"
        if row.used_ms is not None:
            return None, f"run ticket of {row.user!r} already used"
        if row.expires_ms < now:
            return None, f"run ticket of {row.user!r} expired"
        if row.model != model:
            return None, f"run ticket of {row.user!r} is for model {row.model!r}, not {model!r}"
        done = conn.execute(
            table.update()
            .where(table.c.ticket_sha256 == key, table.c.used_ms.is_(None))
            .values(used_ms=now)
        )
        if done.rowcount != 1:
            return None, f"run ticket of {row.user!r} already used"
    return row.user, ""


def release(engine, ticket: str) -> None:
    """Give a redeemed ticket back when MLflow refused to create the version."""
    table = _ready(engine)
    with engine.begin() as conn:
        conn.execute(
            table.update().where(table.c.ticket_sha256 == _digest(ticket)).values(used_ms=None)
        )


def request_ticket(model: str, tracking_uri: str | None = None) -> str:
    """Ask the MLflow server for a ticket, logged in as MLflow's client logs in (env:
    ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``: the person, not the pipeline)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import get_tracking_uri
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = tracking_uri or get_tracking_uri()
    response = http_request(get_default_host_creds(uri), ROUTE, "POST", json={"model": model})
    if response.status_code != 200:
        raise MlflowException(
            f"{uri}{ROUTE} answered {response.status_code}: {response.text[:300]}"
        )
    return response.json()["ticket"]

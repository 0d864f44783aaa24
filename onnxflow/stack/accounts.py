"""The stack's MLflow accounts: their passwords, the users and roles in MLflow's auth store.

| account    | what it does                                                         |
|------------|----------------------------------------------------------------------|
| `admin`    | MLflow admin: users, roles, permissions (MLflow's basic-auth admin)   |
| `pipeline` | the worker's flow runs: runs, versions, `challenger`, auto promotion  |
| `endpoint` | the serving replicas: reads the registry                               |
| `reviewer` | the first member of the role `reviewers`: moves `champion`             |

A password comes from ``ONNXFLOW_AUTH_<ACCOUNT>_PASSWORD`` when set, else from the file
``<credentials_dir>/<account>`` (mode 0600 in a 0700 folder), which :func:`load_credentials`
creates with a random password when it is missing. Passwords reach the processes that
need them through the environment MLflow's client reads (``MLFLOW_TRACKING_USERNAME``,
``MLFLOW_TRACKING_PASSWORD``); they are never printed, logged or put on a command line.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from onnxflow.errors import StackError

ADMIN, PIPELINE, ENDPOINT, REVIEWER = "admin", "pipeline", "endpoint", "reviewer"
ACCOUNTS = (ADMIN, PIPELINE, ENDPOINT, REVIEWER)
#: The Flask secret key of the MLflow server (CSRF of its sign-up form), kept like a password.
SECRET_KEY = "flask-secret-key"
#: The password of Prefect's API (its basic-auth setting, one login for every client).
PREFECT_SECRET = "prefect-api"
PREFECT_USER = "onnxflow"
#: What every account may do beyond its roles: read every experiment and model.
DEFAULT_PERMISSION = "READ"
#: What a reviewer role grants on the models it reviews: edit (aliases, tags), not delete.
REVIEWER_PERMISSION = "EDIT"


@dataclass(frozen=True)
class Credentials:
    """Passwords by account (plus the server's secret key); ``repr`` shows no secret."""

    folder: Path
    passwords: dict[str, str] = field(repr=False)

    def env_for(self, account: str) -> dict[str, str]:
        """What an MLflow client acting as ``account`` needs in its environment."""
        return {
            "MLFLOW_TRACKING_USERNAME": account,
            "MLFLOW_TRACKING_PASSWORD": self.passwords[account],
        }

    def prefect_auth_string(self) -> str:
        """``user:password`` of Prefect's API (``PREFECT_SERVER_API_AUTH_STRING`` on the
        server, ``PREFECT_API_AUTH_STRING`` on every client)."""
        return f"{PREFECT_USER}:{self.passwords[PREFECT_SECRET]}"

    def path(self, account: str) -> Path:
        return self.folder / account


def _env_name(account: str) -> str:
    return f"ONNXFLOW_AUTH_{account.upper().replace('-', '_')}_PASSWORD"


def load_credentials(folder: Path) -> Credentials:
    """Every account's password: from the environment, else the folder (created if missing)."""
    folder = folder.resolve()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(folder.stat().st_mode) & 0o077:
        os.chmod(folder, 0o700)
    passwords = {}
    for account in (*ACCOUNTS, SECRET_KEY, PREFECT_SECRET):
        from_env = os.environ.get(_env_name(account))
        if from_env:
            if len(from_env) < 12:
                raise StackError(
                    f"{_env_name(account)} is too short: MLflow wants at least 12 characters"
                )
            passwords[account] = from_env
            continue
        path = folder / account
        if not path.exists():
            _write_secret(path, secrets.token_urlsafe(24))
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise StackError(
                f"{path} is readable by others (mode {mode:o}); "
                f"run `chmod 600 {path}` (it holds the {account} password)"
            )
        value = path.read_text().strip()
        if len(value) < 12:
            raise StackError(
                f"{path} holds a password shorter than the 12 characters MLflow "
                f"requires; write a longer one or delete the file to get a new one"
            )
        passwords[account] = value
    return Credentials(folder=folder, passwords=passwords)


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")


def write_auth_config(path: Path, database_uri: str) -> Path:
    """basic-auth's ini file (``MLFLOW_AUTH_CONFIG_PATH``); 0600: the URI may hold a password."""
    text = "\n".join(
        [
            "[mlflow]",
            f"default_permission = {DEFAULT_PERMISSION}",
            f"database_uri = {database_uri.replace('%', '%%')}",
            f"admin_username = {ADMIN}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            # A password check (PBKDF2) per request costs more than most requests; cache a
            # verified login for a minute in the worker (MLflow's own opt-in setting).
            "auth_cache_ttl_seconds = 60",
            "",
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def provision(database_uri: str, credentials: Credentials, reviewer_roles: dict[str, str]) -> None:
    """Create what is missing in MLflow's auth store: the accounts, the reviewer roles.

    The stack's own accounts take the passwords of ``credentials`` (the files are the
    truth for them). ``reviewer_roles`` maps each role named by the promotion policy to
    the registered models it reviews (``*``: all); each role gets EDIT on them, and the
    ``reviewer`` account joins the default role. Users and roles a team added stay as
    they are.
    """
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

    store = SqlAlchemyStore()
    store.init_db(database_uri)
    try:
        for account in ACCOUNTS:
            password = credentials.passwords[account]
            if store.has_user(account, use_primary=True):
                store.update_user(account, password=password, is_admin=account == ADMIN)
            else:
                store.create_user(account, password, is_admin=account == ADMIN)
        existing = {r.name: r for r in store.list_roles([DEFAULT_WORKSPACE_NAME])}
        reviewer = store.get_user(REVIEWER)
        for index, (role_name, pattern) in enumerate(reviewer_roles.items()):
            role = existing.get(role_name)
            if role is None:
                role = store.create_role(
                    role_name,
                    DEFAULT_WORKSPACE_NAME,
                    description=f"reviewers of {pattern}: may move "
                    "protected aliases (onnxflow promotion policy)",
                )
                store.add_role_permission(role.id, "registered_model", pattern, REVIEWER_PERMISSION)
            if index == 0 and role.id not in {r.id for r in store.list_user_roles(reviewer.id)}:
                store.assign_role_to_user(reviewer.id, role.id)
    finally:
        store.engine.dispose()


def reviewer_roles(policy) -> dict[str, str]:
    """Role name -> registered models it reviews, from the policy (the default's role first)."""
    roles = {policy.default.reviewers or "reviewers": "*"}
    for model, rules in policy.models.items():
        if rules.reviewers and rules.reviewers not in roles:
            roles[rules.reviewers] = model
    return roles


def check_login(mlflow_url: str, credentials: Credentials, account: str) -> None:
    """One authenticated request as ``account``; a clear error if MLflow refuses it."""
    import httpx

    try:
        response = httpx.get(
            f"{mlflow_url}/api/2.0/mlflow/users/current",
            auth=(account, credentials.passwords[account]),
            timeout=10.0,
        )
    except httpx.HTTPError as exc:
        raise StackError(f"cannot reach the MLflow server at {mlflow_url}: {exc}") from exc
    if response.status_code == 401:
        raise StackError(
            f"the MLflow server at {mlflow_url} refuses the password of the "
            f"{account!r} account (from {_source(credentials, account)})"
        )
    if response.status_code != 200:
        raise StackError(
            f"the MLflow server at {mlflow_url} answered {response.status_code} "
            f"to the {account!r} account's login: {response.text[:200]}"
        )


def _source(credentials: Credentials, account: str) -> str:
    if os.environ.get(_env_name(account)):
        return f"${_env_name(account)}"
    return str(credentials.path(account))

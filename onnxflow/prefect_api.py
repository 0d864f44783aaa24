"""Which Prefect API a command's flows report to, and a temporary server when there is none.

Every Prefect flow run needs an API. A command that runs flows takes, in this order:

1. **the user's own**: ``PREFECT_API_URL`` from the environment or the active Prefect
   profile. It must answer, or the command stops at once and says what to do;
2. **a Prefect server running on this machine** at the stack's address (``make up``
   starts one; ``ONNXFLOW_STACK_PREFECT_PORT``), if it answers and runs this Prefect
   version (``ONNXFLOW_PREFECT_SERVER=temporary`` skips this);
3. **a temporary server** for this one command: Prefect's own ephemeral server, started
   the way Prefect starts it, but

   * on a database migrated and with its block types registered beforehand (``prefect
     server database upgrade`` and Prefect's own block auto-registration, under a file
     lock so two commands never do either at once: two servers starting together on a new
     database both inserted the block types, and one failed on a UNIQUE constraint), so
     the server itself has neither to do;
   * with a start-up timeout that holds on a busy machine (``TEMPORARY_STARTUP_TIMEOUT_S``,
     unless the user set ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``);
   * launched as soon as the command knows it needs one, so it boots while the command
     imports its libraries;
   * stopped when the command ends, on Ctrl-C and SIGTERM too, and by the kernel if the
     command is killed outright (parent-death signal).

Prefect keeps its state (the SQLite database, profiles) in ``PREFECT_HOME``
(``~/.prefect`` unless set).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from onnxflow.errors import OnnxflowError
from onnxflow.processes import (
    ProcessRecord,
    free_port,
    log_tail,
    start_process,
    stop_process,
    wait_until,
)

log = logging.getLogger(__name__)

#: Start-up timeout of a temporary server unless the user set Prefect's own setting.
#: Prefect's default (20 s) is not enough on a busy 2-core machine: importing the
#: server alone took 8-15 s there, a first migration 50 s.
TEMPORARY_STARTUP_TIMEOUT_S = 180
MARKER_FILE = "onnxflow-database.json"
LOCK_FILE = "onnxflow-database.lock"
REGISTER_BLOCKS_SETTING = "PREFECT_SERVER_REGISTER_BLOCKS_ON_START"
#: Prefect's server registers the block types it knows at start (``add_block_types`` in
#: ``prefect.server.api.server``); this does the same once, in a process of its own.
_REGISTER_BLOCKS = """
import asyncio
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def main():
    session = await provide_database_interface().session()
    async with session:
        await run_block_auto_registration(session=session)

asyncio.run(main())
"""

Say = Callable[[str], None]


class PrefectUnavailableError(OnnxflowError):
    """No Prefect API to run flows with: the configured one does not answer, or a
    temporary server could not start."""


@dataclass
class PrefectApi:
    """The API this command's flows use; ``wait()`` blocks until it answers."""

    url: str
    kind: str  # "configured", "local" or "temporary"
    timeout_s: float = 0
    record: ProcessRecord | None = None
    started: float = field(default_factory=time.monotonic)
    _ready: bool = False

    def wait(self) -> float:
        """Seconds waited until the API answered; points this process's Prefect at it."""
        waited = 0.0
        if not self._ready and self.record is not None:
            waited = wait_until(
                self.record,
                lambda: _healthy(self.url),
                self.timeout_s,
                "answering",
                error=PrefectUnavailableError,
                interval_s=0.2,
            )
            log.info("temporary Prefect server ready after %.1f s", time.monotonic() - self.started)
        self._ready = True
        _point_prefect_at(self.url)
        return waited


@contextmanager
def prefect_api(local_url: str | None = None, say: Say = log.info) -> Iterator[PrefectApi]:
    """The Prefect API for this command's flows (see the module's docstring).

    ``local_url``: where a Prefect server running on this machine would answer (the
    stack's API URL); None: do not look for one. A temporary server is launched on entry and
    stopped on exit; call ``wait()`` on the result before the first flow runs.
    """
    settings = _prefect_settings()
    configured = settings.api.url
    if configured:
        api = PrefectApi(url=configured.rstrip("/"), kind="configured")
        if not _healthy(api.url, timeout_s=10):
            raise PrefectUnavailableError(
                f"the Prefect server at {api.url} (PREFECT_API_URL, "
                f"{_where_set('PREFECT_API_URL')}) does not answer: start it, or unset "
                "PREFECT_API_URL to let onnxflow start a temporary server"
            )
        say(f"Prefect: using {api.url} (PREFECT_API_URL)")
        yield api
        return
    if local_url and (local := _running_local_server(local_url)) is not None:
        say(f"Prefect: using the server running at {local} (its UI shows these runs)")
        yield PrefectApi(url=local, kind="local")
        return
    api = start_temporary_server(settings, say)
    try:
        yield api
    finally:
        stop_temporary_server(api)


def start_temporary_server(settings=None, say: Say = log.info) -> PrefectApi:
    """Prepare the database, then launch Prefect's ephemeral server on a free port."""
    settings = settings or _prefect_settings()
    ephemeral = settings.server.ephemeral
    timeout_s = (
        ephemeral.startup_timeout_seconds
        if "startup_timeout_seconds" in ephemeral.model_fields_set
        else TEMPORARY_STARTUP_TIMEOUT_S
    )
    migrated = prepare_database(settings, say)
    env = {
        **os.environ,
        **settings.to_environment_variables(exclude_unset=True),
        # What Prefect's SubprocessASGIServer sets: no UI, the ephemeral set of services.
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    if migrated:  # both done above, under a lock (unless the user decided otherwise)
        for name in ("PREFECT_API_DATABASE_MIGRATE_ON_START", REGISTER_BLOCKS_SETTING):
            if name not in os.environ:
                env[name] = "false"
    import prefect

    fd, log_path = tempfile.mkstemp(prefix="onnxflow-prefect-server-", suffix=".log")
    os.close(fd)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(prefect.__file__).parent.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    record = start_process(
        "prefect-temporary-server",
        argv,
        env,
        Path(log_path),
        url=f"http://127.0.0.1:{port}/api",
        die_with_parent=True,
    )
    say(
        f"Prefect: starting a temporary server on http://127.0.0.1:{port} "
        f"(no Prefect server configured or running; state in {settings.home})"
    )
    return PrefectApi(url=record.url, kind="temporary", timeout_s=timeout_s, record=record)


def stop_temporary_server(api: PrefectApi) -> None:
    """Send what the flows logged, then stop the server and everything it started."""
    if api.record is None:
        return
    if api._ready:
        _drain_prefect_workers()
    stop_process(api.record, timeout_s=10)
    Path(api.record.log_path).unlink(missing_ok=True)


# --- the database -------------------------------------------------------------------------


def prepare_database(settings=None, say: Say = log.info) -> bool:
    """Migrate Prefect's SQLite database to this Prefect's head and register its block
    types, once (again when Prefect or its installed collections change), under a file lock.

    Returns True when the database is known to be at head (the server then need not
    check); False for a database that is not SQLite (the server migrates it on start,
    as Prefect does).
    """
    import fcntl

    import prefect

    settings = settings or _prefect_settings()
    url = settings.server.database.connection_url.get_secret_value()
    path = _sqlite_path(url)
    if path is None:
        return False
    home = Path(settings.home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = home / MARKER_FILE
    with open(home / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another command may be migrating it right now
        expected = {
            "prefect": prefect.__version__,
            "database": str(path),
            "collections": _collections(),
        }
        try:
            recorded = json.loads(marker.read_text())
        except (FileNotFoundError, ValueError):
            recorded = {}
        revision = _revision(path)
        if revision is not None and recorded == {**expected, "revision": revision}:
            return True
        say(f"Prefect: preparing its database {path} (once per Prefect version)")
        started = time.monotonic()
        env = {**os.environ, **settings.to_environment_variables(exclude_unset=True)}
        for what, argv in (
            ("migrate", ["-m", "prefect", "server", "database", "upgrade", "-y"]),
            ("register the block types in", ["-c", _REGISTER_BLOCKS]),
        ):
            _prepare_step(what, path, [sys.executable, *argv], env)
        marker.write_text(json.dumps({**expected, "revision": _revision(path)}))
        log.info("Prefect database ready in %.1f s", time.monotonic() - started)
        return True


def _prepare_step(what: str, path: Path, argv: list[str], env: dict[str, str]) -> None:
    import subprocess

    done = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise PrefectUnavailableError(
            f"could not {what} Prefect's database {path}:\n{tail}\n"
            f"move the file aside (or set PREFECT_HOME to a new folder) and retry"
        )


def _collections() -> list[str]:
    """The installed Prefect collections (their block types are registered too)."""
    from importlib.metadata import entry_points

    return sorted(
        f"{ep.name}={ep.dist.version if ep.dist else '?'}"
        for ep in entry_points(group="prefect.collections")
    )


def _sqlite_path(url: str) -> Path | None:
    prefix = "sqlite+aiosqlite:///"
    if not url.startswith(prefix) or ":memory:" in url:
        return None
    return Path(url[len(prefix) :]).expanduser()


def _revision(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


# --- helpers ------------------------------------------------------------------------------


def _prefect_settings():
    """Prefect's settings as Prefect reads them: environment, active profile, files."""
    from prefect.settings import get_current_settings

    return get_current_settings()


def _where_set(name: str) -> str:
    if name in os.environ:
        return "from the environment"
    try:
        from prefect.context import get_settings_context

        return f"from the Prefect profile {get_settings_context().profile.name!r}"
    except Exception:  # noqa: BLE001 - only a hint in a message
        return "from Prefect's settings"


def _healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    import httpx

    try:
        response = httpx.get(f"{api_url}/health", timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _running_local_server(url: str) -> str | None:
    """``url`` if a Prefect server answers there and runs this Prefect version (a client
    and a server of different versions may not agree)."""
    import httpx
    import prefect

    try:
        # generous: a busy server answers late; nothing listening is refused at once
        if httpx.get(f"{url}/health", timeout=10).status_code != 200:
            return None
        version = httpx.get(f"{url}/admin/version", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return None
    if str(version).split(".")[:2] != prefect.__version__.split(".")[:2]:
        log.info(
            "not using the Prefect server at %s: it runs Prefect %s, this is %s",
            url,
            version,
            prefect.__version__,
        )
        return None
    return url


def _point_prefect_at(url: str) -> None:
    """This process's flows (and anything it starts) talk to ``url``."""
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:  # settings already read: read them again
        import prefect.context

        prefect.context.refresh_global_settings_context()


def _drain_prefect_workers() -> None:
    """Deliver the logs and events the flows produced before their server goes away."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    except Exception as exc:  # noqa: BLE001 - losing a log line must not fail the command
        log.debug("could not drain Prefect's log and event workers: %s", exc)


def describe(api: PrefectApi) -> str:
    return {
        "configured": "the configured Prefect server",
        "local": "the local Prefect server",
        "temporary": "a temporary Prefect server",
    }[api.kind] + f" at {api.url}"


def log_of(api: PrefectApi, lines: int = 20) -> str:
    return log_tail(api.record.log_path, lines) if api.record else ""

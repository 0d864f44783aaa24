"""How the endpoint reaches the MLflow registry, the one reader it has: resolve an alias,
list the models holding an alias (``--all-models``), download a version, and annotate one
(the shadow's and the canary's figures: version tags and a report in the version's run).

MLflow's client never runs in the request-serving process: importing it takes seconds
and roughly doubles the process's resident memory. Each tracking URI is read the
lightest way that gives MLflow's answers:

* ``http(s)://`` (a tracking server, the production set-up): :class:`RestRegistry`, one
  call to MLflow's documented REST API per alias check;
* ``sqlite:///FILE`` (the default, ``make demo``): :class:`SqliteRegistry` reads the
  registry's tables read-only with the standard library's ``sqlite3`` (milliseconds, no
  memory to speak of). MLflow's schema is checked first; one this module does not know
  (or an ``MLFLOW_WORKSPACE``) goes to the helper instead;
* anything else (Databricks, a PostgreSQL store, ``file:``): :class:`HelperRegistry`, a
  short-lived ``python -m onnxflow.serving.registry_reader`` process per call that uses
  MLflow's own client (each call pays MLflow's import, a few seconds of CPU).

A new version's files are always downloaded by that helper process, with MLflow's own
artifact code. Annotations go to a tracking server's REST API (tags; a report through its
``mlflow-artifacts`` proxy when the run's artifacts live there) and otherwise to the
helper, which writes with MLflow's client: the SQLite file is only ever read here.
``registry_access`` (``ONNXFLOW_SERVE_REGISTRY_ACCESS``) forces one way: ``rest``,
``sqlite`` or ``mlflow`` (the helper).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote

from onnxflow.errors import RegistryError, answered_error
from onnxflow.serving import block_heavy_imports

log = logging.getLogger(__name__)

MODULE = "onnxflow.serving.registry_reader"
#: Where a version's reference profile lies in its run (``onnxflow.registration``).
PROFILE_PATH = "profile/reference.json"


@dataclass(frozen=True)
class Annotation:
    """What to write onto one version: tags, and files (path in its run -> text)."""

    name: str
    version: str
    tags: dict[str, str]
    files: dict[str, str]


class Registry(Protocol):
    def resolve(self, name: str, alias: str | None, version: str | None) -> tuple[str, dict]:
        """(version, tags) that ``alias`` (or the pinned ``version``) points at now."""

    def models_with_alias(self, alias: str) -> list[str]:
        """Names of the registered models where ``alias`` is set, sorted."""

    def download(self, name: str, version: str, dest: Path) -> Path:
        """Download the version's files into ``dest``; returns the folder holding them."""

    def profile(self, name: str, version: str) -> dict | None:
        """The version's reference profile (``profile/reference.json`` in its run), None
        when it has none."""

    def annotate(self, notes: list[Annotation]) -> None:
        """Set each note's tags on its version; write its files into the version's run."""


def registry_for(tracking_uri: str | None, access: str = "auto") -> Registry:
    """The reader for ``tracking_uri`` (``ServingSettings.tracking_uri``; None: MLflow's
    default, read by the helper's client)."""
    uri = tracking_uri or ""
    if access == "rest" or (access == "auto" and uri.startswith(("http://", "https://"))):
        return RestRegistry(uri)
    if access == "sqlite" or (access == "auto" and uri.startswith("sqlite:")):
        return SqliteRegistry(uri)
    return HelperRegistry(tracking_uri)


# --- the helper process: MLflow's own client, outside the endpoint ----------------------


def _helper(*args: str, timeout: float, tracking_uri: str | None) -> str:
    """Run ``python -m onnxflow.serving.registry_reader ARGS`` against ``tracking_uri``;
    its last line of output."""
    env = dict(os.environ)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        result = subprocess.run(
            [sys.executable, "-m", MODULE, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise RegistryError(
            f"registry helper ({' '.join(args[:2])}) gave no answer in {timeout:.0f} s"
        ) from None
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise RegistryError(f"registry helper ({' '.join(args[:2])}) failed: {tail}")
    return result.stdout.strip().splitlines()[-1]


def download_in_helper(name: str, version: str, dest: Path, tracking_uri: str | None) -> Path:
    return Path(
        _helper("download", name, version, str(dest), timeout=1800, tracking_uri=tracking_uri)
    )


def profile_in_helper(name: str, version: str, tracking_uri: str | None) -> dict | None:
    return json.loads(_helper("profile", name, version, timeout=120, tracking_uri=tracking_uri))


def annotate_in_helper(notes: list[Annotation], tracking_uri: str | None) -> None:
    """Every note in one helper process: MLflow's import is paid once per flush."""
    import tempfile

    if not notes:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="onnxflow-annotate-") as fh:
        json.dump([asdict(note) for note in notes], fh)
        fh.flush()
        _helper("annotate", fh.name, timeout=180, tracking_uri=tracking_uri)


class HelperRegistry:
    """MLflow's client in a short-lived helper process, per call."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.uri = tracking_uri

    def resolve(self, name: str, alias: str | None, version: str | None) -> tuple[str, dict]:
        args = (
            ("resolve", name, "--alias", alias)
            if alias
            else ("resolve", name, "--version", str(version))
        )
        answer = json.loads(_helper(*args, timeout=120, tracking_uri=self.uri))
        return answer["version"], answer["tags"]

    def models_with_alias(self, alias: str) -> list[str]:
        return json.loads(_helper("list", alias, timeout=120, tracking_uri=self.uri))

    def download(self, name: str, version: str, dest: Path) -> Path:
        return download_in_helper(name, version, dest, self.uri)

    def profile(self, name: str, version: str) -> dict | None:
        return profile_in_helper(name, version, self.uri)

    def annotate(self, notes: list[Annotation]) -> None:
        annotate_in_helper(notes, self.uri)


class MlflowRegistry:
    """MLflow's client, in this process: what the helper process runs (never the endpoint)."""

    def __init__(self) -> None:
        from mlflow import MlflowClient

        self._client = MlflowClient()

    def resolve(self, name: str, alias: str | None, version: str | None) -> tuple[str, dict]:
        if alias is not None:
            mv = self._client.get_model_version_by_alias(name, alias)
        else:
            mv = self._client.get_model_version(name, version)
        return str(mv.version), dict(mv.tags or {})

    def models_with_alias(self, alias: str) -> list[str]:
        names, token = [], None
        while True:
            page = self._client.search_registered_models(max_results=1000, page_token=token)
            names += [m.name for m in page if alias in (m.aliases or {})]
            token = page.token
            if not token:
                return sorted(names)

    def download(self, name: str, version: str, dest: Path) -> Path:
        import mlflow.artifacts

        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)
            )
        )

    def profile(self, name: str, version: str) -> dict | None:
        import mlflow.artifacts

        run_id = self._client.get_model_version(name, version).run_id
        if not run_id:
            return None
        try:
            return mlflow.artifacts.load_dict(f"runs:/{run_id}/{PROFILE_PATH}")
        except Exception:  # noqa: BLE001  (MLflow raises several kinds for a missing file)
            return None

    def annotate(self, notes: list[Annotation]) -> None:
        for note in notes:
            for key, value in note.tags.items():
                self._client.set_model_version_tag(note.name, note.version, key, str(value))
            if not note.files:
                continue
            run_id = self._client.get_model_version(note.name, note.version).run_id
            if not run_id:
                log.warning("%s version %s has no run: files not written", note.name, note.version)
            for path, text in note.files.items() if run_id else ():
                self._client.log_text(run_id, text, path)


# --- a tracking server: its REST API ----------------------------------------------------


class RestRegistry:
    """A tracking server over its REST API; downloads in the helper process."""

    def __init__(self, uri: str) -> None:
        import httpx

        self.uri = uri.rstrip("/")
        headers, auth = {}, None
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            auth = (
                os.environ["MLFLOW_TRACKING_USERNAME"],
                os.environ.get("MLFLOW_TRACKING_PASSWORD", ""),
            )
        verify: bool | str = True
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            verify = False
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        self._http = httpx.Client(
            base_url=self.uri, headers=headers, auth=auth, verify=verify, timeout=10.0
        )

    def resolve(self, name: str, alias: str | None, version: str | None) -> tuple[str, dict]:
        if alias is not None:
            path, params = "/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": alias}
        else:
            path, params = "/api/2.0/mlflow/model-versions/get", {"name": name, "version": version}
        mv = self._call("GET", path, params=params)["model_version"]
        tags = {t["key"]: t.get("value", "") for t in mv.get("tags", [])}
        return str(mv["version"]), tags

    def models_with_alias(self, alias: str) -> list[str]:
        names: set[str] = set()
        params: dict[str, str | int] = {"max_results": 1000}
        while True:
            page = self._call("GET", "/api/2.0/mlflow/registered-models/search", params=params)
            for model in page.get("registered_models", []):
                if any(a.get("alias") == alias for a in model.get("aliases", [])):
                    names.add(model["name"])
            token = page.get("next_page_token")
            if not token:
                return sorted(names)
            params["page_token"] = token

    def download(self, name: str, version: str, dest: Path) -> Path:
        return download_in_helper(name, version, dest, self.uri)

    def profile(self, name: str, version: str) -> dict | None:
        return profile_in_helper(name, version, self.uri)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        response = self._http.request(method, path, **kwargs)
        if response.status_code != 200:
            message = answered_error(response, "message")
            raise RegistryError(f"{self.uri}{path} answered {response.status_code}: {message}")
        return response.json() if response.content else {}

    def annotate(self, notes: list[Annotation]) -> None:
        """Tags through the REST API; files through the server's artifact proxy when the
        run's artifacts live behind it, else with MLflow's own code in the helper."""
        elsewhere = []
        for note in notes:
            for key, value in note.tags.items():
                self._call(
                    "POST",
                    "/api/2.0/mlflow/model-versions/set-tag",
                    json={"name": note.name, "version": note.version, "key": key, "value": value},
                )
            if note.files and not self._write_proxied(note):
                elsewhere.append(Annotation(note.name, note.version, {}, note.files))
        annotate_in_helper(elsewhere, self.uri)

    def _write_proxied(self, note: Annotation) -> bool:
        mv = self._call(
            "GET",
            "/api/2.0/mlflow/model-versions/get",
            params={"name": note.name, "version": note.version},
        )["model_version"]
        if not mv.get("run_id"):
            log.warning("%s version %s has no run: files not written", note.name, note.version)
            return True
        run = self._call("GET", "/api/2.0/mlflow/runs/get", params={"run_id": mv["run_id"]})
        root = run["run"]["info"]["artifact_uri"]
        if not root.startswith("mlflow-artifacts:"):  # s3://, a path ...
            return False
        # mlflow-artifacts:/EXP/RUN/artifacts or mlflow-artifacts://host:port/EXP/RUN/artifacts
        rest = root.removeprefix("mlflow-artifacts:").lstrip("/")
        if root.startswith("mlflow-artifacts://"):
            rest = rest.partition("/")[2]
        for path, text in note.files.items():
            self._call(
                "PUT",
                f"/api/2.0/mlflow-artifacts/artifacts/{rest.rstrip('/')}/{path}",
                content=text.encode(),
            )
        return True


# --- a local SQLite store: its tables, read-only ------------------------------------------

#: The columns this reader queries, per table (MLflow's registry schema since 2.3).
SQLITE_SCHEMA = {
    "registered_models": {"name"},
    "registered_model_aliases": {"name", "alias", "version"},
    "model_versions": {"name", "version", "current_stage"},
    "model_version_tags": {"name", "version", "key", "value"},
}
DELETED = "Deleted_Internal"  # MLflow's stage of a soft-deleted version
DEFAULT_WORKSPACE = "default"


def sqlite_path(uri: str) -> Path | None:
    """``sqlite:///rel.db`` or ``sqlite:////abs.db`` (SQLAlchemy's form) -> the file."""
    if not uri.startswith("sqlite:///"):
        return None  # sqlite:// (in memory) or another driver form
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path).resolve() if path else None


class SqliteRegistry:
    """MLflow's SQLite store read directly (read-only), with MLflow's answers; downloads
    in the helper process. A schema it does not know goes to the helper instead."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.path = sqlite_path(uri)
        self._fallback: HelperRegistry | None = None
        self._workspace: bool | None = None  # has MLflow 3's workspace column
        if self.path is None or os.environ.get("MLFLOW_WORKSPACE", DEFAULT_WORKSPACE) != (
            DEFAULT_WORKSPACE
        ):
            self._use_helper(f"{uri!r} is not a plain SQLite file URI or MLFLOW_WORKSPACE is set")

    def _use_helper(self, why: str) -> None:
        log.warning("reading the registry through the helper process (MLflow's client): %s", why)
        self._fallback = HelperRegistry(self.uri)

    def _connect(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise RegistryError(
                f"no MLflow store at {self.path} (MLFLOW_TRACKING_URI="
                f"{self.uri}); run the pipeline first, or point it elsewhere"
            )
        return sqlite3.connect(
            f"file:{quote(str(self.path))}?mode=ro", uri=True, timeout=10, check_same_thread=False
        )

    def _check_schema(self, db: sqlite3.Connection) -> bool:
        for table, needed in SQLITE_SCHEMA.items():
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if not needed <= columns:
                self._use_helper(
                    f"{self.path} has no {table}({', '.join(sorted(needed))}) "
                    "(not a registry schema this reader knows)"
                )
                return False
            if table == "registered_model_aliases":
                self._workspace = "workspace" in columns
        return True

    def resolve(self, name: str, alias: str | None, version: str | None) -> tuple[str, dict]:
        if self._fallback is not None:
            return self._fallback.resolve(name, alias, version)
        try:
            with self._connect() as db:
                if self._workspace is None and not self._check_schema(db):
                    return self._fallback.resolve(name, alias, version)
                return self._resolve(db, name, alias, version)
        except sqlite3.Error as exc:
            raise RegistryError(f"reading the registry in {self.path}: {exc}") from None

    def _query(self, db, sql: str, *params) -> list[tuple]:
        if self._workspace:  # MLflow's store reads the default workspace
            sql += " AND workspace = ?"
            params = (*params, DEFAULT_WORKSPACE)
        return db.execute(sql, params).fetchall()

    def _resolve(self, db, name: str, alias: str | None, version: str | None):
        if not self._query(db, "SELECT 1 FROM registered_models WHERE name = ?", name):
            raise RegistryError(f"Registered Model with name={name} not found")
        live = f"name = ? AND current_stage != '{DELETED}'"
        if alias is not None and alias.lower() == "latest":  # MLflow's reserved alias
            rows = self._query(
                db, f"SELECT MAX(CAST(version AS INTEGER)) FROM model_versions WHERE {live}", name
            )
            if not rows or rows[0][0] is None:
                raise RegistryError(f"Latest version not found for model {name}.")
            version = str(rows[0][0])
        elif alias is not None:
            rows = self._query(
                db,
                "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                name,
                alias,
            )
            if not rows:
                raise RegistryError(f"Registered model alias {alias} not found.")
            version = str(rows[0][0])
        if not self._query(
            db, f"SELECT 1 FROM model_versions WHERE {live} AND version = ?", name, int(version)
        ):
            raise RegistryError(f"Model Version (name={name}, version={version}) not found")
        tags = self._query(
            db,
            "SELECT key, value FROM model_version_tags WHERE name = ? AND version = ?",
            name,
            int(version),
        )
        return version, {key: value or "" for key, value in tags}

    def models_with_alias(self, alias: str) -> list[str]:
        if self._fallback is not None:
            return self._fallback.models_with_alias(alias)
        try:
            with self._connect() as db:
                if self._workspace is None and not self._check_schema(db):
                    return self._fallback.models_with_alias(alias)
                rows = self._query(
                    db, "SELECT DISTINCT name FROM registered_model_aliases WHERE alias = ?", alias
                )
        except sqlite3.Error as exc:
            raise RegistryError(f"reading the registry in {self.path}: {exc}") from None
        return sorted(row[0] for row in rows)

    def annotate(self, notes: list[Annotation]) -> None:
        """Written by MLflow's client in the helper: this reader never writes the file."""
        annotate_in_helper(notes, self.uri)

    def download(self, name: str, version: str, dest: Path) -> Path:
        """A version stored on this machine's disk (the store's default ``./mlruns``) is
        copied as MLflow's own download would copy it, without paying MLflow's import in a
        helper (seconds: a hot swap to an uncached version waited on it). Anything else
        (a remote artifact store, a relative or unknown location) goes to the helper."""
        local = None if self._fallback is not None else self._local_artifacts(name, version)
        if local is None:
            return download_in_helper(name, version, dest, self.uri)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, dest, dirs_exist_ok=True)
        return dest

    def profile(self, name: str, version: str) -> dict | None:
        """Read from the run's artifact folder when it is on this machine's disk (as the
        download copies it), else by the helper."""
        root = None if self._fallback is not None else self._local_run_artifacts(name, version)
        if root is None:
            return profile_in_helper(name, version, self.uri)
        # A run folder on this disk without the file (or not made at all: MLflow 3 keeps a
        # logged model's files apart) has no profile: no helper process, whose seconds a
        # hot swap would wait on.
        path = root / PROFILE_PATH
        return json.loads(path.read_text()) if path.is_file() else None

    def _local_run_artifacts(self, name: str, version: str) -> Path | None:
        return _local_path(
            self._version_value(
                "SELECT r.artifact_uri FROM model_versions v JOIN runs r "
                "ON r.run_uuid = v.run_id WHERE v.name = ? AND v.version = ?",
                name,
                version,
            )
        )

    def _local_artifacts(self, name: str, version: str) -> Path | None:
        return _local_dir(
            self._version_value(
                "SELECT storage_location FROM model_versions WHERE name = ? AND version = ?",
                name,
                version,
            )
        )

    def _version_value(self, sql: str, name: str, version: str) -> str | None:
        """The first value ``sql`` (with parameters name, version) finds; None when it finds
        none or the store cannot be read."""
        try:
            with self._connect() as db:
                rows = self._query(db, sql, name, int(version))
        except (sqlite3.Error, ValueError):
            return None
        return rows[0][0] if rows else None


def _local_path(location: str | None) -> Path | None:
    """An artifact location on this machine's disk (a path or ``file://``, made or not),
    else None."""
    location = location or ""
    if location.startswith("file://"):
        location = unquote(location.removeprefix("file://"))
    path = Path(location)
    return path if location and path.is_absolute() else None


def _local_dir(location: str | None) -> Path | None:
    """An artifact folder that exists on this machine's disk, else None."""
    path = _local_path(location)
    return path if path is not None and path.is_dir() else None


def check_login(tracking_uri: str | None) -> None:
    """At start-up: one request to a tracking server with the endpoint's login
    (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``); refused credentials raise RegistryError
    with what to fix. An unreachable server passes: the alias watcher retries it."""
    import httpx

    if not (tracking_uri or "").startswith(("http://", "https://")):
        return
    client = RestRegistry(tracking_uri)
    try:
        response = client._http.get(
            "/api/2.0/mlflow/registered-models/search", params={"max_results": 1}
        )
    except httpx.HTTPError:
        return
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if response.status_code == 401:
        who = (
            f"the login of MLFLOW_TRACKING_USERNAME={user!r}"
            if user
            else "no login (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
        )
        raise RegistryError(f"the MLflow server at {client.uri} refuses {who}: 401 unauthenticated")
    if response.status_code == 403:
        raise RegistryError(
            f"the MLflow server at {client.uri} lets {user!r} log in but not "
            f"read the registry (403): grant the account READ"
        )


def main(argv: list[str] | None = None) -> None:
    """The helper process: MLflow's client for one call, answer on the last line of stdout.

    ``download NAME VERSION DEST`` prints the local folder;
    ``resolve NAME (--alias ALIAS | --version VERSION)`` prints ``{"version", "tags"}``;
    ``annotate FILE`` writes the notes of a JSON list of :class:`Annotation` and prints ``ok``;
    ``list ALIAS`` prints a JSON list of the models holding the alias;
    ``profile NAME VERSION`` prints the version's reference profile (JSON, ``null``: none).
    """
    args = sys.argv[1:] if argv is None else argv
    usage = (
        f"usage: python -m {MODULE} download NAME VERSION DEST\n"
        f"       python -m {MODULE} resolve NAME (--alias ALIAS | --version VERSION)\n"
        f"       python -m {MODULE} annotate FILE\n"
        f"       python -m {MODULE} list ALIAS\n"
        f"       python -m {MODULE} profile NAME VERSION"
    )
    block_heavy_imports()
    logging.basicConfig(level=logging.WARNING)
    if len(args) == 4 and args[0] == "download":
        _, name, version, dest = args
        print(MlflowRegistry().download(name, version, Path(dest)))
    elif len(args) == 4 and args[0] == "resolve" and args[2] in ("--alias", "--version"):
        _, name, flag, value = args
        alias, version = (value, None) if flag == "--alias" else (None, value)
        resolved, tags = MlflowRegistry().resolve(name, alias, version)
        print(json.dumps({"version": resolved, "tags": tags}))
    elif len(args) == 2 and args[0] == "annotate":
        notes = [Annotation(**note) for note in json.loads(Path(args[1]).read_text())]
        MlflowRegistry().annotate(notes)
        print("ok")
    elif len(args) == 3 and args[0] == "profile":
        print(json.dumps(MlflowRegistry().profile(args[1], args[2])))
    elif len(args) == 2 and args[0] == "list":
        print(json.dumps(MlflowRegistry().models_with_alias(args[1])))
    else:
        sys.exit(usage)


if __name__ == "__main__":
    main()

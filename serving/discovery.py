"""Which registered models have an alias: what ``--all-models ALIAS`` serves.

Read the light way for each tracking URI, as alias checks are: one REST call (paged)
to a tracking server, a read-only query of a local SQLite store, and otherwise a
short-lived ``python -m onnxflow.serving.discovery ALIAS`` process with MLflow's client,
so the endpoint process never imports MLflow for it.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from onnxflow.errors import RegistryError

log = logging.getLogger(__name__)

MODULE = "onnxflow.serving.discovery"


def models_with_alias(
    alias: str, tracking_uri: str | None = None, access: str = "auto"
) -> list[str]:
    """Names of the registered models where ``alias`` is set, sorted."""
    uri = tracking_uri if tracking_uri is not None else os.environ.get("MLFLOW_TRACKING_URI", "")
    if access == "rest" or (access == "auto" and uri.startswith(("http://", "https://"))):
        return sorted(_from_rest(uri, alias))
    path = _sqlite_file(uri)
    if path is not None and access in ("auto", "sqlite"):
        try:
            return sorted(_from_sqlite(path, alias))
        except sqlite3.Error as exc:
            log.warning("reading aliases from %s failed (%s); asking MLflow's client", path, exc)
    return sorted(_from_helper(alias))


def _from_rest(uri: str, alias: str) -> set[str]:
    import httpx

    headers, auth = {}, None
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (
            os.environ["MLFLOW_TRACKING_USERNAME"],
            os.environ.get("MLFLOW_TRACKING_PASSWORD", ""),
        )
    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    names: set[str] = set()
    path = "/api/2.0/mlflow/registered-models/search"
    params: dict[str, str | int] = {"max_results": 1000}
    with httpx.Client(
        base_url=uri.rstrip("/"), headers=headers, auth=auth, verify=verify, timeout=10.0
    ) as http:
        while True:
            response = http.get(path, params=params)
            if response.status_code != 200:
                raise RegistryError(
                    f"{uri}{path} answered {response.status_code}: {response.text[:300]}"
                )
            page = response.json()
            for model in page.get("registered_models", []):
                if any(a.get("alias") == alias for a in model.get("aliases", [])):
                    names.add(model["name"])
            token = page.get("next_page_token")
            if not token:
                return names
            params["page_token"] = token


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path).resolve() if path else None


def _from_sqlite(path: Path, alias: str) -> set[str]:
    if not path.is_file():
        raise RegistryError(f"no MLflow store at {path}")
    db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=10)
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(registered_model_aliases)")}
        if not {"name", "alias"} <= columns:
            raise sqlite3.DatabaseError("no registered_model_aliases(name, alias) table")
        sql, params = "SELECT DISTINCT name FROM registered_model_aliases WHERE alias = ?", [alias]
        if "workspace" in columns:  # MLflow 3: the default workspace is what its client reads
            sql += " AND workspace = ?"
            params.append("default")
        return {row[0] for row in db.execute(sql, params)}
    finally:
        db.close()


def _from_helper(alias: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", MODULE, alias],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise RegistryError(f"listing models with alias {alias!r} failed: {tail}")
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    """``python -m onnxflow.serving.discovery ALIAS``: prints a JSON list of model names."""
    from onnxflow.serving import block_heavy_imports

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit(f"usage: python -m {MODULE} ALIAS")
    block_heavy_imports()
    from mlflow import MlflowClient

    client = MlflowClient()
    names, token = [], None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        names += [m.name for m in page if args[0] in (m.aliases or {})]
        token = page.token
        if not token:
            break
    print(json.dumps(sorted(names)))


if __name__ == "__main__":
    main()

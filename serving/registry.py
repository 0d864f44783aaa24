"""How the endpoint reads the MLflow registry: resolve an alias, download a version.

Two ways, same answers:

* :class:`RestRegistry`, for a tracking server (``http(s)://``, the production set-up):
  the alias is resolved with one call to MLflow's documented REST API, and a new
  version's files are downloaded by a short-lived ``python -m onnxflow.serving.registry``
  process that uses MLflow's own artifact code. The endpoint process never imports
  MLflow, which would roughly double its resident memory.
* :class:`MlflowRegistry`, for every other tracking URI (a local SQLite file, Databricks):
  MLflow's client in process, imported on first use (the endpoint process blocks pandas
  and pyarrow at start: :func:`onnxflow.serving.block_heavy_imports`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from onnxflow.errors import RegistryError
from onnxflow.serving import block_heavy_imports

log = logging.getLogger(__name__)

class Registry(Protocol):
    def resolve(self, name: str, alias: str | None, version: str | None) -> tuple[str, dict]:
        """(version, tags) that ``alias`` (or the pinned ``version``) points at now."""

    def download(self, name: str, version: str, dest: Path) -> Path:
        """Download the version's files into ``dest``; returns the folder holding them."""


def registry_for(tracking_uri: str | None, access: str = "auto") -> Registry:
    uri = tracking_uri or ""
    if access == "rest" or (access == "auto" and uri.startswith(("http://", "https://"))):
        return RestRegistry(uri)
    return MlflowRegistry()


class MlflowRegistry:
    """MLflow's client, in this process."""

    def __init__(self) -> None:
        from mlflow import MlflowClient

        self._client = MlflowClient()

    def resolve(self, name: str, alias: str | None, version: str | None) -> tuple[str, dict]:
        if alias is not None:
            mv = self._client.get_model_version_by_alias(name, alias)
        else:
            mv = self._client.get_model_version(name, version)
        return str(mv.version), dict(mv.tags or {})

    def download(self, name: str, version: str, dest: Path) -> Path:
        import mlflow.artifacts

        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)))


class RestRegistry:
    """A tracking server over its REST API; downloads in a helper process."""

    def __init__(self, uri: str) -> None:
        import httpx

        self.uri = uri.rstrip("/")
        headers, auth = {}, None
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            auth = (os.environ["MLFLOW_TRACKING_USERNAME"],
                    os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        verify: bool | str = True
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            verify = False
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        self._http = httpx.Client(base_url=self.uri, headers=headers, auth=auth, verify=verify,
                                  timeout=10.0)

    def resolve(self, name: str, alias: str | None, version: str | None) -> tuple[str, dict]:
        if alias is not None:
            path, params = "/api/2.0/mlflow/registered-models/alias", {"name": name,
                                                                        "alias": alias}
        else:
            path, params = "/api/2.0/mlflow/model-versions/get", {"name": name,
                                                                   "version": version}
        response = self._http.get(path, params=params)
        if response.status_code != 200:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise RegistryError(f"{self.uri}{path} answered {response.status_code}: {message}")
        mv = response.json()["model_version"]
        tags = {t["key"]: t.get("value", "") for t in mv.get("tags", [])}
        return str(mv["version"]), tags

    def download(self, name: str, version: str, dest: Path) -> Path:
        result = subprocess.run(
            [sys.executable, "-m", "onnxflow.serving.registry", "download", name, version, str(dest)],
            capture_output=True, text=True, timeout=1800, check=False,
        )
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise RegistryError(f"downloading {name} version {version} failed: {tail}")
        return Path(result.stdout.strip().splitlines()[-1])


def check_login(tracking_uri: str | None) -> None:
    """At start-up: one request to a tracking server with the endpoint's login
    (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``); refused credentials raise RegistryError
    with what to fix. An unreachable server passes: the alias watcher retries it."""
    import httpx

    if not (tracking_uri or "").startswith(("http://", "https://")):
        return
    client = RestRegistry(tracking_uri)
    try:
        response = client._http.get("/api/2.0/mlflow/registered-models/search",
                                    params={"max_results": 1})
    except httpx.HTTPError:
        return
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if response.status_code == 401:
        who = (f"the login of MLFLOW_TRACKING_USERNAME={user!r}" if user else
               "no login (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)")
        raise RegistryError(f"the MLflow server at {client.uri} refuses {who}: 401 "
                            f"unauthenticated")
    if response.status_code == 403:
        raise RegistryError(f"the MLflow server at {client.uri} lets {user!r} log in but not "
                            f"read the registry (403): grant the account READ")


def main(argv: list[str] | None = None) -> None:
    """``python -m onnxflow.serving.registry download NAME VERSION DEST``: prints the local folder."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4 or args[0] != "download":
        sys.exit("usage: python -m onnxflow.serving.registry download NAME VERSION DEST")
    _, name, version, dest = args
    block_heavy_imports()
    logging.basicConfig(level=logging.WARNING)
    folder = MlflowRegistry().download(name, version, Path(dest))
    print(folder)


if __name__ == "__main__":
    main()

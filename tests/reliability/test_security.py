"""Security: the token guards every inference and admin route; loopback by default;
external data that leaves its folder is refused at registration and at load; the
endpoint never unpickles anything; tokens never reach logs or error messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from onnxflow.processes import free_port
from onnxflow.serving.launcher import start_background, stop_background
from onnxflow.serving.openapi import openapi_document
from onnxflow.serving.settings import ServingSettings
from tests.conftest import point_external_data, save_checked_onnx
from tests.reliability.conftest import (
    TOKEN,
    _example,
    endpoint_pid,
    finish,
    served_version,
    start_endpoint,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(300)]

WRONG = [
    "",
    "Bearer",
    "Bearer wrong-token-000",
    f"Bearer {TOKEN}x",
    f"Basic {TOKEN}",
    f"bearer {TOKEN[:-1]}",
]


def _guarded_routes(name: str, version: str) -> list[tuple[str, str]]:
    """(method, path) of every route the OpenAPI document marks as needing the token."""
    routes = []
    for template, methods in openapi_document(name)["paths"].items():
        for method, spec in methods.items():
            if spec.get("security"):
                routes.append(
                    (method.upper(), template.replace("{name}", name).replace("{version}", version))
                )
    return routes


def test_every_inference_and_admin_route_refuses_a_missing_or_wrong_token(swappy, versions):
    routes = _guarded_routes("swappy", versions["v1"])
    paths = {p for _, p in routes}
    assert {
        "/invocations",
        "/v2/models/swappy/infer",
        "/admin/reload",
        "/admin/status",
        f"/v2/models/swappy/versions/{versions['v1']}/infer",
    } <= paths
    with httpx.Client(base_url=swappy.url, timeout=10) as http:
        for method, path in routes:
            for header in WRONG:
                headers = {"authorization": header} if header else {}
                response = http.request(
                    method, path, headers=headers, json={"inputs": [[0.0] * 64]}
                )
                assert response.status_code == 401, (method, path, header, response.text)
                assert response.headers.get("www-authenticate") == "Bearer"
                assert TOKEN not in response.text and TOKEN[:-1] not in response.text


def test_the_default_bind_is_loopback(swappy, monkeypatch):
    from onnxflow.stack.settings import StackSettings

    for key in list(os.environ):
        if key.startswith(("ONNXFLOW_SERVE_", "ONNXFLOW_STACK_")):
            monkeypatch.delenv(key)
    assert ServingSettings().host == "127.0.0.1"
    assert StackSettings().host == "127.0.0.1"
    # The running endpoint listens on 127.0.0.1 only (/proc/net/tcp: LISTEN is state 0A).
    port = int(swappy.url.rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                listening.append(local.rsplit(":", 1)[0])
    assert listening == ["0100007F"], listening


def _escaping_copy(model: Path, folder: Path) -> Path:
    """``model`` re-saved with its weights in ``folder/../stolen.data``, referenced as such."""
    import onnx

    proto = onnx.load(str(model))
    save_checked_onnx(proto, folder / "model.onnx", True, "model.onnx.data")
    (folder / "model.onnx.data").rename(folder.parent / "stolen.data")
    point_external_data(folder / "model.onnx", "../stolen.data")
    return folder / "model.onnx"


def test_external_data_leaving_its_folder_is_refused_at_registration(
    registry, model_files, tmp_path
):
    from mlflow import MlflowClient

    from onnxflow.errors import UnsafeModelError

    bad = _escaping_copy(model_files["mlp"], tmp_path / "bad")
    with pytest.raises(UnsafeModelError, match="outside"):
        registry.register("escapee", bad, _example())
    with registry.active():
        assert MlflowClient().search_model_versions("name='escapee'") == []


def test_external_data_leaving_its_folder_is_refused_at_load(
    swappy, registry, versions, model_files, tmp_path
):
    """A registered version whose stored files are rewritten to read outside their folder:
    refused by the endpoint (before the digest is even computed), old one keeps serving."""
    import shutil

    v1 = versions["v1"]
    registry.set_alias("swappy", "champion", v1)
    wait_for(lambda: served_version(swappy) == v1, timeout=15)
    version = registry.register("swappy", model_files["mlp_v3"], _example(), aliases=())
    stored = registry.stored_folder("swappy", version)
    escaped = _escaping_copy(stored / "model.onnx", tmp_path / "escaped")
    shutil.copyfile(escaped, stored / "model.onnx")
    (stored / "model.onnx.data").unlink(missing_ok=True)
    shutil.copyfile(tmp_path / "stolen.data", stored.parent / "stolen.data")
    registry.set_alias("swappy", "champion", version)
    try:
        with swappy.client() as http:
            refused = wait_for(
                lambda: http.get("/admin/status").json()["refused"].get(version), timeout=15
            )
        assert "outside" in refused, refused
        assert served_version(swappy) == v1
    finally:
        registry.set_alias("swappy", "champion", v1)


SITECUSTOMIZE = textwrap.dedent("""
    import os, sys
    _log = os.environ.get("ONNXFLOW_AUDIT_PICKLE")
    if _log:
        def _audit(event, args):
            if event in ("pickle.find_class", "marshal.loads"):
                if event == "marshal.loads":
                    return
                with open(_log, "a") as fh:
                    fh.write(f"{event} {args!r}\\n")
        sys.addaudithook(_audit)
""")


def test_the_endpoint_never_unpickles(registry, versions, tmp_path, monkeypatch, report):
    """An audit hook in the endpoint process records every ``pickle.find_class``; a
    python_function model whose pickle would leave a marker file is served as champion."""
    import pickle

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    audit = tmp_path / "pickle-audit.log"
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PYTHONPATH", f"{hooks}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("ONNXFLOW_AUDIT_PICKLE", str(audit))

    # The hook sees unpickling (the control: a pickle that names a class).
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import pickle, collections; pickle.loads(pickle.dumps(collections.OrderedDict()))",
        ],
        check=True,
    )
    assert "pickle.find_class" in audit.read_text()
    audit.unlink()

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "pickled-model"
    folder.mkdir()
    (folder / "model.pkl").write_bytes(pickle.dumps(Payload()))
    (folder / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: mlflow.sklearn\n"
        "    model_path: model.pkl\n    pickled_model: model.pkl\n"
        "  sklearn:\n    pickled_model: model.pkl\n    serialization_format: cloudpickle\n"
    )
    with registry.active():
        import mlflow

        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(folder), "model")
        mv = mlflow.register_model(f"runs:/{run.info.run_id}/model", "pickled")
        mlflow.MlflowClient().set_registered_model_alias("pickled", "champion", mv.version)
        mlflow.MlflowClient().set_model_version_tag("pickled", mv.version, "onnx_sha256", "0")

    endpoint = start_endpoint(
        registry, tmp_path / "audited", model="swappy@champion", poll_interval_s=0.2
    )
    pickled = None
    try:
        with endpoint.client() as http:
            for _ in range(200):
                assert http.post("/invocations", json={"inputs": [[0.5] * 64]}).status_code == 200
            assert http.post("/admin/reload").status_code == 200
        # The same process set up on the pickled model: refused, nothing unpickled.
        os.environ["MLFLOW_TRACKING_URI"] = registry.uri
        try:
            pickled = start_background(
                ServingSettings(
                    model="pickled@champion",
                    port=free_port(),
                    cache_dir=tmp_path / "pc",
                    poll_interval_s=0.2,
                ),
                tmp_path / "pickled",
            )
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI")
        log = tmp_path / "pickled" / "endpoint.log"
        wait_for(lambda: "not an ONNX model" in log.read_text(), timeout=60)
    finally:
        finish(endpoint, report)
        if pickled is not None:
            stop_background(tmp_path / "pickled")
    assert not marker.exists()
    assert not audit.exists() or audit.read_text() == "", audit.read_text()


def test_tokens_never_reach_logs_or_error_messages(swappy, tmp_path, monkeypatch):
    from pydantic import ValidationError

    # The endpoint's own traces: its log, its state files, its command line, its answers.
    with httpx.Client(base_url=swappy.url, timeout=10) as http:
        bodies = [
            http.post(
                "/invocations",
                json={"inputs": [[0.0] * 64]},
                headers={"authorization": f"Bearer {TOKEN}x"},
            ).text,
            http.get("/metrics").text,
            http.get("/admin/status", headers={"authorization": f"Bearer {TOKEN}"}).text,
        ]
    files = [p.read_text(errors="replace") for p in swappy.state_dir.iterdir() if p.is_file()]
    cmdline = Path(f"/proc/{endpoint_pid(swappy)}/cmdline").read_bytes().decode()
    for text in (*bodies, *files, cmdline):
        assert TOKEN not in text

    # Settings errors name the problem, never the value (a short token is still a secret).
    for value in ("sh0rt", "tiny"):
        with pytest.raises(ValidationError) as bad:
            ServingSettings(token=value)
        assert value not in str(bad.value) and "8 characters" in str(bad.value)
    monkeypatch.setenv("ONNXFLOW_SERVE_TOKEN", "sh0rt")
    started = subprocess.run(
        [sys.executable, "-m", "onnxflow.serving"], capture_output=True, text=True, timeout=60
    )
    assert started.returncode != 0 and "sh0rt" not in started.stderr + started.stdout
    assert "8 characters" in started.stderr
    monkeypatch.delenv("ONNXFLOW_SERVE_TOKEN")

    # The registry's bearer token, when the tracking server is unreachable.
    secret = "mlflow-secret-token-42"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    state = tmp_path / "unreachable"
    start_background(
        ServingSettings(
            model="swappy@champion", port=free_port(), cache_dir=tmp_path / "c", token=TOKEN
        ),
        state,
    )
    try:
        wait_for(lambda: "cannot resolve" in (state / "endpoint.log").read_text(), timeout=30)
        time.sleep(0.5)
    finally:
        stop_background(state)
    text = (state / "endpoint.log").read_text()
    assert secret not in text and TOKEN not in text

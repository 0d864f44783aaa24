"""deploy: run the endpoint as a managed background process, and stop it.

``deploy_endpoint`` starts ``python -m onnxflow.serving`` (pid and log files in ``state_dir``),
waits until it is ready, sends the registered input example as a smoke test and returns
the URL; ``stop_endpoint`` stops it; ``endpoint_status`` says what it serves. These are
plain functions (the CLI's ``run --deploy``, ``serve`` and ``stop`` call them); no
Prefect here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from onnxflow.errors import ServingError
from onnxflow.processes import log_tail
from onnxflow.serving.launcher import (
    DEFAULT_STATE_DIR,
    background_status,
    make_settings,
    read_info,
    start_background,
    stop_background,
    wait_ready,
)
from onnxflow.serving.settings import ServingSettings

log = logging.getLogger(__name__)

SMOKE_FILE = "smoke-test.json"


def deploy_endpoint(
    model: str = "digits@champion",
    *,
    port: int | None = None,
    host: str | None = None,
    token: str | None = None,
    settings: ServingSettings | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    timeout_s: float = 90.0,
) -> str:
    """Start (or restart) the endpoint for ``model``, smoke-test it, return its URL.

    ``settings`` gives every option; ``port``/``host``/``token`` override it (None: the
    environment's ``ONNXFLOW_SERVE_*`` or the default). An endpoint already running from
    ``state_dir`` is stopped first: deploying again replaces it.
    """
    base = settings.model_dump() if settings is not None else {}
    base.update(
        {
            k: v
            for k, v in dict(model=model, port=port, host=host, token=token).items()
            if v is not None
        }
    )
    settings = make_settings(**base)
    if stop_endpoint(state_dir):
        log.info("stopped the previous endpoint from %s", state_dir)
    info = start_background(settings, state_dir)
    try:
        seconds = wait_ready(info, timeout_s)
        prediction = smoke_test(info.url, settings)
    except BaseException:  # Ctrl-C or SIGTERM while it starts: no half-deployed endpoint
        stop_background(state_dir)
        raise
    (Path(state_dir) / SMOKE_FILE).write_text(json.dumps(prediction))
    log.info(
        "endpoint ready in %.1f s at %s; the registered example gave %s",
        seconds,
        info.url,
        prediction,
    )
    return info.url


def smoke_test(url: str, settings: ServingSettings) -> dict:
    """POST the version's registered input example to /invocations; returns the answer."""
    import httpx

    headers = {}
    if settings.token is not None:
        headers["authorization"] = f"Bearer {settings.token.get_secret_value()}"
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        example = http.get(f"/v2/models/{settings.model_name}/example")
        if example.status_code != 200:
            raise ServingError(
                f"smoke test: GET the example failed ({example.status_code}): {example.text}"
            )
        response = http.post("/invocations", json=example.json())
    if response.status_code != 200:
        raise ServingError(
            f"smoke test: the registered input example got {response.status_code}: {response.text}"
        )
    body = response.json()
    return {"version": response.headers.get("x-model-version"), "predictions": body["predictions"]}


def stop_endpoint(state_dir: Path = DEFAULT_STATE_DIR) -> bool:
    """Stop the endpoint started from ``state_dir``; False if none was running."""
    return stop_background(state_dir)


def endpoint_status(state_dir: Path = DEFAULT_STATE_DIR) -> dict | None:
    """pid, URL, model, readiness, served version and the deploy's smoke-test answer
    (``smoke_test``: version and predictions); None if no endpoint runs."""
    status = background_status(state_dir)
    smoke = Path(state_dir) / SMOKE_FILE
    if status is not None and smoke.is_file():
        status["smoke_test"] = json.loads(smoke.read_text())
    if status is None and read_info(state_dir) is not None:
        info = read_info(state_dir)
        log.warning(
            "endpoint pid %s from %s is gone; last log lines:\n%s",
            info.pid,
            state_dir,
            log_tail(info.log_path, 10),
        )
    return status

"""Health checks of the stack's servers and the wait for a replica to serve a version.

Each check is one HTTP request that returns True or False (or raises while the server
is still starting); :func:`onnxflow.processes.wait_until` polls them.
"""

from __future__ import annotations

import logging
import time

import httpx

from onnxflow.stack.errors import StackError

log = logging.getLogger(__name__)

TIMEOUT = httpx.Timeout(3.0)


def mlflow_healthy(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200


def prefect_healthy(url: str) -> bool:
    response = httpx.get(f"{url}/api/health", timeout=TIMEOUT)
    return response.status_code == 200 and response.json() is True


def worker_online(url: str, pool: str) -> bool:
    """True once a worker of ``pool`` has sent its heartbeat to the Prefect server."""
    response = httpx.post(f"{url}/api/work_pools/{pool}/workers/filter", json={},
                          timeout=TIMEOUT)
    return response.status_code == 200 and any(
        w.get("status") == "ONLINE" for w in response.json())


def endpoint_live(url: str) -> bool:
    return httpx.get(f"{url}/v2/health/live", timeout=TIMEOUT).status_code == 200


def serving_version(url: str, model_name: str) -> str | None:
    """The version the replica at ``url`` serves now; None if it serves none (yet)."""
    try:
        response = httpx.get(f"{url}/v2/models/{model_name}/ready", timeout=TIMEOUT)
    except httpx.TransportError:
        return None
    return response.headers.get("x-model-version") if response.status_code == 200 else None


def wait_until_serving(
    urls: list[str], model_name: str, version: str, timeout_s: float = 120.0,
) -> dict[str, float]:
    """Seconds until each replica answered with ``version``; raises StackError on timeout."""
    start = time.monotonic()
    pending, reached = list(urls), {}
    while pending:
        for url in list(pending):
            if serving_version(url, model_name) == str(version):
                reached[url] = time.monotonic() - start
                pending.remove(url)
                log.info("%s serves %s version %s after %.1f s", url, model_name, version,
                         reached[url])
        if pending and time.monotonic() - start > timeout_s:
            found = {url: serving_version(url, model_name) for url in pending}
            raise StackError(f"after {timeout_s:.0f} s, replica(s) still not serving "
                             f"{model_name} version {version}: {found}")
        if pending:
            time.sleep(0.2)
    return reached

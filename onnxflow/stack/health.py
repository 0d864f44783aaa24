"""Health checks of the stack's servers.

Each check is one HTTP request that returns True or False (or raises while the server
is still starting); :func:`onnxflow.processes.wait_until` polls them. What a
replica serves, and the wait for a version: :mod:`onnxflow.endpoints`.
"""

from __future__ import annotations

import httpx

TIMEOUT = httpx.Timeout(3.0)


def mlflow_healthy(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200


def prefect_healthy(url: str) -> bool:
    response = httpx.get(f"{url}/api/health", timeout=TIMEOUT)
    return response.status_code == 200 and response.json() is True


def worker_online(url: str, pool: str, auth: tuple[str, str] | None = None) -> bool:
    """True once a worker of ``pool`` has sent its heartbeat to the Prefect server."""
    response = httpx.post(
        f"{url}/api/work_pools/{pool}/workers/filter", json={}, timeout=TIMEOUT, auth=auth
    )
    return response.status_code == 200 and any(w.get("status") == "ONLINE" for w in response.json())


def endpoint_live(url: str) -> bool:
    return httpx.get(f"{url}/v2/health/live", timeout=TIMEOUT).status_code == 200

"""What the running serving replicas serve: one HTTP request each, and the wait for a version.

A client of the endpoint's V2 readiness route (it never imports :mod:`onnxflow.serving`):
the retrain flow waits here until every replica answers with the new champion, and the
stack's status reads the version each replica serves.
"""

from __future__ import annotations

import logging
import time

import httpx

from onnxflow.errors import StackError

log = logging.getLogger(__name__)

TIMEOUT = httpx.Timeout(3.0)


def serving_version(url: str, model_name: str) -> str | None:
    """The version the replica at ``url`` serves now; None if it serves none (yet)."""
    try:
        response = httpx.get(f"{url}/v2/models/{model_name}/ready", timeout=TIMEOUT)
    except httpx.TransportError:
        return None
    return response.headers.get("x-model-version") if response.status_code == 200 else None


def wait_until_serving(
    urls: list[str],
    model_name: str,
    version: str,
    timeout_s: float = 120.0,
) -> dict[str, float]:
    """Seconds until each replica answered with ``version``; raises StackError on timeout."""
    start = time.monotonic()
    pending, reached = list(urls), {}
    while pending:
        for url in list(pending):
            if serving_version(url, model_name) == str(version):
                reached[url] = time.monotonic() - start
                pending.remove(url)
                log.info(
                    "%s serves %s version %s after %.1f s", url, model_name, version, reached[url]
                )
        if pending and time.monotonic() - start > timeout_s:
            found = {url: serving_version(url, model_name) for url in pending}
            raise StackError(
                f"after {timeout_s:.0f} s, replica(s) still not serving "
                f"{model_name} version {version}: {found}"
            )
        if pending:
            time.sleep(0.2)
    return reached

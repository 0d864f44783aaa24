"""Prefect task that waits for the serving replicas (logic: :mod:`onnxflow.endpoints`)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from onnxflow.endpoints import wait_until_serving


@task(name="wait-for-endpoints", cache_policy=NO_CACHE)
def wait_for_endpoints_task(
    urls: list[str],
    model_name: str,
    version: str,
    timeout_s: float,
) -> dict[str, float]:
    return wait_until_serving(urls, model_name, version, timeout_s)

"""Prometheus metrics of one endpoint, on its own registry (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "onnxflow_requests", "HTTP requests by route template, method and status.",
            ["route", "method", "status"], registry=r,
        )
        self.latency = Histogram(
            "onnxflow_request_duration_seconds", "Time from request to response, by route.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "onnxflow_batch_rows", "Rows per onnxruntime run (1 request or a merged batch).",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.batch_requests = Histogram(
            "onnxflow_batch_requests", "Requests merged into one onnxruntime run.",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.model_version = Gauge(
            "onnxflow_model_version", "Registry version of the model being served.",
            ["model"], registry=r,
        )
        self.model_info = Gauge(
            "onnxflow_model_info", "1 for the version being served, with its digest.",
            ["model", "version", "onnx_sha256"], registry=r,
        )
        self.reloads = Counter(
            "onnxflow_reloads", "Alias checks by outcome: swapped, unchanged, refused, "
            "registry_error.", ["outcome"], registry=r,
        )
        self.refusals = Counter(
            "onnxflow_model_refusals", "Versions refused on load (verification, load or "
            "example failed); the previous version kept serving.", ["model", "version"],
            registry=r,
        )
        self.ready = Gauge("onnxflow_ready", "1 when a model is loaded and serving.", registry=r)
        for outcome in ("swapped", "unchanged", "refused", "registry_error"):
            self.reloads.labels(outcome)
        # Children are looked up once per (route, method, status), not per request.
        self._request_children: dict[tuple[str, str, int], tuple] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def serving(self, name: str, version: str, digest: str, previous: tuple | None) -> None:
        if previous is not None:
            try:
                self.model_info.remove(*previous)
            except KeyError:
                pass
        self.model_info.labels(name, version, digest).set(1)
        self.model_version.labels(name).set(float(version))
        self.ready.set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of one endpoint, on its own registry (no process-global state)."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = RequestStats(LATENCY_BUCKETS)
        r.register(self.requests)
        self.batch_size = Histogram(
            "onnxflow_batch_rows",
            "Rows per onnxruntime run (1 request or a merged batch).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "onnxflow_batch_requests",
            "Requests merged into one onnxruntime run.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_version = Gauge(
            "onnxflow_model_version",
            "Registry version of the model being served.",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "onnxflow_model_info",
            "1 for the version being served, with its digest.",
            ["model", "version", "onnx_sha256"],
            registry=r,
        )
        self.reloads = Counter(
            "onnxflow_reloads",
            "Alias checks by outcome: swapped, unchanged, refused, registry_error.",
            ["outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "onnxflow_model_refusals",
            "Versions refused on load (verification, load or "
            "example failed); the previous version kept serving.",
            ["model", "version"],
            registry=r,
        )
        self.ready = Gauge("onnxflow_ready", "1 when a model is loaded and serving.", registry=r)
        self.canary_requests = Counter(
            "onnxflow_canary_requests",
            "Inference requests answered by the canary version, by outcome (ok, error).",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.canary_stopped = Gauge(
            "onnxflow_canary_stopped",
            "1 for a canary version stopped for doing worse than the served one.",
            ["model", "version"],
            registry=r,
        )
        for outcome in ("swapped", "unchanged", "refused", "registry_error"):
            self.reloads.labels(outcome)
        self.observe_request = self.requests.observe

    def watch_shadow(self, reports) -> None:
        """Expose the shadow's figures: ``reports()`` gives its pairs' snapshots at scrape."""
        self.registry.register(ShadowCollector(reports))

    def watch_drift(self, snapshots) -> None:
        """Expose live drift: ``snapshots()`` gives {(model, version): snapshot} at scrape."""
        self.registry.register(DriftCollector(snapshots))

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


class RequestStats:
    """Request counts and latency histograms, as plain numbers read at scrape time.

    Every request updates these, so they skip prometheus_client's per-sample locks: they
    are written and scraped only on the event loop's thread.
    """

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts: dict[tuple[str, str, int], int] = {}
        # route -> [count per bucket..., count above the last bucket, sum of seconds]
        self.histograms: dict[str, list] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        histogram = self.histograms.get(route)
        if histogram is None:
            histogram = self.histograms[route] = [0] * (len(self.buckets) + 1) + [0.0]
        histogram[bisect_left(self.buckets, seconds)] += 1
        histogram[-1] += seconds

    def collect(self):
        counter = CounterMetricFamily(
            "onnxflow_requests",
            "HTTP requests by route template, method and status.",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in list(self.counts.items()):
            counter.add_metric([route, method, str(status)], count)
        yield counter
        latency = HistogramMetricFamily(
            "onnxflow_request_duration_seconds",
            "Time from request to response, by route.",
            labels=["route"],
        )
        for route, histogram in list(self.histograms.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self.buckets, float("inf")), histogram):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric([route], buckets, sum_value=histogram[-1])
        yield latency

    def describe(self):
        return []


class ShadowCollector:
    """The challenger in shadow, per pair of versions (``version`` served, ``shadow_version``
    mirrored to), read from :mod:`onnxflow.serving.shadow`'s figures at scrape time."""

    LABELS = ["model", "version", "shadow_version"]

    def __init__(self, reports) -> None:
        self.reports = reports

    def collect(self):
        labels = self.LABELS
        compared = CounterMetricFamily(
            "onnxflow_shadow_requests", "Requests compared with the shadow version.", labels=labels
        )
        dropped = CounterMetricFamily(
            "onnxflow_shadow_dropped",
            "Requests not mirrored to the shadow: its queue was full.",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "onnxflow_shadow_errors",
            "Mirrored requests the shadow version failed to run or answered incomparably.",
            labels=labels,
        )
        agreement = GaugeMetricFamily(
            "onnxflow_shadow_agreement",
            "Share of compared rows where both versions give the same class.",
            labels=labels,
        )
        max_abs = GaugeMetricFamily(
            "onnxflow_shadow_abs_diff_max",
            "Largest absolute difference between the versions' outputs.",
            labels=[*labels, "output"],
        )
        mean_abs = GaugeMetricFamily(
            "onnxflow_shadow_abs_diff_mean",
            "Mean absolute difference between the versions' outputs (over the values "
            "finite on both sides).",
            labels=[*labels, "output"],
        )
        nonfinite = CounterMetricFamily(
            "onnxflow_shadow_nonfinite_values",
            "Output values NaN or infinite on either side: left out of the differences.",
            labels=[*labels, "output"],
        )
        latency = HistogramMetricFamily(
            "onnxflow_shadow_duration_seconds",
            "onnxruntime run of the shadow version on a mirrored request.",
            labels=labels,
        )
        for report in self.reports():
            key = [report.model, report.served, report.shadow]
            compared.add_metric(key, report.compared)
            dropped.add_metric(key, report.dropped)
            errors.add_metric(key, report.errors)
            if report.agreement is not None:
                agreement.add_metric(key, report.agreement)
            for output, value in report.max_abs.items():
                max_abs.add_metric([*key, output], value)
                if output in report.mean_abs:
                    mean_abs.add_metric([*key, output], report.mean_abs[output])
                nonfinite.add_metric([*key, output], report.nonfinite.get(output, 0))
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), report.buckets):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric(key, buckets, sum_value=report.buckets[-1])
        yield from (compared, dropped, errors, agreement, max_abs, mean_abs, nonfinite, latency)

    def describe(self):
        return []


class DriftCollector:
    """Per served version with a reference profile: the Jensen-Shannon distance of each
    input feature and of the predictions from the profile, each feature's threshold, and
    the rows seen; computed from the streaming histograms at scrape time."""

    def __init__(self, snapshots) -> None:
        self.snapshots = snapshots

    def collect(self):
        js = GaugeMetricFamily(
            "onnxflow_drift_js",
            "Jensen-Shannon distance (base 2) of live input feature values from the "
            "version's reference profile, over the profile's bins.",
            labels=["model", "version", "input"],
        )
        threshold = GaugeMetricFamily(
            "onnxflow_drift_threshold",
            "The distance past which a feature drifts (the profile's, or the sampling "
            "noise of the rows seen when higher).",
            labels=["model", "version", "input"],
        )
        prediction = GaugeMetricFamily(
            "onnxflow_prediction_drift_js",
            "Jensen-Shannon distance of the live predictions from the validation predictions.",
            labels=["model", "version"],
        )
        rows = GaugeMetricFamily(
            "onnxflow_drift_rows",
            "Rows seen by the live drift histograms of this version since it was loaded.",
            labels=["model", "version"],
        )
        for (name, version), snap in self.snapshots().items():
            rows.add_metric([name, version], snap["rows"])
            for feature, value in snap["features"].items():
                js.add_metric([name, version, feature], value)
                threshold.add_metric([name, version, feature], snap["thresholds"][feature])
            if snap["prediction"] is not None:
                prediction.add_metric([name, version], snap["prediction"])
        yield from (js, threshold, prediction, rows)

    def describe(self):
        return []

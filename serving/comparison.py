"""What the shadow measures: one request's outputs compared, and the running figures of a
pair of versions (served, shadow) with the report the reviewer reads.

Plain functions and records, no threads or I/O: :mod:`onnxflow.serving.shadow` runs them
in its worker process and sends the :class:`PairReport` snapshots back to the endpoint.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from onnxflow.serving.metrics import LATENCY_BUCKETS

#: Latencies kept per pair for the percentiles in the report (the most recent ones).
LATENCY_WINDOW = 20_000


class ShadowMismatch(ValueError):
    """The shadow version's outputs cannot be compared with the served ones."""


@dataclass(frozen=True)
class Comparison:
    """One request's outputs, served vs shadow.

    Differences are taken over the elements finite on both sides; the others are counted
    in ``nonfinite`` (per output), so one NaN never turns a running figure into NaN. A row
    whose decision output is not finite on either side is never counted as agreeing."""

    rows: int
    agreed: int | None  # rows whose decision (class) is the same; None: no decision output
    max_abs: dict[str, float]
    sum_abs: dict[str, float]  # over the finite elements, which ``finite`` counts
    finite: dict[str, int]
    nonfinite: dict[str, int]
    nonfinite_rows: int = 0  # rows whose decision could not be read (NaN/inf scores)

    @property
    def mean_abs(self) -> dict[str, float]:
        return {k: self.sum_abs[k] / n for k, n in self.finite.items() if n}


def timed_run(run, feeds: dict) -> tuple[list, float]:
    """``run(feeds)`` and the seconds it took, measured around the onnxruntime call alone,
    in the thread that makes it: how both sides of a shadow pair are timed, so their
    latencies are the same measurement (no hand-off to a thread pool or batcher in one)."""
    start = time.perf_counter()
    outputs = run(feeds)
    return outputs, time.perf_counter() - start


def decisions(output: np.ndarray) -> np.ndarray | None:
    """What a classifier decided, per row: the argmax of class scores ``[batch, classes]``,
    or the label itself (integer, boolean or string outputs). None for other outputs."""
    if output.ndim == 0:
        return None
    if output.dtype.kind == "f":
        return output.argmax(axis=1) if output.ndim == 2 and output.shape[1] > 1 else None
    if output.dtype.kind in "iubUSO":
        return output.reshape(output.shape[0], -1)
    return None


def compare(
    names: list[str], served: list[np.ndarray], shadow: dict[str, np.ndarray]
) -> Comparison:
    """Compare the served outputs (in ``names`` order) with the shadow's, by output name.

    Agreement is read from the first output; absolute differences from every numeric one.
    Raises :class:`ShadowMismatch` when an output is missing or shaped differently."""
    max_abs, sum_abs, finite, nonfinite = {}, {}, {}, {}
    for name, ours in zip(names, served, strict=True):
        theirs = shadow.get(name)
        if theirs is None:
            raise ShadowMismatch(f"the shadow version has no output {name!r}")
        if theirs.shape != ours.shape:
            raise ShadowMismatch(
                f"output {name!r}: shadow shape {list(theirs.shape)}, served {list(ours.shape)}"
            )
        if ours.dtype.kind in "fiub" and theirs.dtype.kind in "fiub" and ours.size:
            a, b = ours.astype(np.float64), theirs.astype(np.float64)
            both = np.isfinite(a) & np.isfinite(b)
            diff = np.abs(a[both] - b[both])
            finite[name] = int(diff.size)
            nonfinite[name] = int(ours.size - diff.size)
            max_abs[name] = float(diff.max()) if diff.size else 0.0
            sum_abs[name] = float(diff.sum())
    rows = served[0].shape[0] if served and served[0].ndim else 1
    first, agreed, unreadable = decisions(served[0]) if served else None, None, 0
    if first is not None:
        other = decisions(shadow[names[0]])
        same = first == other
        same = same.all(axis=1) if same.ndim == 2 else same
        if served[0].dtype.kind == "f":  # an argmax over NaN scores decides nothing
            readable = _finite_rows(served[0]) & _finite_rows(shadow[names[0]])
            unreadable = int((~readable).sum())
            same = same & readable
        agreed = int(same.sum())
    return Comparison(rows, agreed, max_abs, sum_abs, finite, nonfinite, unreadable)


def _finite_rows(scores: np.ndarray) -> np.ndarray:
    return np.isfinite(scores.astype(np.float64)).reshape(scores.shape[0], -1).all(axis=1)


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


@dataclass
class PairStats:
    """Running figures of one pair: ``model`` version ``served`` vs version ``shadow``.

    Kept by the shadow's worker process; drops are counted by the endpoint, which
    sends the requests."""

    model: str
    served: str
    shadow: str
    compared: int = 0
    rows: int = 0
    agreed: int = 0
    decided_rows: int = 0
    dropped: int = 0
    errors: int = 0
    last_error: str = ""
    nonfinite_rows: int = 0
    max_abs: dict[str, float] = field(default_factory=dict)
    sum_abs: dict[str, float] = field(default_factory=dict)
    finite: dict[str, int] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)
    shadow_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    served_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # the shadow run's latency histogram: a count per bucket (+ above the last), then the sum
    buckets: list = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1) + [0.0])
    updated: float = field(default_factory=time.time)

    def record(self, result: Comparison, shadow_s: float, served_s: float | None) -> None:
        """``served_s``: the served run timed by :func:`timed_run`; None when it ran merged
        with others by the batcher (not the same measurement: left out)."""
        self.compared += 1
        self.rows += result.rows
        if result.agreed is not None:
            self.agreed += result.agreed
            self.decided_rows += result.rows
            self.nonfinite_rows += result.nonfinite_rows
        for name, value in result.max_abs.items():
            self.max_abs[name] = max(self.max_abs.get(name, 0.0), value)
            self.sum_abs[name] = self.sum_abs.get(name, 0.0) + result.sum_abs[name]
            self.finite[name] = self.finite.get(name, 0) + result.finite[name]
            self.nonfinite[name] = self.nonfinite.get(name, 0) + result.nonfinite[name]
        self._latency(shadow_s, served_s)

    def failed(self, message: str, shadow_s: float, served_s: float | None) -> None:
        self.errors += 1
        self.last_error = message[:500]
        self._latency(shadow_s, served_s)

    def _latency(self, shadow_s: float, served_s: float | None) -> None:
        self.shadow_s.append(shadow_s)
        if served_s is not None:
            self.served_s.append(served_s)
        self.buckets[bisect_left(LATENCY_BUCKETS, shadow_s)] += 1
        self.buckets[-1] += shadow_s
        self.updated = time.time()

    def report(self) -> PairReport:
        shadow_s, served_s = sorted(self.shadow_s), sorted(self.served_s)
        compared = self.compared
        return PairReport(
            model=self.model,
            served=self.served,
            shadow=self.shadow,
            compared=compared,
            dropped=self.dropped,
            errors=self.errors,
            last_error=self.last_error,
            agreement=self.agreed / self.decided_rows if self.decided_rows else None,
            rows=self.rows,
            nonfinite_rows=self.nonfinite_rows,
            max_abs=dict(self.max_abs),
            mean_abs={k: self.sum_abs[k] / n for k, n in self.finite.items() if n},
            nonfinite=dict(self.nonfinite),
            shadow_ms=tuple(_ms(percentile(shadow_s, q)) for q in (0.5, 0.99)),
            served_ms=tuple(_ms(percentile(served_s, q)) for q in (0.5, 0.99)),
            buckets=tuple(self.buckets),
            updated=self.updated,
        )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


@dataclass(frozen=True)
class PairReport:
    """A consistent snapshot of :class:`PairStats`: what /metrics and the registry get."""

    model: str
    served: str
    shadow: str
    compared: int
    dropped: int
    errors: int
    last_error: str
    agreement: float | None
    rows: int
    nonfinite_rows: int
    max_abs: dict[str, float]
    mean_abs: dict[str, float]
    nonfinite: dict[str, int]
    shadow_ms: tuple[float | None, float | None]  # p50, p99
    served_ms: tuple[float | None, float | None]
    buckets: tuple
    updated: float

    def tags(self) -> dict[str, str]:
        """The version tags the reviewer reads in the MLflow UI."""
        return {
            "shadow_champion_version": self.served,
            "shadow_requests": str(self.compared),
            "shadow_agreement": _fmt(self.agreement, "{:.4f}"),
            "shadow_max_abs_diff": _fmt(max(self.max_abs.values(), default=None), "{:.3g}"),
            "shadow_mean_abs_diff": _fmt(max(self.mean_abs.values(), default=None), "{:.3g}"),
            "shadow_latency_p50_ms": _fmt(self.shadow_ms[0], "{:.3f}"),
            "shadow_latency_p99_ms": _fmt(self.shadow_ms[1], "{:.3f}"),
            "shadow_nonfinite_rows": str(self.nonfinite_rows),
            "shadow_nonfinite_values": str(sum(self.nonfinite.values())),
            "shadow_errors": str(self.errors),
            "shadow_dropped": str(self.dropped),
            "shadow_updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.updated)),
        }

    def as_json(self) -> dict:
        return {
            "model": self.model,
            "version": self.served,
            "shadow_version": self.shadow,
            "compared": self.compared,
            "dropped": self.dropped,
            "errors": self.errors,
            "last_error": self.last_error,
            "agreement": self.agreement,
            "max_abs_diff": self.max_abs,
            "mean_abs_diff": self.mean_abs,
            "nonfinite_rows": self.nonfinite_rows,
            "nonfinite_values": self.nonfinite,
            "shadow_latency_ms": {"p50": self.shadow_ms[0], "p99": self.shadow_ms[1]},
            "served_latency_ms": {"p50": self.served_ms[0], "p99": self.served_ms[1]},
        }


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def markdown_report(reports: list[PairReport], alias: str) -> str:
    """``shadow/report.md``: every pair this endpoint compared the version in, newest first."""
    first = reports[0]
    lines = [
        f"# {first.model} version {first.shadow} in shadow (`{alias}`)",
        "",
        "Live requests to the served version, mirrored to this one off the request path by "
        "the onnxflow endpoint and compared output by output. Agreement: rows where both "
        "versions give the same class (argmax of the first output); a row with NaN or "
        "infinite scores on either side never agrees. Differences: over the values finite "
        "on both sides; the others are counted apart. Latency: the onnxruntime run of "
        "each version on the same requests, timed the same way on both sides (requests "
        "merged by the batcher have no served latency of their own).",
        "",
    ]
    for report in sorted(reports, key=lambda r: r.updated, reverse=True):
        updated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.updated))
        lines += [
            f"## against version {report.served} (updated {updated})",
            "",
            "| figure | value |",
            "|---|---|",
            f"| requests compared | {report.compared} ({report.rows} rows) |",
            f"| agreement | {_fmt(report.agreement, '{:.4%}')} |",
            f"| rows with non-finite scores | {report.nonfinite_rows} |",
            f"| errors | {report.errors} |",
            f"| dropped (queue full) | {report.dropped} |",
            f"| shadow latency p50 / p99 ms | {_fmt(report.shadow_ms[0], '{:.3f}')} / "
            f"{_fmt(report.shadow_ms[1], '{:.3f}')} |",
            f"| served latency p50 / p99 ms | {_fmt(report.served_ms[0], '{:.3f}')} / "
            f"{_fmt(report.served_ms[1], '{:.3f}')} |",
            "",
        ]
        if report.max_abs:
            lines += [
                "| output | max abs diff | mean abs diff | non-finite values |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {name} | {report.max_abs[name]:.3g} | "
                f"{_fmt(report.mean_abs.get(name), '{:.3g}')} | {report.nonfinite.get(name, 0)} |"
                for name in report.max_abs
            ]
            lines.append("")
        if report.last_error:
            lines += [f"Last error: `{report.last_error}`", ""]
    return "\n".join(lines)

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
    """One request's outputs, served vs shadow."""

    rows: int
    agreed: int | None  # rows whose decision (class) is the same; None: no decision output
    max_abs: dict[str, float]
    mean_abs: dict[str, float]


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
    max_abs, mean_abs = {}, {}
    for name, ours in zip(names, served, strict=True):
        theirs = shadow.get(name)
        if theirs is None:
            raise ShadowMismatch(f"the shadow version has no output {name!r}")
        if theirs.shape != ours.shape:
            raise ShadowMismatch(
                f"output {name!r}: shadow shape {list(theirs.shape)}, served {list(ours.shape)}"
            )
        if ours.dtype.kind in "fiub" and theirs.dtype.kind in "fiub" and ours.size:
            diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
            max_abs[name], mean_abs[name] = float(diff.max()), float(diff.mean())
    rows = served[0].shape[0] if served and served[0].ndim else 1
    first, agreed = decisions(served[0]) if served else None, None
    if first is not None:
        other = decisions(shadow[names[0]])
        same = first == other
        agreed = int(same.all(axis=1).sum() if same.ndim == 2 else same.sum())
    return Comparison(rows, agreed, max_abs, mean_abs)


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
    max_abs: dict[str, float] = field(default_factory=dict)
    sum_mean_abs: dict[str, float] = field(default_factory=dict)
    shadow_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    served_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # the shadow run's latency histogram: a count per bucket (+ above the last), then the sum
    buckets: list = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1) + [0.0])
    updated: float = field(default_factory=time.time)

    def record(self, result: Comparison, shadow_s: float, served_s: float) -> None:
        self.compared += 1
        self.rows += result.rows
        if result.agreed is not None:
            self.agreed += result.agreed
            self.decided_rows += result.rows
        for name, value in result.max_abs.items():
            self.max_abs[name] = max(self.max_abs.get(name, 0.0), value)
            self.sum_mean_abs[name] = self.sum_mean_abs.get(name, 0.0) + result.mean_abs[name]
        self._latency(shadow_s, served_s)

    def failed(self, message: str, shadow_s: float, served_s: float) -> None:
        self.errors += 1
        self.last_error = message[:500]
        self._latency(shadow_s, served_s)

    def _latency(self, shadow_s: float, served_s: float) -> None:
        self.shadow_s.append(shadow_s)
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
            max_abs=dict(self.max_abs),
            mean_abs={k: v / compared for k, v in self.sum_mean_abs.items()},
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
    max_abs: dict[str, float]
    mean_abs: dict[str, float]
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
        "versions give the same class (argmax of the first output). Latency: the "
        "onnxruntime run of each version on the same requests.",
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
            f"| errors | {report.errors} |",
            f"| dropped (queue full) | {report.dropped} |",
            f"| shadow latency p50 / p99 ms | {_fmt(report.shadow_ms[0], '{:.3f}')} / "
            f"{_fmt(report.shadow_ms[1], '{:.3f}')} |",
            f"| served latency p50 / p99 ms | {_fmt(report.served_ms[0], '{:.3f}')} / "
            f"{_fmt(report.served_ms[1], '{:.3f}')} |",
            "",
        ]
        if report.max_abs:
            lines += ["| output | max abs diff | mean abs diff |", "|---|---|---|"]
            lines += [
                f"| {name} | {report.max_abs[name]:.3g} | {report.mean_abs[name]:.3g} |"
                for name in report.max_abs
            ]
            lines.append("")
        if report.last_error:
            lines += [f"Last error: `{report.last_error}`", ""]
    return "\n".join(lines)

"""The challenger in shadow: live requests mirrored to a second version, off the request path.

With ``--shadow ALIAS`` (``challenger``) every served model also follows ``NAME@ALIAS``
with a :class:`~onnxflow.serving.manager.ModelManager` of its own. Once the served version
has answered a request, :meth:`Shadow.offer` puts the feeds and the answer on a bounded
queue without waiting for anything (a full queue drops the request and counts it; only
``shadow_fraction`` of requests are offered). One worker thread runs the shadow version,
on its own onnxruntime session with one intra-op thread, and compares its outputs with the
served ones. The served answer is never delayed, changed or failed by the shadow.

Figures are kept per pair of versions (served, shadow), so when either alias moves the
shadow follows the new pair: requests compared, agreement (the same class, for
classifiers), max and mean absolute difference per output, latency of both runs, errors,
drops. They are in ``/metrics`` and, every flush interval and on ``POST
/admin/shadow/flush``, written onto the shadow version in the registry: ``shadow_*`` tags
and ``shadow/report.md`` in its run, beside its validation report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import queue
import random
import threading
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from onnxflow.serving.manager import ModelManager
from onnxflow.serving.metrics import LATENCY_BUCKETS, ServingMetrics
from onnxflow.serving.model import LoadedModel
from onnxflow.serving.registry_reader import Annotation, Registry, registry_for
from onnxflow.serving.settings import ServingSettings

log = logging.getLogger(__name__)

#: Mirrored requests wait in memory; beyond this many bytes of feeds they are dropped too.
MAX_QUEUED_BYTES = 64 << 20
#: Latencies kept per pair for the percentiles in the report (the most recent ones).
LATENCY_WINDOW = 20_000
REPORT_PATH = "shadow/report.md"


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

    The worker thread writes them under ``lock``; drops are counted on the event loop."""

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
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, result: Comparison, shadow_s: float, served_s: float) -> None:
        with self.lock:
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
        with self.lock:
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
        with self.lock:
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


@dataclass(frozen=True)
class _Mirrored:
    pair: PairStats
    shadow: LoadedModel
    names: list[str]
    feeds: dict
    served: list
    served_s: float
    nbytes: int


class Shadow:
    """The shadow of every served model: its managers, the queue, the worker, the figures."""

    def __init__(self, settings: ServingSettings, metrics: ServingMetrics) -> None:
        self.alias = settings.shadow
        self.fraction = settings.shadow_fraction
        self.flush_interval_s = settings.shadow_flush_interval_s
        # The shadow never takes more than one core's thread, and never batches.
        self.settings = settings.model_copy(update={"intra_op_threads": 1, "max_batch_size": 0})
        self.metrics = metrics
        self.managers: dict[str, ModelManager] = {}
        self.pairs: dict[tuple[str, str, str], PairStats] = {}
        self.queue: queue.Queue[_Mirrored | None] = queue.Queue(settings.shadow_queue)
        self.queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._random = random.Random()
        self._written: dict[tuple[str, str, str], tuple] = {}
        self._tasks: list[asyncio.Task] = []
        self._worker: threading.Thread | None = None
        self._flush_lock = asyncio.Lock()
        self._registry: Registry | None = None
        metrics.watch_shadow(self.reports)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="shadow", daemon=True)
        self._worker.start()
        if self.flush_interval_s > 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._flush_every()))

    def follow(self, served: ModelManager) -> None:
        """Start following ``NAME@ALIAS`` beside the served model (once per model)."""
        if served.name in self.managers:
            return
        manager = ModelManager(
            self.settings, self.metrics, f"{served.name}@{self.alias}", shadow_of=served
        )
        self.managers[served.name] = manager
        self._tasks.append(
            asyncio.get_running_loop().create_task(manager.watch(), name=f"shadow-{served.name}")
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.queue.put_nowait(None)

    # --- the request path: never waits, never raises ------------------------------------

    def offer(self, model: LoadedModel, feeds: dict, served: list, served_s: float) -> None:
        """Mirror one answered request to the shadow version, if there is one to compare."""
        try:
            manager = self.managers.get(model.name)
            shadow = manager.current if manager is not None else None
            if shadow is None or shadow.version == model.version:
                return
            if self.fraction < 1.0 and self._random.random() >= self.fraction:
                return
            pair = self.pairs.get((model.name, model.version, shadow.version))
            if pair is None:
                pair = PairStats(model.name, model.version, shadow.version)
                self.pairs[(model.name, model.version, shadow.version)] = pair
            nbytes = sum(getattr(a, "nbytes", 0) for a in feeds.values())
            with self._bytes_lock:
                if self.queued_bytes + nbytes > MAX_QUEUED_BYTES:
                    pair.dropped += 1
                    return
                self.queued_bytes += nbytes
            item = _Mirrored(pair, shadow, model.output_names, feeds, served, served_s, nbytes)
            try:
                self.queue.put_nowait(item)
            except queue.Full:
                pair.dropped += 1
                self._release(nbytes)
        except Exception:  # noqa: BLE001  (the served answer must not notice the shadow)
            log.exception("mirroring a request to the shadow failed")

    def _release(self, nbytes: int) -> None:
        with self._bytes_lock:
            self.queued_bytes -= nbytes

    # --- the worker thread ------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            self._release(item.nbytes)
            start = time.perf_counter()
            try:
                outputs = item.shadow.run(item.feeds)
            except Exception as exc:  # noqa: BLE001  (counted against the pair)
                item.pair.failed(
                    f"run: {type(exc).__name__}: {exc}",
                    time.perf_counter() - start,
                    item.served_s,
                )
                continue
            took = time.perf_counter() - start
            try:
                result = compare(
                    item.names, item.served, dict(zip(item.shadow.output_names, outputs))
                )
            except Exception as exc:  # noqa: BLE001
                item.pair.failed(f"compare: {exc}", took, item.served_s)
                continue
            item.pair.record(result, took, item.served_s)

    # --- figures and the registry -----------------------------------------------------

    def reports(self) -> list[PairReport]:
        return [pair.report() for pair in list(self.pairs.values())]

    def status(self) -> dict:
        return {
            "alias": self.alias,
            "fraction": self.fraction,
            "queued": self.queue.qsize(),
            "models": {
                name: {
                    "shadow": m.current.version if m.current else None,
                    "last_check": m.last_check.as_json() if m.last_check else None,
                }
                for name, m in self.managers.items()
            },
            "pairs": [r.as_json() for r in self.reports()],
        }

    async def flush(self) -> list[dict]:
        """Write the figures that changed since the last write onto each shadow version."""
        async with self._flush_lock:
            return await asyncio.to_thread(self._flush)

    def _flush(self) -> list[dict]:
        """One registry write for every shadow version whose figures changed: its tags from
        its latest pair, its report from all of them."""
        by_version: dict[tuple[str, str], list[PairReport]] = {}
        for report in self.reports():
            by_version.setdefault((report.model, report.shadow), []).append(report)
        notes, state = [], {}
        for (name, version), reports in by_version.items():
            changed = {
                (r.model, r.served, r.shadow): (r.compared, r.errors, r.dropped) for r in reports
            }
            if all(self._written.get(key) == value for key, value in changed.items()):
                continue
            latest = max(reports, key=lambda r: r.updated)
            report_md = markdown_report(reports, self.alias)
            notes.append(Annotation(name, version, latest.tags(), {REPORT_PATH: report_md}))
            state.update(changed)
        if not notes:
            return []
        written = [{"model": n.name, "version": n.version, "tags": n.tags} for n in notes]
        try:
            self.registry().annotate(notes)
        except Exception as exc:  # noqa: BLE001  (the next flush tries again)
            log.warning("cannot write the shadow figures into the registry: %s", exc)
            return [{**entry, "error": str(exc)} for entry in written]
        self._written.update(state)
        for n in notes:
            log.info(
                "shadow figures written onto %s version %s: %s requests, agreement %s",
                n.name,
                n.version,
                n.tags["shadow_requests"],
                n.tags["shadow_agreement"],
            )
        return written

    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = registry_for(
                os.environ.get("MLFLOW_TRACKING_URI"), self.settings.registry_access
            )
        return self._registry

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001  (the flusher must outlive any single failure)
                log.exception("shadow flush failed")

"""Inference capture: what the endpoint answered, as Parquet segments, off the request path.

With ``--capture DIR`` (``capture`` setting; a local folder or any fsspec URL whose
filesystem package is installed) every answered request of every model, on both fronts,
is offered to :class:`Capture` (a ``capture_fraction`` share of them). The request path
only appends a reference to the request's arrays to a deque (no copy, no lock, no wake-up):
when ``capture_queue_bytes`` are waiting, the record is dropped and counted in
``onnxflow_capture_dropped_total`` (never silently lost, never a failed or slower answer).

A writer thread wakes every ``capture_flush_interval_s``, turns what waited into one Arrow
table per (model, version) and appends it as a row group to that pair's open segment.
Segments are rolled (closed and renamed to their final name) past ``capture_segment_bytes``
or ``capture_segment_s``, and on stop, which drains the queue first (SIGTERM: the endpoint
stops, every accepted record is written). Until rolled a segment's name starts with a dot,
which pyarrow, pandas, DuckDB and Spark skip.

Layout (Hive partitions)::

    DIR/model=NAME/version=V/date=YYYY-MM-DD/part-<start>-<pid>-<random>-<n>.parquet

One Parquet row per row of a request: ``request_id``, ``row`` (its index in the request),
``time`` (UTC), ``latency_ms`` (the whole request, decode to encode), then
``input.<name>`` and ``output.<name>`` per tensor, each the row's values flattened to a
list (the per-row shapes are in the file's metadata, ``onnxflow.shapes``). ``model``,
``version`` and ``date`` are the partition columns (read them with Hive partitioning).
Date partitions older than ``capture_retention_days`` are deleted by the writer.
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import json
import logging
import os
import random
import secrets
import threading
import time
import uuid
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

INPUT_PREFIX = "input."
OUTPUT_PREFIX = "output."
SHAPES_KEY = b"onnxflow.shapes"


#: Request ids made here: a random prefix per process and a counter (32 hex characters,
#: like a UUID; a tenth of uuid4's cost on the request path).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class CaptureRecord(NamedTuple):
    """One answered request, as the request path hands it over (arrays not copied: the
    request never writes to them after answering)."""

    request_id: str
    time: float
    model: str
    version: str
    latency_s: float
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    nbytes: int


def open_filesystem(url: str):
    """(fsspec filesystem, root path) for a folder or URL; a clear error when the URL's
    filesystem package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"capture location {url!r}: {exc}") from None


def rows_of(array: np.ndarray) -> int:
    return array.shape[0] if array.ndim else 1


def record_table(records: list[CaptureRecord]):
    """One Arrow table of ``records`` (same model and version): a row per request row, and
    the per-row shapes of each tensor (of the first record) for the file's metadata.

    Vectorised: the writer holds the GIL while it builds this, and the event loop waits
    for the GIL meanwhile, so a per-record Python loop here costs the endpoint throughput."""
    import pyarrow as pa

    first = records[0]
    counts = np.fromiter(
        (rows_of(next(iter(r.inputs.values()))) for r in records), np.int64, len(records)
    )
    single = bool((counts == 1).all())
    ids = [r.request_id for r in records]
    times = np.fromiter((r.time for r in records), np.float64, len(records)) * 1e6
    latency = np.fromiter((r.latency_s for r in records), np.float64, len(records)) * 1e3
    columns = {
        "request_id": pa.array(ids if single else np.repeat(ids, counts).tolist(), pa.string()),
        "row": pa.array(
            np.zeros(len(records), np.int32)
            if single
            else np.concatenate([np.arange(n) for n in counts]).astype(np.int32)
        ),
        "time": pa.array(
            (times if single else np.repeat(times, counts)).astype(np.int64),
            pa.timestamp("us", tz="UTC"),
        ),
        "latency_ms": pa.array(latency if single else np.repeat(latency, counts)),
    }
    shapes = {}
    for prefix, field in ((INPUT_PREFIX, "inputs"), (OUTPUT_PREFIX, "outputs")):
        for name, array in getattr(first, field).items():
            arrays = [getattr(r, field)[name] for r in records]
            columns[prefix + name] = _tensor_column(arrays, counts)
            shapes[prefix + name] = list(array.shape[1:]) if array.ndim else []
    return pa.table(columns), shapes


def _tensor_column(arrays: list[np.ndarray], counts: np.ndarray):
    """One tensor of every record as a list column, a row's values per entry."""
    import pyarrow as pa

    total = int(counts.sum())
    per_row = {a.shape[1:] if a.ndim else None for a in arrays}
    if (
        len(per_row) == 1
        and None not in per_row
        and all(a.shape[0] == n for a, n in zip(arrays, counts))
    ):
        flat = np.concatenate(arrays).reshape(total, -1)
        return pa.FixedSizeListArray.from_arrays(_values(flat.ravel()), flat.shape[1])
    parts = [_per_row(a, int(n)) for a, n in zip(arrays, counts)]
    widths = np.concatenate([np.full(p.shape[0], p.shape[1]) for p in parts])
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype("int32")
    flat = np.concatenate([p.ravel() for p in parts])
    return pa.ListArray.from_arrays(pa.array(offsets), _values(flat))


def _values(flat: np.ndarray):
    import pyarrow as pa

    if flat.dtype.kind in "OSU":
        return pa.array([v.decode() if isinstance(v, bytes) else str(v) for v in flat])
    return pa.array(flat)


def _per_row(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` as ``rows`` rows of flattened values (a scalar or a batch-less tensor
    repeats on every row)."""
    if array.ndim and array.shape[0] == rows:
        return array.reshape(rows, -1)
    return np.broadcast_to(array.reshape(1, -1), (rows, array.size))


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


class _Segment:
    """One open Parquet file of a (model, version, date): hidden until rolled."""

    def __init__(self, fs, folder: str, schema, shapes: dict, writer: str, number: int) -> None:
        import pyarrow.parquet as pq

        self.fs = fs
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        # ``writer`` is random per CaptureWriter: replicas sharing a folder or a bucket (the
        # same pid in every container) never pick the same name in the same second.
        name = f"part-{stamp}-{writer}-{number:05d}.parquet"
        self.final = f"{folder}/{name}"
        self.hidden = f"{folder}/.{name}.inprogress"
        fs.makedirs(folder, exist_ok=True)
        # A local folder is written by Arrow's own file (no GIL while it writes); other
        # filesystems through fsspec's Python file object.
        self.file = None if _is_local(fs) else fs.open(self.hidden, "wb")
        schema = schema.with_metadata({SHAPES_KEY: json.dumps(shapes).encode()})
        self.writer = pq.ParquetWriter(self.file or self.hidden, schema, compression="zstd")
        self.schema = schema
        self.opened = time.monotonic()
        self.rows = 0

    def write(self, table) -> None:
        self.writer.write_table(table.replace_schema_metadata(self.schema.metadata))
        self.rows += table.num_rows

    @property
    def bytes(self) -> int:
        return self.file.tell() if self.file is not None else os.path.getsize(self.hidden)

    def roll(self) -> str:
        self.writer.close()
        if self.file is not None:
            self.file.close()
        self.fs.mv(self.hidden, self.final)
        return self.final


class Capture:
    """The endpoint's capture: the request path's :meth:`offer`, the writer thread, counts."""

    def __init__(self, settings, metrics=None) -> None:
        self.url = settings.capture
        self.fs, self.root = open_filesystem(settings.capture)
        self.root = self.root.rstrip("/")
        self.fraction = settings.capture_fraction
        self.queue_bytes = settings.capture_queue_bytes
        self.flush_interval_s = settings.capture_flush_interval_s
        self.segment_bytes = settings.capture_segment_bytes
        self.segment_s = settings.capture_segment_s
        self.retention_days = settings.capture_retention_days
        self._queue: collections.deque[CaptureRecord] = collections.deque()
        # one writer each: the request path adds to offered, the writer thread to taken
        self._offered_bytes = 0
        self._taken_bytes = 0
        self._random = random.Random()
        self._segments: dict[tuple[str, str, str], _Segment] = {}
        self._numbers = itertools.count()
        self._writer_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._last_retention = 0.0
        self.accepted: collections.Counter = collections.Counter()  # (model, version)
        self.written: collections.Counter = collections.Counter()  # rows, by (model, version)
        self.dropped: collections.Counter = collections.Counter()  # (model, reason)
        self.segments_rolled = 0
        self.last_error = ""
        # model -> {request id: rows}: the ids feedback may name before their segment is
        # closed. Plain dicts of strings and ints, which the cyclic GC does not track (a
        # container of 200,000 tuples made every full collection walk them).
        self.recent_ids: dict[str, dict[str, int]] = {}
        self.recent_limit = 200_000
        if metrics is not None:
            metrics.registry.register(CaptureCollector(self))

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        import pyarrow.parquet  # noqa: F401  (imported now, not on the first write)

        self.fs.makedirs(self.root, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()
        log.info("capturing %.0f%% of requests into %s", self.fraction * 100, self.url)

    def stopping(self) -> None:
        """Accept nothing more (called on the request path's thread, before :meth:`stop`)."""
        self._stopped = True

    def stop(self, timeout_s: float = 60.0) -> None:
        """Drain what was accepted, roll every segment, stop the writer (blocking)."""
        self._stopped = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("the capture writer did not finish in %.0f s", timeout_s)

    # --- the request path: never waits, never raises ------------------------------------

    def offer(self, model, request_id, feeds: dict, results: list, latency_s: float) -> None:
        """Take one answered request, or count why not. ``request_id()`` gives its id (the
        client's or a new one, which the front returns); None: a new one here."""
        try:
            if self.fraction < 1.0 and self._random.random() >= self.fraction:
                return
            if self._stopped:
                self.dropped[(model.name, "stopped")] += 1
                return
            nbytes = 0
            for array in feeds.values():
                nbytes += array.nbytes
            for array in results:
                nbytes += array.nbytes
            if self._offered_bytes - self._taken_bytes + nbytes > self.queue_bytes:
                self.dropped[(model.name, "queue_full")] += 1
                return
            request_id = (request_id() if request_id is not None else None) or new_request_id()
            record = CaptureRecord(
                request_id,
                time.time(),
                model.name,
                model.version,
                latency_s,
                feeds,
                dict(zip(model.output_names, results)),
                nbytes,
            )
            self._offered_bytes += nbytes
            self._queue.append(record)
            self.accepted[(model.name, model.version)] += 1
            rows = rows_of(next(iter(feeds.values())))
            recent = self.recent_ids.get(model.name)
            if recent is None:
                recent = self.recent_ids[model.name] = {}
            recent[request_id] = rows
            if len(recent) > self.recent_limit:  # keep the newer half (insertion order)
                kept = list(recent.items())[self.recent_limit // 2 :]
                recent.clear()
                recent.update(kept)
        except Exception:  # noqa: BLE001  (the answer must not notice the capture)
            self.dropped[(getattr(model, "name", "?"), "error")] += 1
            log.exception("capturing a request failed")

    # --- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self._write_once()
        self._write_once()  # what was accepted before stop
        for key in list(self._segments):
            self._roll(key)

    def _write_once(self) -> None:
        taken: list[CaptureRecord] = []
        while self._queue:
            taken.append(self._queue.popleft())
        groups: dict[tuple[str, str, str], list[CaptureRecord]] = {}
        for record in taken:
            day = dt.datetime.fromtimestamp(record.time, dt.UTC).strftime("%Y-%m-%d")
            groups.setdefault((record.model, record.version, day), []).append(record)
        for key, records in groups.items():
            self._write_group(key, records)
        self._taken_bytes += sum(r.nbytes for r in taken)
        now = time.monotonic()
        for key, segment in list(self._segments.items()):
            if segment.bytes >= self.segment_bytes or now - segment.opened >= self.segment_s:
                self._roll(key)
        if self.retention_days > 0 and now - self._last_retention > 3600:
            self._last_retention = now
            self._apply_retention()

    def _write_group(self, key: tuple[str, str, str], records: list[CaptureRecord]) -> None:
        try:
            table, shapes = record_table(records)
            segment = self._segments.get(key)
            if segment is not None and not segment.schema.equals(
                table.schema, check_metadata=False
            ):
                self._roll(key)  # the tensors changed shape or type: a new segment
                segment = None
            if segment is None:
                name, version, day = key
                folder = f"{self.root}/model={name}/version={version}/date={day}"
                segment = _Segment(
                    self.fs, folder, table.schema, shapes, self._writer_id, next(self._numbers)
                )
                self._segments[key] = segment
            segment.write(table)
            self.written[key[:2]] += table.num_rows
        except Exception as exc:  # noqa: BLE001  (counted, logged; the writer carries on)
            self.dropped[(key[0], "write_error")] += len(records)
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.exception("cannot write %d captured requests of %s", len(records), key[0])
            self._segments.pop(key, None)

    def _roll(self, key) -> None:
        segment = self._segments.pop(key)
        try:
            segment.roll()
            self.segments_rolled += 1
        except Exception as exc:  # noqa: BLE001
            self.dropped[(key[0], "write_error")] += segment.rows
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.exception("cannot close the capture segment %s", segment.final)

    def _apply_retention(self) -> None:
        cutoff = (dt.datetime.now(dt.UTC) - dt.timedelta(days=self.retention_days)).strftime(
            "%Y-%m-%d"
        )
        for folder in self.fs.glob(f"{self.root}/model=*/version=*/date=*"):
            if folder.rsplit("date=", 1)[1] < cutoff:
                log.info("capture retention: deleting %s", folder)
                self.fs.rm(folder, recursive=True)

    # --- figures -----------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "location": self.url,
            "fraction": self.fraction,
            "queued_bytes": self._offered_bytes - self._taken_bytes,
            "accepted": {f"{m}/{v}": n for (m, v), n in self.accepted.items()},
            "written_rows": {f"{m}/{v}": n for (m, v), n in self.written.items()},
            "dropped": {f"{m}/{r}": n for (m, r), n in self.dropped.items()},
            "segments_rolled": self.segments_rolled,
            "last_error": self.last_error,
        }


class CaptureCollector:
    """The capture's figures for /metrics, read when scraped."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        accepted = CounterMetricFamily(
            "onnxflow_capture_records",
            "Requests accepted for capture.",
            labels=["model", "version"],
        )
        written = CounterMetricFamily(
            "onnxflow_capture_rows_written",
            "Captured rows (request rows) written to Parquet.",
            labels=["model", "version"],
        )
        dropped = CounterMetricFamily(
            "onnxflow_capture_dropped",
            "Requests that could not be captured: queue_full, write_error, stopped, error.",
            labels=["model", "reason"],
        )
        queued = GaugeMetricFamily(
            "onnxflow_capture_queue_bytes", "Bytes of captured requests waiting to be written."
        )
        for (model, version), n in list(self.capture.accepted.items()):
            accepted.add_metric([model, version], n)
        for (model, version), n in list(self.capture.written.items()):
            written.add_metric([model, version], n)
        for (model, reason), n in list(self.capture.dropped.items()):
            dropped.add_metric([model, reason], n)
        queued.add_metric([], self.capture._offered_bytes - self.capture._taken_bytes)
        yield from (accepted, written, dropped, queued)

    def describe(self):
        return []

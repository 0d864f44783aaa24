"""Inference capture: what the endpoint answered, as Parquet segments, off the request path.

With ``--capture DIR`` (``capture`` setting; a local folder or any fsspec URL whose
filesystem package is installed) every answered request of every model, on both fronts,
is offered to :class:`Capture` (a ``capture_fraction`` share of them). The request path
only appends references, by column, to its model version's open :class:`_Batch`: the
request's id, time and latency, and each of its input and output arrays (no copy, no lock,
no wake-up, nothing the cyclic GC tracks). When ``capture_queue_bytes`` are waiting, the
request is dropped and counted in ``onnxflow_capture_dropped_total`` (never silently lost,
never a failed or slower answer).

A batch is turned into an Arrow table in one step on the endpoint's loop once it holds
``BATCH_REQUESTS`` requests or ``BATCH_BYTES`` (and every ``capture_flush_interval_s``):
one ``np.concatenate`` per tensor, ids and times gathered in C. Done there, it costs the
endpoint the work alone; a second thread doing it in Python also cost every hand-over of
the GIL, which was more than the work. A writer thread appends the tables, every
``capture_flush_interval_s``, as one row group per (model, version) to its open segment:
Arrow compresses and writes without the GIL, and Parquet's dictionary encoding is off
(tensor values hardly repeat: trying it was most of the write's cost, and made the files
larger). Segments are rolled (closed and renamed to their final name) past
``capture_segment_bytes`` or ``capture_segment_s``, and on stop, which writes every
accepted request first (SIGTERM: the endpoint stops, nothing accepted is lost). Until
rolled a segment's name starts with a dot, which pyarrow, pandas, DuckDB and Spark skip. A
capture used without a loop (``start()`` without one) takes a lock around each offer, and
its writer builds the batches too.

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

import numpy as np

log = logging.getLogger(__name__)

INPUT_PREFIX = "input."
OUTPUT_PREFIX = "output."
SHAPES_KEY = b"onnxflow.shapes"
#: Beside an open (hidden) segment, the ids and rows of what it holds so far, one small
#: hidden Parquet file per write, deleted once the segment is closed: another replica's
#: feedback route finds a request there before its segment is readable.
IDS_PREFIX = ".ids-"


#: Request ids made here: a random prefix per process (16 hex characters) and a counter of
#: 16 decimal digits (32 characters, like a UUID's hex; a twentieth of uuid4's cost and a
#: quarter of formatting the counter in hex, on the request path).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(10**15)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER)}"


#: A batch is turned into an Arrow table, in one step on the endpoint's loop, once it holds
#: this many requests or bytes (and every flush interval). A step delays the requests in
#: flight by its length: at 8 connections of wrk (digits MLP), batches of 256 requests
#: (steps of ~0.7 ms) moved the p99 from 1.4 to 2.1 ms, of 1,024 to 3.4 ms, of 4,096 to
#: 6.0 ms, for the same throughput.
BATCH_REQUESTS = 256
BATCH_BYTES = 4 << 20


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


def request_columns(ids, times, latency, counts: np.ndarray) -> dict:
    """The columns every captured row starts with, from per-request ``ids``, ``times``
    (seconds since the epoch), ``latency`` (seconds) and row ``counts``."""
    import pyarrow as pa

    times = np.asarray(times) * 1e6
    latency = np.asarray(latency) * 1e3
    if len(counts) == int(counts.sum()):  # a row each
        rows = np.zeros(len(counts), np.int32)
    else:
        rows = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        ids = np.repeat(np.asarray(ids, object), counts).tolist()
        times, latency = np.repeat(times, counts), np.repeat(latency, counts)
    return {
        "request_id": pa.array(ids, pa.string()),
        "row": pa.array(rows.astype(np.int32)),
        "time": pa.array(times.astype(np.int64), pa.timestamp("us", tz="UTC")),
        "latency_ms": pa.array(latency),
    }


class _Batch:
    """Requests of one model version waiting for the writer, by column: each request's id,
    time and latency, and references to its own input and output arrays (the request path
    copies nothing). Filled on the endpoint's loop, handed to the writer whole."""

    __slots__ = ("key", "inputs", "outputs", "columns", "ids", "times", "latency", "nbytes")

    def __init__(self, key: tuple[str, str], inputs: tuple[str, ...], outputs: tuple[str, ...]):
        self.key = key  # (model, version)
        self.inputs = inputs  # in the model's order, whatever order a client sends
        self.outputs = outputs
        self.columns: list[list[np.ndarray]] = [[] for _ in (*inputs, *outputs)]
        self.ids: list[str] = []
        self.times: list[float] = []
        self.latency: list[float] = []
        self.nbytes = 0

    def counts(self) -> np.ndarray:
        """Rows of each request (its first input's first axis; 1 for a scalar)."""
        first = self.columns[0]
        counts = _lengths(first)
        return counts if counts is not None else np.array([rows_of(a) for a in first])

    def rows_of_ids(self, ids: set[str]) -> dict[str, int]:
        return {i: rows_of(a) for i, a in zip(self.ids, self.columns[0]) if i in ids}

    def tables(self, counts: np.ndarray):
        """(date, Arrow table, per-row shapes, request ids) for each UTC date of the
        batch's requests (one, except across midnight), their rows ``counts``."""
        import pyarrow as pa

        times = np.array(self.times)
        columns = request_columns(self.ids, times, self.latency, counts)
        names = [INPUT_PREFIX + n for n in self.inputs] + [OUTPUT_PREFIX + n for n in self.outputs]
        shapes = {}
        for name, arrays in zip(names, self.columns):
            columns[name] = _tensor_column(arrays, counts)
            shapes[name] = list(arrays[0].shape[1:]) if arrays[0].ndim else []
        table = pa.table(columns)
        days = times // 86400
        if (days == days[0]).all():
            yield _day(days[0]), table, shapes, self.ids
            return
        rows = np.repeat(days, counts)
        for day in np.unique(days):  # across midnight
            ids = [i for i, d in zip(self.ids, days) if d == day]
            yield _day(day), table.filter(pa.array(rows == day)), shapes, ids


def _tensor_column(arrays: list[np.ndarray], counts: np.ndarray):
    """One tensor of every record as a list column, a row's values per entry."""
    import pyarrow as pa

    total = int(counts.sum())
    lengths = _lengths(arrays)
    if lengths is not None and np.array_equal(lengths, counts):
        try:  # one row per request row, every row of one shape (else this raises)
            flat = np.concatenate(arrays).reshape(total, -1)
        except ValueError:
            flat = None
        if flat is not None:
            return pa.FixedSizeListArray.from_arrays(_values(flat.ravel()), flat.shape[1])
    parts = [_per_row(a, int(k)) for a, k in zip(arrays, counts)]
    widths = np.concatenate([np.full(p.shape[0], p.shape[1]) for p in parts])
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype("int32")
    flat = np.concatenate([p.ravel() for p in parts])
    return pa.ListArray.from_arrays(pa.array(offsets), _values(flat))


def _lengths(arrays: list[np.ndarray]) -> np.ndarray | None:
    """The first axis of each array (None when one is a scalar), without a Python loop."""
    try:
        return np.fromiter(map(len, arrays), np.int64, len(arrays))
    except TypeError:
        return None


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


def _day(days_since_epoch) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=int(days_since_epoch))).isoformat()


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
        self.folder, self.name = folder, name
        self.final = f"{folder}/{name}"
        self.hidden = f"{folder}/.{name}.inprogress"
        fs.makedirs(folder, exist_ok=True)
        # A local folder is written by Arrow's own file (no GIL while it writes); other
        # filesystems through fsspec's Python file object.
        self.file = None if _is_local(fs) else fs.open(self.hidden, "wb")
        schema = schema.with_metadata({SHAPES_KEY: json.dumps(shapes).encode()})
        # No dictionary encoding: tensors' values, ids and times hardly repeat, and trying it
        # was most of the write's cost (and made the file larger).
        self.writer = pq.ParquetWriter(
            self.file or self.hidden, schema, compression="zstd", use_dictionary=False
        )
        self.schema = schema
        self.opened = time.monotonic()
        self.ids: list[list[str]] = []  # the requests written, by table
        self.sidecars: list[str] = []

    def write(self, table, ids: list[list[str]]) -> None:
        import pyarrow.parquet as pq

        self.writer.write_table(table.replace_schema_metadata(self.schema.metadata))
        self.ids += ids
        path = f"{self.folder}/{IDS_PREFIX}{self.name}-{len(self.sidecars):05d}"
        ids_table = table.select(["request_id", "row"])
        try:  # without it only this replica knows the ids until the segment closes
            if _is_local(self.fs):
                pq.write_table(ids_table, path, compression="zstd")
            else:
                with self.fs.open(path, "wb") as sink:
                    pq.write_table(ids_table, sink, compression="zstd")
            self.sidecars.append(path)
        except Exception:  # noqa: BLE001
            log.exception("cannot write the id file %s", path)

    def forget_sidecars(self) -> None:
        if self.sidecars:
            self.fs.rm(self.sidecars)
            self.sidecars = []

    @property
    def requests(self) -> int:
        return sum(map(len, self.ids))

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
        # id(model) -> its open batch (which keeps the model's key, not the model); full
        # ones wait in _handed to be built into tables, which wait in _built to be written
        self._batches: dict[int, _Batch] = {}
        self._handed: collections.deque[_Batch] = collections.deque()
        self._built: collections.deque[tuple] = collections.deque()
        # Without a loop, offers may come from any thread: they take this lock, and so does
        # the writer when it builds the batches. With one, only the loop offers and builds,
        # and the request path takes no lock (None).
        self._lock: threading.Lock | None = threading.Lock()
        self._take_lock = threading.Lock()  # the loop's builds against the writer's last one
        # one writer each: the request path adds to offered, the writer thread to taken
        self._offered_bytes = 0
        self._taken_bytes = 0
        self._random = random.Random()
        self._segments: dict[tuple[str, str, str], _Segment] = {}
        self._numbers = itertools.count()
        self._writer_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop = None
        self._stopped = False
        self._last_retention = 0.0
        self.taken: collections.Counter = collections.Counter()  # (model, version), by the writer
        self.written: collections.Counter = collections.Counter()  # rows, by (model, version)
        self.dropped: collections.Counter = collections.Counter()  # (model, reason)
        self.segments_rolled = 0
        self.writer_cpu_s = 0.0  # CPU time of the writer thread (writing Parquet)
        self.build_cpu_s = 0.0  # CPU time of building Arrow tables (on the loop)
        self.last_error = ""
        # model -> {request id: rows}: the ids feedback may name before their segment is
        # closed (so a request is always in a batch, here or in a closed file:
        # :meth:`rows_of_ids`), filled before a batch leaves _handed, emptied of a
        # segment's ids when it is closed. Plain dicts of strings and ints, which the
        # cyclic GC does not track; as large as the open segments' requests.
        self.recent_ids: dict[str, dict[str, int]] = {}
        if metrics is not None:
            metrics.registry.register(CaptureCollector(self))

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, loop=None) -> None:
        """Start the writer thread. With the endpoint's event ``loop`` (which makes every
        offer), the batches are built into tables on the loop, and offers take no lock;
        without one, offers from any thread take a lock and the writer builds the batches
        too. Building on the loop costs the endpoint only the work itself: on a second
        thread it also cost every hand-over of the GIL (the endpoint's thread idle while
        the other one wakes), which was more than the work."""
        import pyarrow.parquet  # noqa: F401  (imported now, not on the first write)

        self.fs.makedirs(self.root, exist_ok=True)
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        if loop is not None:
            self._lock = None
            loop.call_soon_threadsafe(self._schedule)
        self._thread.start()
        log.info("capturing %.0f%% of requests into %s", self.fraction * 100, self.url)

    def stopping(self) -> None:
        """Accept nothing more (called on the request path's thread, before :meth:`stop`)."""
        self._stopped = True

    def stop(self, timeout_s: float = 60.0) -> None:
        """Write what was accepted, roll every segment, stop the writer (blocking)."""
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
        if self._lock is None:
            self._offer(model, request_id, feeds, results, latency_s)
        else:
            with self._lock:
                self._offer(model, request_id, feeds, results, latency_s)

    def _offer(self, model, request_id, feeds: dict, results: list, latency_s: float) -> None:
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
            batch = self._batches.get(id(model))
            if batch is None:
                batch = self._batches[id(model)] = self._open(model, feeds)
            # a KeyError or a count that differs adds nothing
            arrays = [*map(feeds.__getitem__, batch.inputs), *results]
            if len(arrays) != len(batch.columns):
                raise ValueError(f"{len(arrays)} tensors, not {len(batch.columns)}")
            for array, column in zip(arrays, batch.columns):
                column.append(array)
            batch.ids.append((request_id() if request_id is not None else None) or new_request_id())
            batch.times.append(time.time())
            batch.latency.append(latency_s)
            batch.nbytes += nbytes
            self._offered_bytes += nbytes
            if len(batch.ids) >= BATCH_REQUESTS or batch.nbytes >= BATCH_BYTES:
                self._handed.append(batch)  # then out of _batches: always in one of them
                del self._batches[id(model)]
                if self._lock is None:
                    self._loop.call_soon(self._timed_build)
        except Exception:  # noqa: BLE001  (the answer must not notice the capture)
            self.dropped[(getattr(model, "name", "?"), "error")] += 1
            log.exception("capturing a request failed")

    @staticmethod
    def _open(model, feeds: dict) -> _Batch:
        specs = getattr(model, "inputs", None)
        inputs = tuple(spec.name for spec in specs) if specs else tuple(feeds)
        return _Batch((model.name, model.version), inputs, tuple(model.output_names))

    def _schedule(self) -> None:
        if not self._stop.is_set():
            self._loop.call_later(self.flush_interval_s, self._tick)

    def _tick(self) -> None:
        """Every flush interval, on the loop: build the open batches too."""
        try:
            self._timed_build(every=True)
        finally:
            self._schedule()

    def _timed_build(self, every: bool = False) -> None:
        started = time.thread_time()
        try:
            self._build(every)
        except Exception:  # noqa: BLE001  (the loop must not notice)
            log.exception("building captured requests failed")
        finally:
            self.build_cpu_s += time.thread_time() - started

    def _build(self, every: bool = False) -> None:
        """Turn the full batches (and with ``every`` the open ones) into Arrow tables for
        the writer. One taker at a time: the loop, or the writer (without a loop, and on
        stop, when offers are refused)."""
        with self._take_lock:
            if every:  # into _handed first: a reader always finds a batch in one of them
                self._handed.extend(b for b in self._batches.values() if b.ids)
                self._batches = {}
            while self._handed:
                batch = self._handed[0]
                counts = batch.counts()
                self._index(batch, counts)  # before it leaves _handed (see rows_of_ids)
                self._handed.popleft()
                try:
                    for day, table, shapes, ids in batch.tables(counts):
                        self._built.append(((*batch.key, day), table, shapes, ids, 0))
                except Exception as exc:  # noqa: BLE001  (counted, logged)
                    self._failed(batch.key, len(batch.ids), exc)
                # its bytes leave the budget once the writer took its tables
                self._built.append((None, None, None, None, batch.nbytes))

    @property
    def accepted(self) -> collections.Counter:
        """Requests accepted, by (model, version): taken by the writer, and still waiting."""
        counts = collections.Counter(self.taken)
        for batch in [*list(self._handed), *list(self._batches.values())]:  # list(): atomic
            counts[batch.key] += len(batch.ids)
        return counts

    def rows_of_ids(self, model: str, ids: set[str]) -> dict[str, int]:
        """Rows of those of ``ids`` accepted for ``model`` and not yet in a closed segment
        (the batches first: the writer indexes a batch before it takes it off)."""
        found = {}
        for batch in [*list(self._batches.values()), *list(self._handed)]:
            if batch.key[0] == model:
                found.update(batch.rows_of_ids(ids))
        recent = self.recent_ids.get(model, {})
        found.update((rid, recent[rid]) for rid in ids - found.keys() if rid in recent)
        return found

    # --- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self._timed_write()
        self._timed_build(every=True)  # what was accepted before stop (offers are refused)
        self._timed_write()
        for key in list(self._segments):
            self._roll(key)

    def _timed_write(self) -> None:
        started = time.thread_time()
        try:
            if self._lock is not None:  # no loop to build the batches
                with self._lock:
                    self._timed_build(every=True)
            self._write_once()
        finally:
            self.writer_cpu_s += time.thread_time() - started

    def _write_once(self) -> None:
        import pyarrow as pa

        waiting: dict[tuple[str, str, str], list[tuple]] = {}
        taken = 0
        while self._built:
            key, table, shapes, ids, nbytes = self._built.popleft()
            taken += nbytes
            if key is not None:
                waiting.setdefault(key, []).append((table, shapes, ids))
        for key, items in waiting.items():  # one row group per version and flush
            first = items[0][0].schema
            alike = [item for item in items if item[0].schema.equals(first)]
            tables = [item[0] for item in alike]
            table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
            self._write_table(key, table, items[0][1], [item[2] for item in alike])
            for table, shapes, ids in items:
                if not table.schema.equals(first):  # another shape or type: a new segment
                    self._write_table(key, table, shapes, [ids])
        self._taken_bytes += taken
        now = time.monotonic()
        for key, segment in list(self._segments.items()):
            if segment.bytes >= self.segment_bytes or now - segment.opened >= self.segment_s:
                self._roll(key)
        if self.retention_days > 0 and now - self._last_retention > 3600:
            self._last_retention = now
            self._apply_retention()

    def _index(self, batch: _Batch, counts: np.ndarray) -> None:
        """Count the batch's requests as taken and remember their ids (and ``counts`` of
        rows) for feedback."""
        self.taken[batch.key] += len(batch.ids)
        recent = self.recent_ids.get(batch.key[0])
        if recent is None:
            recent = self.recent_ids[batch.key[0]] = {}
        recent.update(zip(batch.ids, counts.tolist()))

    def _write_table(
        self, key: tuple[str, str, str], table, shapes: dict, ids: list[list[str]]
    ) -> None:
        try:
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
            segment.write(table, ids)
            self.written[key[:2]] += table.num_rows
        except Exception as exc:  # noqa: BLE001  (counted, logged; the writer carries on)
            self._failed(key, sum(map(len, ids)), exc)
            self._forget(key[0], ids)
            segment = self._segments.pop(key, None)
            if segment is not None:  # an unfinished file: what it held is lost too
                self._failed(key, segment.requests, exc)
                self._forget(key[0], segment.ids)
                self._forget_sidecars(segment)

    def _forget(self, model: str, ids: list[list[str]]) -> None:
        """Drop ids from the in-memory index (their file is closed, or they are lost)."""
        recent = self.recent_ids.get(model, {})
        pop = recent.pop
        for part in ids:
            for rid in part:
                pop(rid, None)

    def _failed(self, key, records: int, exc: Exception) -> None:
        self.dropped[(key[0], "write_error")] += records
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        log.error("cannot write %d captured requests of %s: %s", records, key[0], self.last_error)

    def _roll(self, key) -> None:
        segment = self._segments.pop(key)
        try:
            segment.roll()
            self.segments_rolled += 1
        except Exception as exc:  # noqa: BLE001
            self.dropped[(key[0], "write_error")] += segment.requests
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.exception("cannot close the capture segment %s", segment.final)
        self._forget(key[0], segment.ids)  # readable from the file now (or lost)
        self._forget_sidecars(segment)

    def _forget_sidecars(self, segment: _Segment) -> None:
        try:
            segment.forget_sidecars()
        except Exception:  # noqa: BLE001  (left-overs name ids of a closed or lost file)
            log.exception("cannot delete the id files of %s", segment.final)

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
            "writer_cpu_s": round(self.writer_cpu_s, 3),
            "build_cpu_s": round(self.build_cpu_s, 3),
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
        for (model, version), n in self.capture.accepted.items():
            accepted.add_metric([model, version], n)
        for (model, version), n in list(self.capture.written.items()):
            written.add_metric([model, version], n)
        for (model, reason), n in list(self.capture.dropped.items()):
            dropped.add_metric([model, reason], n)
        queued.add_metric([], self.capture._offered_bytes - self.capture._taken_bytes)
        cpu = CounterMetricFamily(
            "onnxflow_capture_writer_cpu_seconds",
            "CPU time of the capture's writer thread (writing Parquet).",
        )
        cpu.add_metric([], self.capture.writer_cpu_s)
        build = CounterMetricFamily(
            "onnxflow_capture_build_cpu_seconds",
            "CPU time spent turning captured requests into Arrow tables (on the event loop).",
        )
        build.add_metric([], self.capture.build_cpu_s)
        yield from (accepted, written, dropped, queued, cpu, build)

    def describe(self):
        return []

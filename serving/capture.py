"""Inference capture: what the endpoint answered, as Parquet segments, off the request path.

With ``--capture DIR`` (``capture`` setting; a local folder or any fsspec URL whose
filesystem package is installed) every answered request of every model, on both fronts,
is offered to :class:`Capture` (a ``capture_fraction`` share of them). The request path
only appends one flat tuple of references (ids, times, the request's own arrays: no copy,
no lock, no wake-up, no per-tensor work) to a deque: when ``capture_queue_bytes`` are
waiting, the record is dropped and counted in ``onnxflow_capture_dropped_total`` (never
silently lost, never a failed or slower answer).

Turning records into Arrow columns happens in bulk, on the endpoint's event loop (a short
step every ``BUILD_INTERVAL_S`` when a chunk of ``WRITE_CHUNK`` records waits, else every
``capture_flush_interval_s``): one ``np.concatenate`` per tensor per chunk, ids and times
gathered by C-level ``map``/``zip``, no per-record Python work beyond collecting references.
Done there, it never contends for the GIL with a second thread running Python (which cost
the endpoint more than the work itself). A writer thread appends what was built, every
``capture_flush_interval_s``, as one row group per (model, version) to its open segment:
Arrow writes without the GIL, and Parquet's dictionary encoding is off (tensor values hardly
repeat: trying it was most of the write's cost, and made the files larger). A capture used
without a loop (``start()`` without one) builds on the writer thread instead.
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
import operator
import os
import queue
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


#: Request ids made here: a random prefix per process and a counter (32 hex characters,
#: like a UUID; a tenth of uuid4's cost on the request path).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


#: What the request path queues, one flat tuple per request: ((model, version), request id,
#: time, latency_s, (input names), (input arrays), (output arrays), nbytes). Only tuples of
#: strings, floats and arrays, which the cyclic GC stops tracking once it has seen them: the
#: request's feeds dict, kept instead, made every collection walk thousands of waiting
#: records (about 4 % of the endpoint's throughput at 8 connections, capture_bench).
KEY, ID, TIME, LATENCY, NAMES, INPUTS, RESULTS, NBYTES = range(8)

#: Records turned into one Arrow table at a time, on the event loop: every request that
#: arrives meanwhile waits for it, so steps are short (at 8 connections of wrk, p99 with
#: capture on: 5.8 ms with chunks of 1,024 every 0.1 s, 2.7 ms with 256 every 0.02 s,
#: 1.5 ms off; throughput alike).
WRITE_CHUNK = 256
#: How often the event loop looks for a chunk to turn into a table (a short step each time).
BUILD_INTERVAL_S = 0.02


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


def record_table(records: list[tuple], output_names: tuple[str, ...]):
    """One Arrow table of ``records`` (queued tuples of one model version): a row per
    request row, and the per-row shapes of each tensor (of the first record) for the file's
    metadata. Columnar: the tensors of all records in one ``np.concatenate`` each."""
    import pyarrow as pa

    _, ids, times, latency, names, inputs, results, _ = zip(*records)
    n = len(records)
    if names.count(names[0]) != n:  # a client named the inputs in another order
        order = names[0]
        inputs = tuple(
            values if given == order else tuple(dict(zip(given, values))[k] for k in order)
            for given, values in zip(names, inputs)
        )
    names = names[0]
    counts = _lengths([f[0] for f in inputs])
    if counts is None:  # a scalar input: one row per request
        counts = np.fromiter((rows_of(f[0]) for f in inputs), np.int64, n)
    single = bool((counts == 1).all())
    times = np.array(times) * 1e6
    latency = np.array(latency) * 1e3
    columns = {
        "request_id": pa.array(ids if single else np.repeat(ids, counts).tolist(), pa.string()),
        "row": pa.array(
            np.zeros(n, np.int32)
            if single
            else np.concatenate([np.arange(k) for k in counts]).astype(np.int32)
        ),
        "time": pa.array(
            (times if single else np.repeat(times, counts)).astype(np.int64),
            pa.timestamp("us", tz="UTC"),
        ),
        "latency_ms": pa.array(latency if single else np.repeat(latency, counts)),
    }
    shapes = {}
    tensors = [(INPUT_PREFIX + name, [f[i] for f in inputs]) for i, name in enumerate(names)]
    tensors += [
        (OUTPUT_PREFIX + name, [r[i] for r in results]) for i, name in enumerate(output_names)
    ]
    for column, arrays in tensors:
        columns[column] = _tensor_column(arrays, counts)
        shapes[column] = list(arrays[0].shape[1:]) if arrays[0].ndim else []
    return pa.table(columns), shapes


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
        self._queue: collections.deque[tuple] = collections.deque()
        # one writer each: the request path adds to offered, the writer thread to taken
        self._offered_bytes = 0
        self._taken_bytes = 0
        self._random = random.Random()
        self._output_names: dict[tuple[str, str], tuple[str, ...]] = {}
        self._segments: dict[tuple[str, str, str], _Segment] = {}
        self._numbers = itertools.count()
        self._writer_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._last_retention = 0.0
        self.taken: collections.Counter = collections.Counter()  # (model, version), by the writer
        self.written: collections.Counter = collections.Counter()  # rows, by (model, version)
        self.dropped: collections.Counter = collections.Counter()  # (model, reason)
        self.segments_rolled = 0
        # CPU time of the writer thread, and of building tables on the event loop
        self.writer_cpu_s = 0.0
        self.build_cpu_s = 0.0
        self._loop = None
        self._last_build = 0.0
        self._take_lock = threading.Lock()  # takers only: the request path never takes it
        self._built: queue.SimpleQueue = queue.SimpleQueue()
        self.last_error = ""
        # model -> {request id: rows}: the ids feedback may name before their segment is
        # closed, filled by the writer before it takes records off the queue (so a record is
        # always in the queue or here: :meth:`rows_of_ids`). Plain dicts of strings and ints,
        # which the cyclic GC does not track.
        self.recent_ids: dict[str, dict[str, int]] = {}
        self.recent_limit = 200_000
        if metrics is not None:
            metrics.registry.register(CaptureCollector(self))

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, loop=None) -> None:
        """Start the writer thread. With the endpoint's event ``loop``, the records are
        turned into Arrow tables on that loop (every ``BUILD_INTERVAL_S``, in one short
        step) and only written by the thread: the two never contend for the GIL while
        the thread works in Python, which cost the endpoint more than the work itself.
        Without one (a capture used on its own), the thread does both."""
        import pyarrow.parquet  # noqa: F401  (imported now, not on the first write)

        self.fs.makedirs(self.root, exist_ok=True)
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()
        if loop is not None:
            loop.call_soon_threadsafe(self._schedule)
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
            key = (model.name, model.version)
            if key not in self._output_names:
                self._output_names[key] = tuple(model.output_names)
            request_id = (request_id() if request_id is not None else None) or new_request_id()
            self._offered_bytes += nbytes
            self._queue.append(
                (
                    key,
                    request_id,
                    time.time(),
                    latency_s,
                    tuple(feeds),
                    tuple(feeds.values()),
                    tuple(results),
                    nbytes,
                )
            )
        except Exception:  # noqa: BLE001  (the answer must not notice the capture)
            self.dropped[(getattr(model, "name", "?"), "error")] += 1
            log.exception("capturing a request failed")

    @property
    def accepted(self) -> collections.Counter:
        """Requests accepted, by (model, version): taken by the writer, and still queued."""
        counts = collections.Counter(self.taken)
        counts.update(record[KEY] for record in list(self._queue))  # list(): atomic
        return counts

    def rows_of_ids(self, model: str, ids: set[str]) -> dict[str, int]:
        """Rows of those of ``ids`` accepted for ``model`` and not yet in a closed segment
        (the queue first: the writer indexes records before it takes them off)."""
        found = {
            record[ID]: rows_of(record[INPUTS][0])
            for record in list(self._queue)
            if record[KEY][0] == model and record[ID] in ids
        }
        recent = self.recent_ids.get(model, {})
        found.update((rid, recent[rid]) for rid in ids - found.keys() if rid in recent)
        return found

    # --- the writer thread ---------------------------------------------------------------

    # --- building tables: on the event loop (or the writer thread without one) -----------

    def _schedule(self) -> None:
        if not self._stop.is_set():
            self._loop.call_later(BUILD_INTERVAL_S, self._tick)

    def _tick(self) -> None:
        """Build when a chunk is waiting (a short step at any rate) or the flush interval
        has passed (few, larger tables when traffic is light: each has a fixed cost)."""
        now = time.monotonic()
        if len(self._queue) < WRITE_CHUNK and now - self._last_build < self.flush_interval_s:
            self._schedule()
            return
        self._last_build = now
        started = time.thread_time()
        try:
            self._build()
        except Exception:  # noqa: BLE001  (counted in _build; the loop must not notice)
            log.exception("building captured records failed")
        finally:
            self.build_cpu_s += time.thread_time() - started
            self._schedule()

    def _build(self) -> None:
        """Take what waits in the queue and hand it to the writer as Arrow tables (one per
        model version and day, at most ``WRITE_CHUNK`` records each). One taker at a time:
        the loop's tick, or the writer thread's last call on stop."""
        with self._take_lock:
            batch = list(self._queue)  # atomic under the GIL; the request path appends on
            if not batch:
                return
            groups = self._groups(batch)
            for key, records in groups.items():
                self._index(key[:2], records)
            popleft = self._queue.popleft
            for _ in itertools.repeat(None, len(batch)):
                popleft()
            for key, records in groups.items():
                for i in range(0, len(records), WRITE_CHUNK):
                    chunk = records[i : i + WRITE_CHUNK]
                    nbytes = sum(map(operator.itemgetter(NBYTES), chunk))
                    try:
                        table, shapes = record_table(chunk, self._output_names[key[:2]])
                    except Exception as exc:  # noqa: BLE001  (counted, logged)
                        self._failed(key, len(chunk), exc)
                        self._taken_bytes += nbytes
                        continue
                    self._built.put((key, table, shapes, len(chunk), nbytes))

    # --- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self._timed_write()
        self._build()  # what was accepted before stop (offers are refused by now)
        self._timed_write()
        for key in list(self._segments):
            self._roll(key)

    def _timed_write(self) -> None:
        started = time.thread_time()
        try:
            if self._loop is None:
                self._build()
            self._write_once()
        finally:
            self.writer_cpu_s += time.thread_time() - started

    def _write_once(self) -> None:
        import pyarrow as pa

        waiting: dict[tuple[str, str, str], list[tuple]] = {}
        while True:
            try:
                item = self._built.get_nowait()
            except queue.Empty:
                break
            waiting.setdefault(item[0], []).append(item)
        for key, items in waiting.items():  # one row group per version and flush
            first = items[0][1].schema
            alike = [i for i in items if i[1].schema.equals(first)]
            tables = [i[1] for i in alike]
            table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
            self._write_table(key, table, items[0][2], sum(i[3] for i in alike))
            for item in items:
                if not item[1].schema.equals(first):  # another shape or type: a new segment
                    self._write_table(key, item[1], item[2], item[3])
            self._taken_bytes += sum(i[4] for i in items)
        now = time.monotonic()
        for key, segment in list(self._segments.items()):
            if segment.bytes >= self.segment_bytes or now - segment.opened >= self.segment_s:
                self._roll(key)
        if self.retention_days > 0 and now - self._last_retention > 3600:
            self._last_retention = now
            self._apply_retention()

    @staticmethod
    def _groups(batch: list[tuple]) -> dict[tuple[str, str, str], list[tuple]]:
        """``batch`` by (model, version, UTC date); one group without a per-record loop in
        the usual case (one version, one day)."""
        keys = list(map(operator.itemgetter(KEY), batch))
        days = np.fromiter(map(operator.itemgetter(TIME), batch), np.float64, len(batch))
        days //= 86400
        if keys.count(keys[0]) == len(keys) and days.min() == days.max():
            return {(*keys[0], _day(days[0])): batch}
        groups: dict[tuple[str, str, str], list[tuple]] = {}
        for record, key, day in zip(batch, keys, days.tolist()):
            groups.setdefault((*key, _day(day)), []).append(record)
        return groups

    def _index(self, key: tuple[str, str], records: list[tuple]) -> None:
        """Count ``records`` as taken and remember their ids for feedback."""
        self.taken[key] += len(records)
        recent = self.recent_ids.get(key[0])
        if recent is None:
            recent = self.recent_ids[key[0]] = {}
        ids = list(map(operator.itemgetter(ID), records))
        counts = _lengths([r[INPUTS][0] for r in records])
        if counts is None:
            recent.update((r[ID], rows_of(r[INPUTS][0])) for r in records)
        else:
            recent.update(zip(ids, counts.tolist()))
        if len(recent) > self.recent_limit:  # keep the newer half (insertion order)
            kept = list(recent.items())[self.recent_limit // 2 :]
            recent.clear()
            recent.update(kept)

    def _write_table(self, key: tuple[str, str, str], table, shapes: dict, records: int) -> None:
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
            segment.write(table)
            self.written[key[:2]] += table.num_rows
        except Exception as exc:  # noqa: BLE001  (counted, logged; the writer carries on)
            self._failed(key, records, exc)
            self._segments.pop(key, None)

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
            "CPU time of the capture's writer thread (building and writing Parquet).",
        )
        cpu.add_metric([], self.capture.writer_cpu_s)
        build = CounterMetricFamily(
            "onnxflow_capture_build_cpu_seconds",
            "CPU time the event loop spent turning captured requests into Arrow tables.",
        )
        build.add_metric([], self.capture.build_cpu_s)
        yield from (accepted, written, dropped, queued, cpu, build)

    def describe(self):
        return []

"""Inference capture: what the endpoint answered, as Parquet segments, off the request path.

With ``--capture DIR`` (``capture`` setting; a local folder or any fsspec URL whose
filesystem package is installed) every answered request of every model, on both fronts,
is offered to :class:`Capture` (a ``capture_fraction`` share of them). The request path
adds it to its model version's open :class:`_Batch`: each number tensor's bytes are copied
into the batch's buffer for that tensor while the values are still in the CPU's cache,
strings are kept as references, and the id, time and latency go into buffers of C values
(no lock, no wake-up, nothing the cyclic GC tracks). On the endpoint's loop a request like
its batch's first is taken whole by one call to the C extension (``_capture.offer``, from
serving/_capture.c); everything else, and everything where the extension was not built,
by :meth:`Capture._offer`. When ``capture_queue_bytes`` are waiting, the request is
dropped and counted in ``onnxflow_capture_dropped_total`` (never silently lost, never a
failed or slower answer).

A batch is handed over once it holds ``BATCH_REQUESTS`` requests or ``BATCH_BYTES`` (and
every ``capture_flush_interval_s``, by the loop). Every flush interval the capture's
sender thread gives the handed batches to the writer (:mod:`.capture_writer`: by default
a process of its own, fed over a pipe; a thread for ``memory://`` or with
``capture_writer="thread"``), which turns them into Arrow tables and appends them to its
segments (see there), and takes them out of the queue's budget once written. On stop it
writes every accepted request first (SIGTERM: the endpoint stops, nothing accepted is
lost) and has every segment rolled. A capture used without a loop (``start()`` without
one) takes a lock around each offer, and its sender takes the open batches under it.

Feedback looks a request id up in the batches not yet written, then (a writer thread) in
the ``request_id`` columns of its open segments; everything else is in the id files beside
the open segments and in the closed ones, which the feedback route reads.

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
import contextlib
import datetime as dt
import functools
import itertools
import logging
import math
import operator
import pickle
import random
import struct
import threading
import time
import uuid

import numpy as np

try:  # the request path in C, where it was built (setuptools' optional extension)
    from onnxflow.serving import _capture as native
except ImportError:  # pragma: no cover  (an install without a C compiler)
    native = None

log = logging.getLogger(__name__)

INPUT_PREFIX = "input."
OUTPUT_PREFIX = "output."
SHAPES_KEY = b"onnxflow.shapes"
#: Beside an open (hidden) segment, the ids and rows of what it holds so far, one small
#: hidden Parquet file per write, deleted once the segment is closed: another replica's
#: feedback route finds a request there before its segment is readable.
IDS_PREFIX = ".ids-"
#: The columns every captured row starts with (see :func:`request_columns`). Only these
#: get Parquet statistics: a reader skips row groups by ``time``; a tensor's minimum and
#: maximum help no reader and cost about 5% of the write (digits, zstd).
REQUEST_COLUMNS = ("request_id", "row", "time", "latency_ms")


#: Request ids made here: a random prefix per process (16 hex characters) and a counter of
#: 16 decimal digits (32 characters, like a UUID's hex; a twentieth of uuid4's cost and a
#: quarter of formatting the counter in hex, on the request path), made by the C extension
#: where it was built (a quarter of this f-string's cost).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(10**15)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER)}"


if native is not None:
    native.start_ids(_ID_PREFIX, 10**15)
    new_request_id = native.new_id  # noqa: F811  (the same ids, in C)


#: A batch is handed to the writer, which turns it into an Arrow table, once it holds this
#: many requests or bytes (and every flush interval). Nothing of that runs on the loop:
#: the request path copies a request's tensors into the batch's buffers while they are
#: still in the CPU's cache, and the writer's building is a few calls per tensor.
BATCH_REQUESTS = 4096
BATCH_BYTES = 4 << 20

#: Tensors of these kinds (numbers and booleans) are copied into a batch's buffers; others
#: (strings, objects) are kept as references.
PACKED_KINDS = frozenset("biufc?")
_DTYPE = operator.attrgetter("dtype")
_NBYTES = operator.attrgetter("nbytes")
_INT = struct.Struct("i")
_DOUBLE = struct.Struct("d")


def open_filesystem(url: str):
    """(fsspec filesystem, root path) for a folder or URL; a clear error when the URL's
    filesystem package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"capture location {url!r}: {exc}") from None


def request_columns(ids, times, latency, counts: np.ndarray) -> dict:
    """The columns every captured row starts with, from per-request ``ids`` (an Arrow
    string array), ``times`` (seconds since the epoch), ``latency`` (seconds) and row
    ``counts``."""
    import pyarrow as pa

    times = np.asarray(times) * 1e6
    latency = np.asarray(latency) * 1e3
    if len(counts) == int(counts.sum()):  # a row each
        rows = np.zeros(len(counts), np.int32)
    else:
        of_row = np.repeat(np.arange(len(counts)), counts)
        rows = np.arange(len(of_row)) - np.repeat(np.cumsum(counts) - counts, counts)
        ids, times, latency = ids.take(pa.array(of_row)), times[of_row], latency[of_row]
    return {
        "request_id": ids,
        "row": pa.array(rows.astype(np.int32)),
        "time": pa.array(times.astype(np.int64), pa.timestamp("us", tz="UTC")),
        "latency_ms": pa.array(latency),
    }


class _Batch:
    """Requests of one model version waiting for the writer, by column: each request's id,
    time and latency, and its input and output tensors (inputs in the model's order,
    whatever order a client sends). A number tensor is copied into its column's buffer on
    the request path, while it is still in the CPU's cache (building from references to
    thousands of small arrays, cold by then, cost several times more); other tensors are
    kept as references. Every column is a ``bytearray`` (or a list of references), so the
    C extension's ``append`` and the Python path (:meth:`take`, :meth:`add`) fill the same
    batch. Filled on the endpoint's loop, handed to the writer whole.

    Every request's shapes are those of the first while its tensors have the first one's
    byte sizes and each tensor has at most one dynamic axis (the model's specs say); else
    (``shapes`` not None) the batch keeps every request's shapes from then on, and only
    the Python path adds to it (``columns`` None)."""

    __slots__ = (
        "key", "inputs", "outputs", "sinks", "adders", "sizes", "dtypes", "first", "shapes",
        "simple", "request_bytes", "id_sink", "id_lengths", "times", "latency", "tally",
        "_bytes", "columns",
    )  # fmt: skip

    def __init__(self, key, inputs, outputs, arrays: list[np.ndarray], exact: bool) -> None:
        self.key = key  # (model, version)
        self.inputs = inputs
        self.outputs = outputs
        packed = [a.dtype.kind in PACKED_KINDS and a.flags.c_contiguous for a in arrays]
        self.sinks = [bytearray() if p else [] for p in packed]
        self.adders = [s.__iadd__ if p else s.append for s, p in zip(self.sinks, packed)]
        self.sizes = [a.nbytes for a in arrays]  # what a request like the first one adds
        self.dtypes = [a.dtype for a in arrays]
        self.first = [a.shape for a in arrays]
        self.shapes: list[list[tuple]] | None = None if exact else []
        self.simple = exact and all(packed)
        self.request_bytes = sum(self.sizes)
        # ids as Arrow keeps strings (UTF-8 bytes and their lengths as C ints), times and
        # latency as C doubles: a closed batch's columns are a few calls, nothing per request
        self.id_sink = bytearray()
        self.id_lengths = bytearray()
        self.times = bytearray()
        self.latency = bytearray()
        # the batch's bytes, a C int64 the C extension adds to in place (see nbytes)
        self.tally = bytearray(8)
        self._bytes = memoryview(self.tally).cast("q")
        # what the C extension appends to while every request is like the first (see
        # serving/_capture.c), up to the request that fills the batch (Python's: it hands
        # the batch over)
        self.columns = None
        if self.simple:
            formats = tuple(memoryview(a).format.encode() for a in arrays)
            limit = min(BATCH_REQUESTS, -(-BATCH_BYTES // max(self.request_bytes, 1)))
            self.columns = (
                tuple(self.sinks), tuple(self.sizes), formats,
                self.id_sink, self.id_lengths, self.times, self.latency,
                tuple(inputs), self.request_bytes, limit, self.tally,
            )  # fmt: skip

    def parts(self) -> tuple[bytes, list]:
        """The batch for a writer in another process: a pickled header (what it is, and
        the columns of references) and the buffers of its other columns, to send as
        they are. The batch is closed."""
        header = (
            self.key, self.inputs, self.outputs, self.dtypes, self.first, self.shapes,
            [s if isinstance(s, list) else None for s in self.sinks],
        )  # fmt: skip
        buffers = [s for s in self.sinks if not isinstance(s, list)]
        return pickle.dumps(header, protocol=5), [
            *buffers, self.id_sink, self.id_lengths, self.times, self.latency,
        ]  # fmt: skip

    @classmethod
    def from_parts(cls, header: bytes, buffers: list) -> _Batch:
        """A closed batch from :meth:`parts` (in the writer's process): it builds tables."""
        key, inputs, outputs, dtypes, first, shapes, sinks = pickle.loads(header)
        batch = cls.__new__(cls)
        batch.key, batch.inputs, batch.outputs = key, inputs, outputs
        batch.dtypes, batch.first, batch.shapes = dtypes, first, shapes
        received = iter(buffers)
        batch.sinks = [s if s is not None else next(received) for s in sinks]
        batch.id_sink, batch.id_lengths, batch.times, batch.latency = received
        batch.adders, batch.columns, batch.simple = [], None, False
        batch.sizes = [None] * len(sinks)
        batch.request_bytes = 0
        batch.tally = bytearray(8)
        batch._bytes = memoryview(batch.tally).cast("q")
        return batch

    @property
    def nbytes(self) -> int:
        """Bytes of the requests' tensors (what the capture's queue budget counts)."""
        return self._bytes[0]

    @nbytes.setter
    def nbytes(self, value: int) -> None:
        self._bytes[0] = value

    def add(self, request_id: str, at: float, latency_s: float) -> None:
        """The request's id, time and latency, after :meth:`take` took its tensors."""
        encoded = request_id.encode()
        self.id_sink += encoded
        self.id_lengths += _INT.pack(len(encoded))
        self.times += _DOUBLE.pack(at)
        self.latency += _DOUBLE.pack(latency_s)

    @property
    def requests(self) -> int:
        return len(self.times) // _DOUBLE.size

    def ids(self, closed: bool = False):
        """The requests' ids, an Arrow string array. ``closed``: no request comes any more,
        the buffers are shared; else copied (a bytearray viewed cannot grow)."""
        import pyarrow as pa

        lengths = self.id_lengths if closed else bytes(self.id_lengths)
        data = self.id_sink if closed else bytes(self.id_sink)
        n = len(lengths) // _INT.size
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(np.frombuffer(lengths, np.intc), out=offsets[1:])
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))

    def take(self, arrays: list[np.ndarray]) -> int:
        """Add one request's tensors; its bytes. Raises, the batch as it was, on a tensor
        it cannot hold (another type)."""
        try:
            list(map(operator.call, self.adders, arrays))
            if (
                self.simple
                and list(map(_NBYTES, arrays)) == self.sizes
                and list(map(_DTYPE, arrays)) == self.dtypes
            ):
                return self.request_bytes
            return self._note(arrays)
        except Exception:
            self._truncate()
            if all(a.flags.c_contiguous for a in arrays):
                raise
        return self.take([np.ascontiguousarray(a) for a in arrays])  # a view, say

    def _note(self, arrays: list[np.ndarray]) -> int:
        """A request unlike the first, or in a batch that keeps every request's shapes."""
        dtypes = list(map(_DTYPE, arrays))
        if dtypes != self.dtypes:
            raise TypeError(f"tensors of {dtypes}, not {self.dtypes}")
        if self.shapes is None:  # the first request unlike the first one
            self.shapes = [self.first] * self.requests
            self.simple = False  # every request's shapes are kept from now on
            self.columns = None  # by the Python path
        self.shapes.append([a.shape for a in arrays])
        return sum(a.nbytes for a in arrays)

    def _truncate(self) -> None:
        """Back to the requests taken before a failed :meth:`take`."""
        n = self.requests
        if self.shapes is not None:
            del self.shapes[n:]
        for i, sink in enumerate(self.sinks):
            if isinstance(sink, list):
                del sink[n:]
            else:
                shapes = [self.first] * n if self.shapes is None else self.shapes
                del sink[sum(math.prod(s[i]) for s in shapes) * self.dtypes[i].itemsize :]

    def counts(self) -> np.ndarray:
        """Rows of each request (its first input's first axis; 1 for a scalar)."""
        n = self.requests
        if isinstance(self.sinks[0], list):
            first = self.sinks[0][:n]
            counts = _lengths(first)
            return counts if counts is not None else np.array([_rows(np.shape(a)) for a in first])
        if self.shapes is None:
            return np.full(n, _rows(self.first[0]))
        return np.array([_rows(s[0]) for s in self.shapes[:n]])

    def rows_of_ids(self, wanted) -> dict[str, int]:
        """Rows of the requests whose id is in ``wanted`` (an Arrow string array)."""
        import pyarrow.compute as pc

        ids = self.ids()
        hits = np.flatnonzero(pc.is_in(ids, value_set=wanted).to_numpy(zero_copy_only=False))
        counts = self.counts()
        return {ids[int(i)].as_py(): int(counts[i]) for i in hits}

    def tables(self, counts: np.ndarray):
        """(date, Arrow table, per-row shapes, requests) for each UTC date of the batch's
        requests (one, except across midnight), their rows ``counts``. The batch is closed."""
        import pyarrow as pa

        times = np.frombuffer(self.times)
        latency = np.frombuffer(self.latency)
        columns = request_columns(self.ids(closed=True), times, latency, counts)
        names = [INPUT_PREFIX + n for n in self.inputs] + [OUTPUT_PREFIX + n for n in self.outputs]
        shapes = {}
        for i, name in enumerate(names):
            columns[name] = self._column(i, counts)
            shapes[name] = list(self.first[i][1:])
        table = pa.table(columns)
        days = times // 86400
        if (days == days[0]).all():
            yield _day(days[0]), table, shapes, self.requests
            return
        rows = np.repeat(days, counts)
        for day in np.unique(days):  # across midnight
            yield _day(day), table.filter(pa.array(rows == day)), shapes, int((days == day).sum())

    def _column(self, i: int, counts: np.ndarray):
        """Tensor ``i`` of every request as a list column, a row's values per entry."""
        import pyarrow as pa

        sink = self.sinks[i]
        if isinstance(sink, list):
            return _tensor_column(sink, counts)
        flat = np.frombuffer(sink, self.dtypes[i])
        if self.shapes is not None:  # each request's own shape
            return _shaped_column(flat, [s[i] for s in self.shapes], counts)
        n, first = self.requests, self.first[i]
        rows = int(counts[0]) if n else 0  # every request has the first one's rows
        width = math.prod(first)
        values = flat.reshape(n, width)
        if first and first[0] == rows:  # the request's rows
            width //= max(rows, 1)
        else:  # a batch-less tensor: on each of its rows
            values = np.broadcast_to(values[:, None, :], (n, rows, width))
        values = values.reshape(n * rows, width)
        return pa.FixedSizeListArray.from_arrays(_values(values.ravel()), width)


def _shaped_column(flat: np.ndarray, shapes: list[tuple], counts: np.ndarray):
    """A list column from the values of requests of ``shapes``, one after the other."""
    import pyarrow as pa

    n = len(shapes)
    sizes = np.fromiter(map(math.prod, shapes), np.int64, n)
    lead = np.fromiter((s[0] if s else -1 for s in shapes), np.int64, n)
    if (lead == counts).all():  # each request's rows in order: cut by the rows' widths
        widths = np.repeat(sizes // np.maximum(counts, 1), counts)
        if len(widths) and (widths == widths[0]).all():
            return pa.FixedSizeListArray.from_arrays(_values(flat), int(widths[0]))
        offsets = np.zeros(len(widths) + 1, np.int32)
        np.cumsum(widths, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), _values(flat))
    ends = np.cumsum(sizes)  # a batch-less tensor somewhere: request by request
    arrays = [a.reshape(s) for a, s in zip(np.split(flat, ends[:-1]), shapes)]
    return _tensor_column(arrays, counts)


def _rows(shape: tuple) -> int:
    return shape[0] if shape else 1


def _input_names(model, feeds: dict) -> tuple[str, ...]:
    """The model's inputs in its order (a client may send them in any), else ``feeds``'."""
    specs = getattr(model, "inputs", None)
    return tuple(spec.name for spec in specs) if specs else tuple(feeds)


def _exact(model, arrays: list[np.ndarray]) -> bool:
    """Whether a tensor's byte size tells its shape, for every tensor of ``model`` (given
    as ``arrays``, inputs then outputs): its spec has the array's rank and at most one
    dynamic axis."""
    specs = [*(getattr(model, "inputs", None) or ()), *(getattr(model, "outputs", None) or ())]
    return len(specs) == len(arrays) and all(
        len(spec.shape) == array.ndim and sum(d < 0 for d in spec.shape) <= 1
        for spec, array in zip(specs, arrays)
    )


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


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


class Capture:
    """The endpoint's capture: the request path's :meth:`offer`, the hand-over to the
    writer, counts."""

    def __init__(self, settings, metrics=None) -> None:
        self.url = settings.capture
        self.fs, self.root = open_filesystem(settings.capture)
        self.root = self.root.rstrip("/")
        self.fraction = settings.capture_fraction
        self.queue_bytes = settings.capture_queue_bytes
        self.flush_interval_s = settings.capture_flush_interval_s
        # what the writer is given (see onnxflow.serving.capture_writer)
        self.writer_settings = {
            "url": settings.capture,
            "segment_bytes": settings.capture_segment_bytes,
            "segment_s": settings.capture_segment_s,
            "retention_days": settings.capture_retention_days,
        }
        self.writer_nice = settings.capture_writer_nice
        # a process of its own, but where only this process can see the files
        self.in_process = settings.capture_writer == "thread" or "memory" in _protocols(self.fs)
        # id(model) -> its open batch (which keeps the model's key, not the model); full
        # ones wait in _handed for the writer, which builds them into tables and writes them
        self._batches: dict[int, _Batch] = {}
        self._handed: collections.deque[_Batch] = collections.deque()
        # Without a loop, offers may come from any thread: they take this lock, and so does
        # the writer when it builds the batches. With one, only the loop offers and builds,
        # and the request path takes no lock (None).
        self._lock: threading.Lock | None = threading.Lock()
        self._hand_lock = threading.Lock()  # the loop's hand-over against the writer's last
        # Bytes offered (added to by the request path) and taken (by the sender thread) as
        # C int64s, which the C extension adds to in place: setting attributes from C cost
        # it more than copying the request.
        self._tally = bytearray(16)
        self._counts = memoryview(self._tally).cast("q")
        self._random = random.Random()
        # the C extension's append, where it was built (None: the Python path alone)
        self.native = native
        # a SegmentWriter (in_process) or a WriterProcess, made by start()
        self._writer = None
        # the figures of writer processes that ended (see _writer_gone)
        self._retired: dict = {"written": collections.Counter(), "dropped": collections.Counter()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop = None
        self._stopped = False
        self.taken: collections.Counter = collections.Counter()  # (model, version), by the writer
        # (model, reason) of requests not captured: refused on the request path, and lost
        # with a writer process that ended (the writer counts its own write errors)
        self._refused: collections.Counter = collections.Counter()
        self._lost_error = ""
        if metrics is not None:
            metrics.registry.register(CaptureCollector(self))

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, loop=None) -> None:
        """Start the writer and the sender thread. With the endpoint's event ``loop``
        (which makes every offer), offers take no lock and the loop hands the open batches
        over every flush interval; without one, offers from any thread take a lock, and
        the sender takes the open batches under it."""
        self.fs.makedirs(self.root, exist_ok=True)
        self._writer = self._new_writer()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        if loop is not None:
            self._lock = None
            # no lock to take: the loop offers alone. A request like its batch's first is
            # taken in one C call, anything else by _offer (which samples, when sampling)
            self.offer = self._offer
            if self.native is not None and self.fraction >= 1.0:
                state = (self._tally, self._batches, self._offer, self.queue_bytes)
                self.offer = functools.partial(self.native.offer, state)
            loop.call_soon_threadsafe(self._schedule)
        self._thread.start()
        log.info(
            "capturing %.0f%% of requests into %s (request path in %s; writer: %s)",
            self.fraction * 100,
            self.url,
            "C" if self.native is not None else "Python: the C extension was not built",
            self._writer_name(),
        )

    def _writer_name(self) -> str:
        process = getattr(self._writer, "process", None)
        return (
            f"process {process.pid}, nice {self.writer_nice}" if process is not None else "thread"
        )

    def _new_writer(self):
        from onnxflow.serving.capture_writer import SegmentWriter, WriterGone, WriterProcess

        if not self.in_process:
            try:
                return WriterProcess(self.writer_settings, nice=self.writer_nice)
            except (OSError, WriterGone) as exc:  # a process cannot be started here
                log.warning("capture: no writer process (%s); writing from a thread", exc)
                self.in_process = True
        return SegmentWriter(**self.writer_settings)

    def stopping(self) -> None:
        """Accept nothing more (called on the request path's thread, before :meth:`stop`)."""
        self._stopped = True
        if "offer" in vars(self):  # the loop's: Python's from now on, which counts the refused
            self.offer = self._offer

    def stop(self, timeout_s: float = 60.0) -> None:
        """Write what was accepted, roll every segment, stop the writer (blocking)."""
        self.stopping()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("the capture writer did not finish in %.0f s", timeout_s)

    @property
    def _offered_bytes(self) -> int:
        return self._counts[0]

    @_offered_bytes.setter
    def _offered_bytes(self, value: int) -> None:
        self._counts[0] = value

    @property
    def _taken_bytes(self) -> int:
        return self._counts[1]

    @_taken_bytes.setter
    def _taken_bytes(self, value: int) -> None:
        self._counts[1] = value

    # --- the request path: never waits, never raises ------------------------------------

    def offer(self, model, request_id, feeds: dict, results: list, latency_s: float) -> None:
        """Take one answered request, or count why not. ``request_id``: its id (the
        client's, or the new one the front returns); None: a new one here."""
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
                self._refused[(model.name, "stopped")] += 1
                return
            batch = self._batches.get(id(model))
            # a KeyError (an input missing) adds nothing
            if batch is None:
                inputs = _input_names(model, feeds)
                arrays = [*map(feeds.__getitem__, inputs), *results]
                nbytes = sum(a.nbytes for a in arrays)
            else:
                arrays = [*map(feeds.__getitem__, batch.inputs), *results]
                nbytes = batch.request_bytes  # the batch's first: take() tells this one's
            if self._offered_bytes - self._taken_bytes + nbytes > self.queue_bytes:
                self._refused[(model.name, "queue_full")] += 1
                return
            if batch is None:
                key, outputs = (model.name, model.version), tuple(model.output_names)
                batch = _Batch(key, inputs, outputs, arrays, _exact(model, arrays))
                self._batches[id(model)] = batch
            if len(arrays) != len(batch.adders):
                raise ValueError(f"{len(arrays)} tensors, not {len(batch.adders)}")
            request_id = request_id or new_request_id()
            columns = batch.columns
            if (
                columns is not None
                and self.native is not None
                and self.native.append(columns, arrays, request_id, time.time(), latency_s)
            ):  # in C: a request like the first one (False: nothing added)
                nbytes = batch.request_bytes
            else:
                nbytes = batch.take(arrays)
                batch.add(request_id, time.time(), latency_s)
            batch.nbytes += nbytes
            self._offered_bytes += nbytes
            if batch.requests >= BATCH_REQUESTS or batch.nbytes >= BATCH_BYTES:
                self._handed.append(batch)  # then out of _batches: always in one of them
                del self._batches[id(model)]
        except Exception:  # noqa: BLE001  (the answer must not notice the capture)
            self._refused[(getattr(model, "name", "?"), "error")] += 1
            log.exception("capturing a request failed")

    def _schedule(self) -> None:
        if not self._stop.is_set():
            self._loop.call_later(self.flush_interval_s, self._tick)

    def _tick(self) -> None:
        """Every flush interval, on the loop: hand the open batches to the writer too."""
        try:
            self._hand_open()
        finally:
            self._schedule()

    def _hand_open(self) -> None:
        """Into _handed first: a reader always finds a batch in one of them. Called where
        the offers are made (the loop), or under their lock."""
        with self._hand_lock:
            self._handed.extend(b for b in self._batches.values() if b.requests)
            self._batches.clear()  # the same dict: the C offer holds it

    @property
    def accepted(self) -> collections.Counter:
        """Requests accepted, by (model, version): taken by the writer, and still waiting."""
        counts = collections.Counter(self.taken)
        for batch in [*list(self._handed), *list(self._batches.values())]:  # list(): atomic
            counts[batch.key] += batch.requests
        return counts

    def rows_of_ids(self, model: str, ids: set[str]) -> dict[str, int]:
        """Rows of those of ``ids`` accepted for ``model`` and not in a closed segment: in
        the batches, or written to a segment still open. A batch leaves ``_handed`` once
        it is in its segment, so a request is always in one or the other (or closed)."""
        import pyarrow as pa

        if not ids:
            return {}
        wanted = pa.array(sorted(ids), pa.string())
        batches = [*list(self._batches.values()), *list(self._handed)]  # list(): atomic
        writer = self._writer  # after the batches: see above
        found: dict[str, int] = {}
        for batch in batches:
            if batch.key[0] == model:
                found.update(batch.rows_of_ids(wanted))
        if writer is not None:
            found.update(writer.rows_of_ids(model, wanted))
        return found

    # --- the sender thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self._timed_write()
        self._timed_write(every=True)  # what was accepted before stop (offers are refused)
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the capture's segments failed")

    def _timed_write(self, every: bool = False) -> None:
        from onnxflow.serving.capture_writer import WriterGone

        try:
            if self._lock is not None or every:  # no loop hands the open batches over
                with self._lock or contextlib.nullcontext():
                    self._hand_open()
            batches = list(self._handed)
            try:
                self._writer.write(batches)
            except WriterGone as exc:  # what it was given is lost with it: counted
                self._writer_gone(batches, exc)
            finally:  # taken once, whatever failed (failed writes are counted as dropped)
                for batch in batches:  # in their segments now (see rows_of_ids)
                    self.taken[batch.key] += batch.requests
                    self._handed.popleft()
                    self._taken_bytes += batch.nbytes  # out of the budget once written
        except Exception:  # noqa: BLE001  (the writer carries on)
            log.exception("writing captured requests failed")

    def _writer_gone(self, batches: list[_Batch], exc: Exception) -> None:
        """The writer process ended: its figures are kept, what it was sent is counted as
        lost (its open segments with it), and a new one takes the next batches."""
        log.error("%s; %d batches lost, starting a new writer", exc, len(batches))
        self._lost_error = str(exc)[:500]
        figures = self._writer.figures()
        for (model, _version), n in figures.get("open", {}).items():  # in unfinished files
            self._refused[(model, "write_error")] += n
        for batch in batches:
            self._refused[(batch.key[0], "write_error")] += batch.requests
        retired = dict(self._retired)  # replaced whole: /metrics may be reading it
        for name, value in figures.items():
            if name in ("written", "dropped"):
                retired[name] = retired[name] + collections.Counter(value)
            elif name in ("segments_rolled", "cpu_s", "build_cpu_s"):
                retired[name] = retired.get(name, 0) + value
        self._retired = retired
        self._writer.kill()
        self._writer = self._new_writer()

    def _figures(self) -> dict:
        writer = self._writer
        return writer.figures() if writer is not None else {}

    def _figure(self, name: str):
        """A figure of the writer's (of every writer process this capture started)."""
        return self._figures().get(name, 0) + self._retired.get(name, 0)

    def _counted(self, name: str) -> collections.Counter:
        return collections.Counter(self._figures().get(name, {})) + self._retired[name]

    @property
    def written(self) -> collections.Counter:
        """Rows written, by (model, version)."""
        return self._counted("written")

    @property
    def dropped(self) -> collections.Counter:
        """Requests not captured, by (model, reason): queue_full, stopped, error,
        write_error."""
        return self._refused + self._counted("dropped")

    @property
    def segments_rolled(self) -> int:
        return self._figure("segments_rolled")

    @property
    def writer_cpu_s(self) -> float:
        """CPU time of the writer (building and writing), on its own thread."""
        return self._figure("cpu_s")

    @property
    def build_cpu_s(self) -> float:
        return self._figure("build_cpu_s")

    @property
    def last_error(self) -> str:
        return self._figures().get("last_error") or self._lost_error

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
            "writer": self._writer_name(),
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
            "CPU time of the capture writer (building Arrow tables, writing Parquet).",
        )
        cpu.add_metric([], self.capture.writer_cpu_s)
        build = CounterMetricFamily(
            "onnxflow_capture_build_cpu_seconds",
            "CPU time of the capture writer spent building Arrow tables of captured requests.",
        )
        build.add_metric([], self.capture.build_cpu_s)
        yield from (accepted, written, dropped, queued, cpu, build)

    def describe(self):
        return []

"""The capture's writer: batches of captured requests into Parquet segments.

:class:`SegmentWriter` builds each batch (see :class:`onnxflow.serving.capture._Batch`)
into an Arrow table, appends them every flush as one row group per (model, version, date)
to that key's open segment (:class:`_Segment`, hidden until rolled), writes the id file
beside it, rolls segments past their size or age, and applies the retention.

Where it runs: by default in a process of its own (:class:`WriterProcess`, this module
run as ``python -m onnxflow.serving.capture_writer``), fed by the endpoint's capture over
a pipe. In a thread of the endpoint the writer's Python (building tables, opening files,
Arrow's calls between its GIL-free parts) takes the GIL from the serving thread a hundred
times and more a flush, and requests answered meanwhile wait for it; in a process of its
own it shares no GIL with the endpoint, and a crash of the endpoint does not leave its
segments unfinished: the writer sees the pipe close, writes what it was sent and rolls
every segment. An in-memory filesystem (``memory://``, the unit tests') exists in one
process only: there the writer runs in a thread (:class:`Capture` decides).

The pipe carries ``multiprocessing.connection`` messages. The endpoint sends the writer's
settings first, then, per batch, ``("batch", header, n)`` and ``n`` raw buffers (the
batch's columns, sent without a copy: :meth:`_Batch.parts`); ``("write",)`` writes what
came and ``("stop",)`` writes it and rolls every segment; the writer answers each
(and its start) with its figures (:meth:`SegmentWriter.figures`). The writer ignores
SIGINT and SIGTERM (a terminal's Ctrl-C or a container's stop signal reaches the whole
process group): the endpoint stops it, or the pipe's end does.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import itertools
import json
import logging
import os
import pickle
import secrets
import signal
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from onnxflow.serving.capture import IDS_PREFIX, REQUEST_COLUMNS, SHAPES_KEY, open_filesystem

log = logging.getLogger(__name__)

#: Linux lets a pipe hold this much (the default maximum): a batch crosses in a few writes.
PIPE_BYTES = 1 << 20
#: Under a local capture folder: a lock file per living writer (see SegmentWriter's sweep).
WRITERS = ".writers"
#: A writer's lock is made under ``NAME.lock.new`` and renamed within microseconds; one this
#: old that no one holds was left by a writer killed in between (nothing else of it exists).
STALE_NEW_LOCK_S = 60.0
#: The most buffers one writev takes (Linux's IOV_MAX).
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_F_SETPIPE_SZ = 1031


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


class _Segment:
    """One open Parquet file of a (model, version, date): hidden until rolled."""

    def __init__(
        self, fs, folder: str, schema, shapes: dict, writer: str, number: int, keep_ids: bool
    ) -> None:
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
            self.file or self.hidden,
            schema,
            compression="zstd",
            use_dictionary=False,
            write_statistics=list(REQUEST_COLUMNS),
        )
        self.schema = schema
        self.opened = time.monotonic()
        self.requests = 0  # written
        # the request_id column of each table written (a row each): feedback's lookups
        # until the segment is closed, where the feedback route can ask (None: not kept)
        self.id_columns: list | None = [] if keep_ids else None
        self.sidecars: list[str] = []

    def write(self, table, requests: int) -> None:
        import pyarrow.parquet as pq

        self.writer.write_table(table.replace_schema_metadata(self.schema.metadata))
        self.requests += requests
        if self.id_columns is not None:
            self.id_columns.append(table.column("request_id"))
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

    def rows_of_ids(self, wanted) -> dict[str, int]:
        """Rows written of the requests whose id is in ``wanted`` (an Arrow string array)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not self.id_columns:
            return {}
        column = pa.chunked_array([c for col in self.id_columns for c in col.chunks], pa.string())
        return collections.Counter(column.filter(pc.is_in(column, value_set=wanted)).to_pylist())

    @property
    def bytes(self) -> int:
        return self.file.tell() if self.file is not None else os.path.getsize(self.hidden)

    def roll(self) -> str:
        self.writer.close()
        if self.file is not None:
            self.file.close()
        self.fs.mv(self.hidden, self.final)
        return self.final


class SegmentWriter:
    """Batches into Parquet segments under ``url``, and the figures of it."""

    def __init__(
        self,
        url: str,
        segment_bytes: int,
        segment_s: float,
        retention_days: int,
        keep_ids: bool = True,
    ) -> None:
        """``keep_ids``: keep the ids of the open segments for :meth:`rows_of_ids` (a writer
        in another process is never asked: the feedback route reads its id files)."""
        import pyarrow.compute  # noqa: F401  (imported now, not on the first write)
        import pyarrow.parquet  # noqa: F401

        self.fs, root = open_filesystem(url)
        self.root = root.rstrip("/")
        self.segment_bytes = segment_bytes
        self.segment_s = segment_s
        self.retention_days = retention_days
        self.keep_ids = keep_ids
        self._segments: dict[tuple[str, str, str], _Segment] = {}
        self._numbers = itertools.count()
        # random per writer: replicas sharing a folder or a bucket (the same pid in every
        # container) never pick the same name in the same second
        self._writer_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._last_retention = 0.0
        # a local folder: a lock held while this writer lives, by which the next writer
        # tells its unfinished files from a dead one's (see sweep_dead_writers)
        self._lock_fd: int | None = None
        self._last_sweep = time.monotonic()
        self.written: collections.Counter = collections.Counter()  # rows, by (model, version)
        self.dropped: collections.Counter = collections.Counter()  # (model, "write_error")
        self.segments_rolled = 0
        self.cpu_s = 0.0  # building and writing, on the writer's thread
        self.build_cpu_s = 0.0  # of which building Arrow tables
        self.last_error = ""
        if _is_local(self.fs):
            try:
                self._hold_lock()
                self.sweep_dead_writers()
            except OSError as exc:  # capture goes on; only the sweep is missing
                log.warning("capture: no writer lock under %s (%s): not sweeping", root, exc)

    def write(self, batches: list) -> None:
        """Append ``batches`` (closed: nothing is added to them any more); roll what is due."""
        started = time.thread_time()
        try:
            built = self._build(batches)
            self.build_cpu_s += time.thread_time() - started
            self._write_once(built)
        finally:
            self.cpu_s += time.thread_time() - started

    def close(self) -> None:
        """Roll every open segment (and give up this writer's lock: nothing is left)."""
        for key in list(self._segments):
            self._roll(key)
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path(self._writer_id))
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- what a dead writer left (local folders) ----------------------------------------

    def _lock_path(self, writer_id: str) -> str:
        return f"{self.root}/{WRITERS}/{writer_id}.lock"

    def _hold_lock(self) -> None:
        """Lock a file named after this writer for as long as it lives: the kernel lets go
        of it when the process ends, however it ends. Locked under a temporary name first,
        so that no other writer ever sees it unlocked."""
        import fcntl

        os.makedirs(f"{self.root}/{WRITERS}", exist_ok=True)
        final = self._lock_path(self._writer_id)
        fd = os.open(f"{final}.new", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(f"{final}.new", final)
        self._lock_fd = fd

    def sweep_dead_writers(self) -> int:
        """Remove what writers that died with their segments open left behind (the endpoint
        and its writer killed together: a container's or the OOM killer's SIGKILL): their
        unfinished segments, which no reader can open (no Parquet footer), and their id
        files, so that feedback no longer takes labels for rows that are gone. Logged with
        the number of requests lost; returns it. A writer is dead when its lock is free."""
        import fcntl

        import pyarrow.parquet as pq

        lost = 0
        for lock in self.fs.glob(f"{self.root}/{WRITERS}/*.lock"):
            writer_id = lock.rsplit("/", 1)[1][: -len(".lock")]
            if writer_id == self._writer_id:
                continue
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:  # swept meanwhile, or closed
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # alive
                os.close(fd)
                continue
            try:
                pattern = f"{self.root}/model=*/version=*/date=*/"
                segments = self.fs.glob(f"{pattern}.part-*-{writer_id}-*.inprogress")
                ids = self.fs.glob(f"{pattern}{IDS_PREFIX}part-*-{writer_id}-*")
                requests = set()
                for path in ids:
                    with contextlib.suppress(Exception):  # a file cut short by the kill
                        requests.update(pq.read_table(path, columns=["request_id"])[0].to_pylist())
                if segments or ids:
                    log.warning(
                        "capture: writer %s ended with %d segments unfinished; their %d "
                        "requests are lost (removing the files, and their ids: no feedback "
                        "is taken for them)",
                        writer_id,
                        len(segments),
                        len(requests),
                    )
                    self.fs.rm([*segments, *ids])
                lost += len(requests)
                os.unlink(lock)
            finally:
                os.close(fd)
        for stale in self.fs.glob(f"{self.root}/{WRITERS}/*.lock.new"):
            with contextlib.suppress(OSError):  # gone meanwhile, or held (BlockingIOError)
                if time.time() - os.stat(stale).st_mtime < STALE_NEW_LOCK_S:
                    continue  # a writer starting now
                fd = os.open(stale, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(stale)
                finally:
                    os.close(fd)
        return lost

    def rows_of_ids(self, model: str, wanted) -> dict[str, int]:
        """Rows of the requests of ``wanted`` (an Arrow string array) in ``model``'s open
        segments."""
        found: dict[str, int] = {}
        for key, segment in list(self._segments.items()):
            if key[0] == model:
                found.update(segment.rows_of_ids(wanted))
        return found

    def figures(self) -> dict:
        """Rows written and requests dropped by (model, version) and (model, reason),
        requests in open segments by (model, version), segments rolled, CPU seconds."""
        open_requests: collections.Counter = collections.Counter()
        for key, segment in list(self._segments.items()):
            open_requests[key[:2]] += segment.requests
        return {
            "written": dict(self.written),
            "open": dict(open_requests),
            "dropped": dict(self.dropped),
            "segments_rolled": self.segments_rolled,
            "cpu_s": self.cpu_s,
            "build_cpu_s": self.build_cpu_s,
            "last_error": self.last_error,
        }

    def _build(self, batches: list) -> list[tuple]:
        """``batches`` as Arrow tables, (key, table, shapes, requests) each."""
        built = []
        for batch in batches:
            try:
                for day, table, shapes, requests in batch.tables(batch.counts()):
                    built.append(((*batch.key, day), table, shapes, requests))
            except Exception as exc:  # noqa: BLE001  (counted, logged)
                self._failed(batch.key, batch.requests, exc)
        return built

    def _write_once(self, built: list[tuple]) -> None:
        import pyarrow as pa

        waiting: dict[tuple[str, str, str], list[tuple]] = {}
        for key, table, shapes, requests in built:
            waiting.setdefault(key, []).append((table, shapes, requests))
        for key, items in waiting.items():  # one row group per version and flush
            first = items[0][0].schema
            alike = [item for item in items if item[0].schema.equals(first)]
            tables = [item[0] for item in alike]
            table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
            self._write_table(key, table, items[0][1], sum(item[2] for item in alike))
            for table, shapes, requests in items:
                if not table.schema.equals(first):  # another shape or type: a new segment
                    self._write_table(key, table, shapes, requests)
        now = time.monotonic()
        for key, segment in list(self._segments.items()):
            if segment.bytes >= self.segment_bytes or now - segment.opened >= self.segment_s:
                self._roll(key)
        if self.retention_days > 0 and now - self._last_retention > 3600:
            self._last_retention = now
            self._apply_retention()
        # hourly after the one at start: another replica's writer may have died since
        if self._lock_fd is not None and now - self._last_sweep > 3600:
            self._last_sweep = now
            try:
                self.sweep_dead_writers()
            except OSError:
                log.exception("capture: sweeping what dead writers left failed")

    def _write_table(self, key: tuple[str, str, str], table, shapes: dict, requests: int) -> None:
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
                    self.fs,
                    folder,
                    table.schema,
                    shapes,
                    self._writer_id,
                    next(self._numbers),
                    self.keep_ids,
                )
                self._segments[key] = segment
            segment.write(table, requests)
            self.written[key[:2]] += table.num_rows
        except Exception as exc:  # noqa: BLE001  (counted, logged; the writer carries on)
            self._failed(key, requests, exc)
            segment = self._segments.pop(key, None)
            if segment is not None:  # an unfinished file: what it held is lost too
                self._failed(key, segment.requests, exc)
                self._forget_sidecars(segment)

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


def send_all(fd: int, messages: list) -> None:
    """Write ``messages`` (bytes-like) to ``fd`` framed as ``Connection.send_bytes`` frames
    each (its length as 4 bytes, big-endian; from 2 GiB on, -1 and 8 bytes), in one
    ``writev`` where the pipe takes it. One message at a time, each write gave the GIL back
    and took it again: a hundred hand-overs a flush, at each of which the serving thread
    waited for the sender (the slowest of its requests gathered around the flushes)."""
    views = []
    for message in messages:
        view = memoryview(message).cast("B")
        size = view.nbytes
        length = struct.pack("!iQ", -1, size) if size > 0x7FFFFFFF else struct.pack("!i", size)
        views += [memoryview(length), view] if size else [memoryview(length)]
    start = 0
    while start < len(views):
        written = os.writev(fd, views[start : start + IOV_MAX])  # the rest, or part of it
        while start < len(views) and written >= len(views[start]):
            written -= len(views[start])
            start += 1
        if written:  # a view written in part: its rest goes first next time
            views[start] = views[start][written:]


class WriterGone(RuntimeError):
    """The writer process ended, or its pipe broke."""


class WriterProcess:
    """A :class:`SegmentWriter` in a process of its own: the endpoint's side of the pipe.

    Used from one thread (the capture's sender): :meth:`write` sends the batches and waits
    for the writer's figures, without the GIL while it waits."""

    def __init__(self, settings: dict, start_timeout_s: float = 120.0, nice: int = 0) -> None:
        batches_r, batches_w = os.pipe()  # endpoint -> writer
        answers_r, answers_w = os.pipe()  # writer -> endpoint
        for fd in (batches_w, answers_w):
            try:  # fewer, larger writes per batch; a smaller pipe only costs more of them
                import fcntl

                fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
            except (OSError, ImportError):
                pass
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(batches_r), str(answers_w), str(nice)],
                pass_fds=(batches_r, answers_w),
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            os.close(batches_w)
            os.close(answers_r)
            raise
        finally:  # the writer's ends
            os.close(batches_r)
            os.close(answers_w)
        self._out = Connection(batches_w, readable=False)
        self._in = Connection(answers_r, writable=False)
        self._figures: dict = {}
        try:
            self._out.send_bytes(pickle.dumps(settings))
            if not self._in.poll(start_timeout_s):
                raise WriterGone(f"the capture writer did not start in {start_timeout_s:.0f} s")
            self._figures = self._receive()
        except BaseException:
            self.kill()
            raise

    def write(self, batches: list) -> None:
        """Send ``batches`` and have them written (blocks until they are)."""
        messages = []
        for batch in batches:
            header, buffers = batch.parts()
            messages += [pickle.dumps(("batch", header, len(buffers))), *buffers]
        messages.append(pickle.dumps(("write",)))
        try:
            send_all(self._out.fileno(), messages)
        except OSError as exc:
            raise WriterGone(f"the capture writer's pipe broke: {exc}") from None
        self._figures = self._receive()

    def close(self, timeout_s: float = 60.0) -> None:
        """Have every segment rolled, and the writer end."""
        try:
            self._out.send_bytes(pickle.dumps(("stop",)))
            if self._in.poll(timeout_s):
                self._figures = self._receive()
            else:
                log.error("the capture writer did not finish in %.0f s", timeout_s)
        except (OSError, WriterGone) as exc:
            log.error("the capture writer ended before it was stopped: %s", exc)
        finally:
            self._out.close()
            self._in.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._out.close()
        self._in.close()

    def figures(self) -> dict:
        """The writer's figures, as of its last answer (see :meth:`SegmentWriter.figures`)."""
        return self._figures

    def rows_of_ids(self, model: str, wanted) -> dict[str, int]:
        """Nothing: what the writer holds is in its id files, which the feedback route reads."""
        return {}

    def _receive(self) -> dict:
        try:
            return pickle.loads(self._in.recv_bytes())
        except (EOFError, OSError) as exc:
            code = self.process.poll()
            raise WriterGone(
                f"the capture writer ended (exit status {code}): {type(exc).__name__} {exc}"
            ) from None


def serve_pipe(inbox: Connection, outbox: Connection) -> None:
    """The writer process: take batches from ``inbox`` until told to stop or the endpoint
    is gone, and answer on ``outbox``."""
    from onnxflow.serving.capture import _Batch

    writer = SegmentWriter(**pickle.loads(inbox.recv_bytes()), keep_ids=False)
    outbox.send_bytes(pickle.dumps(writer.figures()))
    pending: list = []
    try:
        while True:
            message = pickle.loads(inbox.recv_bytes())
            if message[0] == "batch":
                buffers = [inbox.recv_bytes() for _ in range(message[2])]
                pending.append(_Batch.from_parts(message[1], buffers))
                continue
            writer.write(pending)
            pending = []
            if message[0] == "stop":
                writer.close()
                outbox.send_bytes(pickle.dumps(writer.figures()))
                return
            outbox.send_bytes(pickle.dumps(writer.figures()))
    except EOFError:  # the endpoint is gone: keep what it sent
        log.warning(
            "the endpoint closed the capture's pipe: writing %d batches it sent, "
            "closing every segment",
            len(pending),
        )
        writer.write(pending)
        writer.close()


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the endpoint stops it, or the pipe's end
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get("ONNXFLOW_SERVE_LOG_LEVEL", "info").upper(),
        format="%(asctime)s %(levelname)s capture-writer: %(message)s",
    )
    read_fd, write_fd, nice = (int(a) for a in (argv or sys.argv[1:]))
    # Every append is a burst of work (about 1 us of CPU per request it holds): at a
    # lower priority the scheduler hands the CPU back to the serving thread and the
    # clients the moment they wake, instead of letting the burst run on (p99 on 2 cores).
    os.nice(nice)
    serve_pipe(Connection(read_fd, writable=False), Connection(write_fd, readable=False))


if __name__ == "__main__":
    main()

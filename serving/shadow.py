"""The challenger in shadow: live requests mirrored to a second version, off the request path.

With ``--shadow ALIAS`` (``challenger``) every served model also follows ``NAME@ALIAS``
with a :class:`~onnxflow.serving.manager.ModelManager` of its own. Once the served version
has answered a request, :meth:`Shadow.offer` writes the feeds and the answer to the shadow's
worker process without waiting for anything: when more than ``shadow_queue_bytes`` wait
unsent, the request is dropped and counted (only ``shadow_fraction`` of requests are
offered). The worker runs the shadow version on its own onnxruntime session (one thread,
niced) and compares its outputs with the served ones (:mod:`onnxflow.serving.comparison`),
per pair of versions (served, shadow), so when either alias moves the shadow follows the
new pair. The served answer is never delayed, changed or failed by the shadow.

Why a process and not a thread: a thread beside the event loop shares its GIL, and on a
busy machine every hand-over of the GIL to the shadow thread stalls the loop (measured on
2 cores: 0.83x the champion's requests/s and 1.4x its p99 with a thread that did nothing
but take requests off its queue). The worker has its own interpreter, yields the CPU to
the endpoint, and a challenger that crashes onnxruntime takes down only the worker.

The worker pushes its figures every half second; they are in ``/metrics`` and, every
flush interval and on ``POST /admin/shadow/flush``, written onto the shadow version in the
registry (``shadow_*`` tags, ``shadow/report.md`` in its run) through the registry layer
(the endpoint never imports MLflow). The worker is :mod:`onnxflow.serving.shadow_worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from onnxflow.serving.comparison import PairReport, PairStats, markdown_report
from onnxflow.serving.manager import ModelManager
from onnxflow.serving.metrics import ServingMetrics
from onnxflow.serving.model import LoadedModel, ModelRefused
from onnxflow.serving.registry_reader import Annotation, Registry, registry_for
from onnxflow.serving.settings import ServingSettings
from onnxflow.serving.shadow_worker import MODULE, frame, pack_arrays, unframe

log = logging.getLogger(__name__)

REPORT_PATH = "shadow/report.md"
LOAD_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RemoteModel:
    """A shadow version loaded (and verified) in the worker process."""

    name: str
    version: str
    digest: str
    output_names: tuple[str, ...]
    folder: Path


# --- the endpoint's side ---------------------------------------------------------------


class _Channel(asyncio.Protocol):
    """The endpoint's end of the socket to the worker: replies and figures come back."""

    def __init__(self, shadow: Shadow) -> None:
        self.shadow = shadow
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        messages, used = unframe(self.buffer)
        del self.buffer[:used]
        for message in messages:
            self.shadow.received(message)

    def connection_lost(self, exc) -> None:
        self.shadow.worker_lost()


class Shadow:
    """The shadow of every served model: its managers, the worker process, the figures."""

    def __init__(self, settings: ServingSettings, metrics: ServingMetrics) -> None:
        self.alias = settings.shadow
        self.fraction = settings.shadow_fraction
        self.queue_bytes = settings.shadow_queue_bytes
        self.flush_interval_s = settings.shadow_flush_interval_s
        # The shadow never takes more than one thread, and never batches.
        self.settings = settings.model_copy(
            update={"intra_op_threads": 1, "max_batch_size": 0, "token": None}
        )
        self.metrics = metrics
        self.managers: dict[str, ModelManager] = {}
        self.latest: dict[tuple[str, str, str], PairReport] = {}  # pushed by the worker
        self.dropped: dict[tuple[str, str, str], int] = {}
        self._random = random.Random()
        self._written: dict[tuple[str, str, str], tuple] = {}
        self._tasks: list[asyncio.Task] = []
        self._process: subprocess.Popen | None = None
        self._channel: _Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._outgoing: list[bytes] = []  # mirrored requests of this turn of the loop
        self._outgoing_bytes = 0
        self._ids = itertools.count()
        self._flush_lock = asyncio.Lock()
        self._registry: Registry | None = None
        self._stopping = False
        self._started_at = 0.0
        self._backoff = 0.5
        self.restarts = 0
        metrics.watch_shadow(self.reports)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker process and the periodic flush."""
        self._loop = asyncio.get_running_loop()
        await self._start_worker()
        if self.flush_interval_s > 0:
            self._tasks.append(self._loop.create_task(self._flush_every(), name="shadow-flush"))

    async def _start_worker(self) -> None:
        """The worker process, connected by a socket pair."""
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", MODULE, str(theirs.fileno()), self.settings.log_level],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        _, self._channel = await self._loop.create_connection(lambda: _Channel(self), sock=ours)
        self._started_at = time.monotonic()
        log.info("shadow worker pid %s follows %r of every model", self._process.pid, self.alias)

    def follow(self, served: ModelManager) -> None:
        """Start following ``NAME@ALIAS`` beside the served model (once per model)."""
        if served.name in self.managers:
            return
        manager = ModelManager(
            self.settings,
            self.metrics,
            f"{served.name}@{self.alias}",
            shadow_of=served,
            loader=self._load_in_worker,
        )
        self.managers[served.name] = manager
        self._tasks.append(
            asyncio.get_running_loop().create_task(manager.watch(), name=f"shadow-{served.name}")
        )

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()  # the worker reads the end and exits
        if self._process is not None:
            try:
                await asyncio.to_thread(self._process.wait, 5)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def worker_lost(self) -> None:
        """The worker exited (a challenger that crashed onnxruntime, a kill): start another,
        which loads the shadow versions again; each pair's figures start afresh in it."""
        self._channel = None
        for future in self._replies.values():
            if not future.done():
                future.set_exception(ConnectionError("the shadow worker went away"))
        if self._stopping:
            return
        for manager in self.managers.values():
            manager.current = None  # nothing is mirrored until the new worker loaded it
        # a worker that keeps dying waits longer each time (up to a minute) to start again
        lived = time.monotonic() - self._started_at
        self.restarts += 1
        self._backoff = 1.0 if lived > 60 else min(60.0, self._backoff * 2)
        log.error(
            "the shadow worker (pid %s) went away after %.0f s; another starts in %.0f s",
            self._process.pid if self._process else None,
            lived,
            self._backoff,
        )
        self._tasks.append(self._loop.create_task(self._restart_worker(self._backoff)))

    async def _restart_worker(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._process is not None:
            await asyncio.to_thread(self._process.wait)  # reap the one that went away
        await self._start_worker()
        for manager in self.managers.values():  # load the shadow versions now, not at the
            self._tasks.append(self._loop.create_task(manager.check()))  # next poll

    # --- the request path: never waits, never raises ------------------------------------

    def offer(self, model: LoadedModel, feeds: dict, served: list, served_s: float | None) -> None:
        """Mirror one answered request to the shadow version, if there is one to compare.
        ``served_s``: the served run as :func:`~onnxflow.serving.comparison.timed_run`
        timed it (None: merged by the batcher)."""
        try:
            manager = self.managers.get(model.name)
            shadow = manager.current if manager is not None else None
            if shadow is None or shadow.version == model.version:
                return
            if self.fraction < 1.0 and self._random.random() >= self.fraction:
                return
            key = (model.name, model.version, shadow.version)
            transport = self._channel.transport if self._channel is not None else None
            if transport is None or (
                transport.get_write_buffer_size() + self._outgoing_bytes > self.queue_bytes
            ):
                self.dropped[key] = self.dropped.get(key, 0) + 1
                return
            message = (
                "mirror",
                key,
                model.output_names,
                list(feeds),
                pack_arrays(feeds.values()),
                pack_arrays(served),
                served_s,
            )
            data = frame(message)
            if not self._outgoing:  # one write per turn of the loop, however many requests
                self._loop.call_soon(self._write_outgoing)
            self._outgoing.append(data)
            self._outgoing_bytes += len(data)
        except Exception:  # noqa: BLE001  (the served answer must not notice the shadow)
            log.exception("mirroring a request to the shadow failed")

    def _write_outgoing(self) -> None:
        outgoing, self._outgoing, self._outgoing_bytes = self._outgoing, [], 0
        transport = self._channel.transport if self._channel is not None else None
        if transport is not None and not transport.is_closing():
            transport.write(b"".join(outgoing))

    # --- talking to the worker --------------------------------------------------------

    async def _ask(self, kind: str, payload) -> object:
        if self._channel is None or self._channel.transport is None:
            raise ConnectionError("the shadow worker is not running")
        number = next(self._ids)
        future = self._loop.create_future()
        self._replies[number] = future
        try:
            self._channel.transport.write(frame((kind, number, payload)))
            return await future
        finally:
            self._replies.pop(number, None)

    def received(self, message) -> None:
        kind = message[0]
        if kind == "reports":
            for report in message[1]:
                self.latest[(report.model, report.served, report.shadow)] = report
        elif kind == "reply":
            future = self._replies.get(message[1])
            if future is not None and not future.done():
                future.set_result(message[2])

    def _load_in_worker(self, folder: Path, *, name, version, tags, settings) -> RemoteModel:
        """The shadow managers' loader (run in a thread): load and verify in the worker."""
        request = {
            "folder": str(folder),
            "name": name,
            "version": version,
            "tags": tags,
            "settings": settings,
        }
        try:
            answer = asyncio.run_coroutine_threadsafe(
                self._ask("load", request), self._loop
            ).result(LOAD_TIMEOUT_S)
        except TimeoutError:
            raise ModelRefused(
                f"{name} version {version}: the shadow worker did not load it in "
                f"{LOAD_TIMEOUT_S:.0f} s"
            ) from None
        if "refused" in answer:
            raise ModelRefused(answer["refused"])
        return RemoteModel(name, version, answer["digest"], tuple(answer["outputs"]), folder)

    # --- figures and the registry -----------------------------------------------------

    def reports(self) -> list[PairReport]:
        """Every pair's latest figures from the worker, with the drops counted here."""
        reports = []
        for key in {**self.latest, **self.dropped}:
            base = self.latest.get(key) or PairStats(*key).report()
            reports.append(dataclasses.replace(base, dropped=self.dropped.get(key, 0)))
        return reports

    def status(self) -> dict:
        transport = self._channel.transport if self._channel is not None else None
        return {
            "alias": self.alias,
            "fraction": self.fraction,
            "worker_pid": self._process.pid if self._process else None,
            "worker_running": transport is not None,
            "worker_restarts": self.restarts,
            "queued_bytes": transport.get_write_buffer_size() if transport else 0,
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
            try:  # the worker's figures as of now, not of its last push
                self.received(("reports", await asyncio.wait_for(self._ask("report", None), 30)))
            except (ConnectionError, TimeoutError) as exc:
                log.warning("shadow flush with the last figures pushed: %s", exc)
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
            self._registry = registry_for(self.settings.tracking_uri, self.settings.registry_access)
        return self._registry

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001  (the flusher must outlive any single failure)
                log.exception("shadow flush failed")

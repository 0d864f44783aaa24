"""The shadow's worker process: runs the shadow versions on mirrored requests, compares.

``python -m onnxflow.serving.shadow_worker FD LOG_LEVEL``, started by
:class:`onnxflow.serving.shadow.Shadow`, which holds the other end of the socket ``FD``.
Messages both ways are frames (a length, then a pickle): the endpoint sends ``load``
(a version's folder to verify and open with :func:`~onnxflow.serving.model.load_model`),
``mirror`` (one answered request: its feeds and the served outputs as (dtype, shape,
bytes)) and ``report``; the worker answers ``load`` and ``report``, and pushes each
changed pair's :class:`~onnxflow.serving.comparison.PairReport` every half second. It
runs niced, reads in batches (one wake-up per batch, not per request) and ends when the
endpoint closes the socket; signals to the endpoint's process group are the endpoint's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np

from onnxflow.serving.comparison import PairStats, compare, timed_run
from onnxflow.serving.model import LoadedModel, ModelRefused

log = logging.getLogger(__name__)

MODULE = "onnxflow.serving.shadow_worker"
FRAME = struct.Struct("!I")  # each message: its length, then its pickle
PUSH_INTERVAL_S = 0.5
#: The worker reads what arrived, then sleeps this long: one wake-up per batch of mirrored
#: requests, not one per request (every wake-up costs the endpoint a context switch).
READ_PAUSE_S = 0.01
NICENESS = 10


def frame(message) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return FRAME.pack(len(data)) + data


def unframe(buffer: bytearray) -> tuple[list, int]:
    """The complete messages at the start of ``buffer``, and how many bytes they took."""
    messages, pos = [], 0
    while len(buffer) - pos >= FRAME.size:
        (size,) = FRAME.unpack_from(buffer, pos)
        if len(buffer) - pos - FRAME.size < size:
            break
        start = pos + FRAME.size
        messages.append(pickle.loads(buffer[start : start + size]))
        pos = start + size
    return messages, pos


def pack_arrays(arrays) -> list:
    """Arrays as (dtype, shape, bytes): several times cheaper to pickle than the arrays
    themselves, which matters on the request path. Object arrays (strings) stay arrays."""
    return [a if a.dtype.kind == "O" else (a.dtype.str, a.shape, a.tobytes()) for a in arrays]


def unpack_arrays(packed: list) -> list:
    return [
        p if isinstance(p, np.ndarray) else np.frombuffer(p[2], p[0]).reshape(p[1]) for p in packed
    ]


class Worker:
    """Runs the shadow versions on the mirrored requests and keeps each pair's figures."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.models: dict[tuple[str, str], LoadedModel] = {}  # (name, version)
        self.newest: dict[str, str] = {}  # name -> the version loaded last
        self.pairs: dict[tuple[str, str, str], PairStats] = {}
        self.changed: set[tuple[str, str, str]] = set()

    def run(self) -> None:
        buffer = bytearray()
        next_push = time.monotonic() + PUSH_INTERVAL_S
        while True:
            wait = max(0.0, next_push - time.monotonic())
            if select.select([self.sock], [], [], wait)[0]:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return  # the endpoint closed its end: stopping
                buffer += chunk
                messages, used = unframe(buffer)
                del buffer[:used]
                for message in messages:
                    self.handle(message)
                time.sleep(READ_PAUSE_S)
            if time.monotonic() >= next_push:
                self.push()
                next_push = time.monotonic() + PUSH_INTERVAL_S

    def send(self, message) -> None:
        self.sock.sendall(frame(message))

    def handle(self, message) -> None:
        kind = message[0]
        if kind == "mirror":
            self.mirror(*message[1:])
        elif kind == "load":
            self.send(("reply", message[1], self.load(**message[2])))
        elif kind == "report":
            self.send(("reply", message[1], [pair.report() for pair in self.pairs.values()]))
            self.changed.clear()

    def push(self) -> None:
        if self.changed:
            self.send(("reports", [self.pairs[key].report() for key in self.changed]))
            self.changed.clear()

    def load(self, folder: str, name: str, version: str, tags: dict, settings) -> dict:
        from onnxflow.serving.model import load_model

        try:
            model = load_model(
                Path(folder), name=name, version=version, tags=tags, settings=settings
            )
        except ModelRefused as exc:
            return {"refused": str(exc)}
        # keep this version and the one before (requests to it may still be queued)
        keep = {version, self.newest.get(name)}
        for key in [k for k in self.models if k[0] == name and k[1] not in keep]:
            del self.models[key]
        self.models[(name, version)] = model
        self.newest[name] = version
        return {"digest": model.digest, "outputs": model.output_names}

    def mirror(self, key, names, inputs, feeds, served, served_s: float | None) -> None:
        feeds = dict(zip(inputs, unpack_arrays(feeds)))
        served = unpack_arrays(served)
        pair = self.pairs.get(key)
        if pair is None:
            pair = self.pairs[key] = PairStats(*key)
        self.changed.add(key)
        model = self.models.get((key[0], key[2]))
        if model is None:
            pair.failed(f"version {key[2]} is not loaded in the shadow worker", 0.0, served_s)
            return
        start = time.perf_counter()
        try:
            outputs, took = timed_run(model.run, feeds)  # as the endpoint timed the served run
        except Exception as exc:  # noqa: BLE001  (counted against the pair)
            pair.failed(f"run: {type(exc).__name__}: {exc}", time.perf_counter() - start, served_s)
            return
        try:
            result = compare(names, served, dict(zip(model.output_names, outputs)))
        except Exception as exc:  # noqa: BLE001
            pair.failed(f"compare: {exc}", took, served_s)
            return
        pair.record(result, took, served_s)


def main(argv: list[str] | None = None) -> None:
    """The worker: ``python -m onnxflow.serving.shadow FD LOG_LEVEL`` (the endpoint starts it)."""
    from onnxflow.serving import block_heavy_imports

    block_heavy_imports()
    fd, level = (sys.argv[1:] if argv is None else argv)[:2]
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s[worker]: %(message)s"
    )
    with contextlib.suppress(OSError):  # the endpoint's requests come first
        os.nice(NICENESS)
    # Signals to the endpoint's process group (Ctrl-C, a stop) are the endpoint's to act
    # on: it closes the socket as it stops, and the worker ends when it reads that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with socket.socket(fileno=int(fd)) as sock:
        Worker(sock).run()


if __name__ == "__main__":
    main()

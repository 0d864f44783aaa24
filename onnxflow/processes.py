"""Managed background processes: start detached, record, wait for health, stop the tree.

The one process supervisor of the project: the stack (``onnxflow.stack.manager``) and the
endpoint launcher (``onnxflow.serving.launcher``) both start and stop their servers here.
It imports nothing heavy (the endpoint process may import it).

Each process starts as the leader of its own session, so its process group is the set
of processes it started. Some servers start helpers in sessions of their own (Prefect's
worker runs every flow run that way), so stopping snapshots the whole tree of
descendants first, signals every process group in it, and kills whatever outlives the
grace period. A record keeps the process's start time, so a recycled pid is never
mistaken for ours.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onnxflow.errors import OnnxflowError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessRecord:
    """One process the stack started, as written in the state file."""

    name: str
    pid: int
    start_ticks: int
    argv: list[str]
    log_path: str
    url: str | None = None
    started_at: float = field(default_factory=time.time)


def python_module(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter, so the child has the same packages."""
    return [sys.executable, "-m", module, *args]


def listen_options(host: str, port: int) -> list[str]:
    """``--host HOST --port PORT``: how MLflow's and Prefect's servers are told where to bind."""
    return ["--host", host, "--port", str(port)]


def start_process(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    url: str | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = False,
) -> ProcessRecord:
    """Start ``argv`` detached (own session), stdout and stderr appended to ``log_path``.

    ``die_with_parent``: the kernel sends the process SIGTERM when this process ends,
    however it ends (SIGKILL included); for helpers that must not outlive a command.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log_file.flush()
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_signal() if die_with_parent else None,  # noqa: PLW1509 - one prctl call
        )
    record = ProcessRecord(
        name=name,
        pid=proc.pid,
        start_ticks=_start_ticks(proc.pid) or 0,
        argv=list(argv),
        log_path=str(log_path),
        url=url,
    )
    log.info("started %s (pid %s): %s", name, proc.pid, " ".join(argv))
    return record


def _parent_death_signal() -> Callable[[], None]:
    """A function that asks the kernel for SIGTERM when the caller's parent ends (Linux
    ``prctl(PR_SET_PDEATHSIG)``; elsewhere it does nothing). Resolved before any fork."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (and SIGHUP) act like Ctrl-C in this process: a KeyboardInterrupt
    unwinds it, so every ``finally`` and fixture teardown stops what it started. A second
    signal kills at once."""

    def interrupt(signum: int, _frame) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, interrupt)


def stop_with_make() -> None:
    """SIGTERM this process when its parent, if it is ``make``, ends.

    ``make`` killed by SIGTERM does not pass the signal on to what its recipe runs (only
    a signal to the whole process group reaches it); without this a killed ``make test``
    leaves pytest, and every server it started, running. Only for a ``make`` parent: a
    command started from a shell with ``nohup`` must outlive the shell.
    """
    try:
        parent = Path(f"/proc/{os.getppid()}/comm").read_text().strip()
    except OSError:
        return
    if parent in ("make", "gmake"):
        _parent_death_signal()()


def is_running(record: ProcessRecord) -> bool:
    """True while the recorded process (not a later one with the same pid) is alive."""
    return is_alive(record.pid, record.start_ticks)


def process_tree(pid: int) -> list[tuple[int, int]]:
    """``(pid, start_ticks)`` of ``pid`` and all its descendants, parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        ticks = _start_ticks(current)
        if ticks is not None:
            tree.append((current, ticks))
            todo.extend(children.get(current, []))
    return tree


def stop_process(record: ProcessRecord, timeout_s: float = 20.0) -> bool:
    """SIGTERM the process and every descendant's group; SIGKILL what outlives ``timeout_s``.

    Returns False if the process was no longer running.
    """
    if not is_running(record):
        return False
    tree = [(pid, ticks) for pid, ticks in process_tree(record.pid)]
    if tree and tree[0] != (record.pid, record.start_ticks):
        return False
    groups = {pgid for pid, _ in tree if (pgid := _pgid(pid)) is not None}
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    for pid, _ in tree:  # those in our own group, which is never signalled as a whole
        if _pgid(pid) == os.getpgrp() and pid != os.getpid():
            _signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(is_alive(p, t) for p, t in tree):
        _reap(record.pid)
        time.sleep(0.1)
    _reap(record.pid)  # it may have exited during the last sleep: no zombie left behind
    leftovers = [(p, t) for p, t in tree if is_alive(p, t)]
    for pid, _ in leftovers:
        log.warning(
            "%s: pid %s outlived SIGTERM by %.0f s; killing it", record.name, pid, timeout_s
        )
        _signal_pid(pid, signal.SIGKILL)
    for _ in range(50):
        _reap(record.pid)
        if not any(is_alive(p, t) for p, t in leftovers):
            break
        time.sleep(0.1)
    log.info("stopped %s (pid %s, %d process(es))", record.name, record.pid, len(tree))
    return True


def wait_until(
    record: ProcessRecord,
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    error: type[Exception] = OnnxflowError,
    interval_s: float = 0.25,
) -> float:
    """Seconds until ``check()`` is true; raises ``error`` with the log's tail if the
    process dies or the time runs out."""
    start = time.monotonic()
    while True:
        if not is_running(record):
            raise error(
                f"{record.name} exited before it was {what}; "
                f"last lines of {record.log_path}:\n{log_tail(record.log_path)}"
            )
        try:
            if check():
                return time.monotonic() - start
        except Exception as exc:  # the server is still starting: connection refused etc.
            log.debug("%s not %s yet: %s", record.name, what, exc)
        if time.monotonic() - start > timeout_s:
            raise error(
                f"{record.name} not {what} after {timeout_s:.0f} s; last lines "
                f"of {record.log_path}:\n{log_tail(record.log_path)}"
            )
        time.sleep(interval_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """True if a server could bind ``host:port`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> int | None:
    stat = _stat(pid)
    return int(stat[19]) if stat is not None else None  # field 22: starttime


def _pgid(pid: int) -> int | None:
    stat = _stat(pid)
    return int(stat[2]) if stat is not None else None


def is_alive(pid: int, start_ticks: int) -> bool:
    """True while the process started at ``start_ticks`` with this pid runs."""
    stat = _stat(pid)
    if stat is None or stat[0] in ("Z", "X"):  # gone, or exited and waiting to be reaped
        return False
    return int(stat[19]) == start_ticks


def _signal_group(pgid: int, sig: int) -> None:
    if pgid in (0, 1, os.getpgrp()):  # never our own group (tests start stacks in-process)
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    """Collect the exit status of a child of this process, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass

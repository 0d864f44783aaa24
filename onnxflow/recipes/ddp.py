"""A recipe's torch training as data-parallel processes, launched the way PyTorch launches
them (``train.workers``, ``train.nodes``, ``train.rdzv``).

    train step ─► launcher: torchrun's own parser and elastic agent (torch.distributed.run)
                   ├─► worker rank 0 ─► train_recipe in DDP ─► model.pt2 + trained.json
                   └─► worker rank 1 ...   (python -m onnxflow.recipes.ddp worker JOB)

:func:`train_recipe_ddp` is the step: it writes the job (recipe, dataset, train config)
for the workers, starts the launcher under the project's supervisor
(:mod:`onnxflow.processes`: its own session, dies with the flow, its whole tree stopped on
the way out), relays rank 0's epochs to ``on_epoch`` as they come, and returns the model
rank 0 saved, as :func:`onnxflow.recipes.steps.train_recipe` does in one process; export,
validation and registration then run once, in the flow.

A worker that dies (a crash, SIGKILL, the OOM killer) makes torchrun's agent stop the
others (``--max-restarts 0``); the launcher writes who failed (rank, exit code or signal,
the worker's own error) and :func:`failure_line` says it in one line.

Several machines: every machine runs the same torchrun command (logged by the step) with
the job on a folder they share; the c10d rendezvous at ``train.rdzv`` groups them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from onnxflow.arrays import ArrayDataset
from onnxflow.config import TrainConfig
from onnxflow.errors import TrainingError
from onnxflow.results import StepResult, TrainedModel

log = logging.getLogger(__name__)

#: The module torchrun starts in each worker (``worker JOB``) and the launcher (``launch``).
MODULE = "onnxflow.recipes.ddp"
#: The rendezvous of one machine when the config names none: c10d picks a free port.
LOCAL_RENDEZVOUS = "localhost:0"
_POLL_S = 0.2

EpochCallback = Callable[[int, dict[str, float]], None]


class DdpJob(StepResult):
    """What every worker trains: the job file the launcher hands them."""

    recipe: str
    dataset: ArrayDataset
    config: TrainConfig
    out_dir: Path

    @property
    def folder(self) -> Path:
        return self.out_dir / "ddp"

    @property
    def epochs(self) -> Path:
        return self.folder / "epochs.jsonl"

    @property
    def trained(self) -> Path:
        return self.folder / "trained.json"

    @property
    def failures(self) -> Path:
        return self.folder / "failures.json"

    @property
    def join(self) -> Path:
        """The command every other machine runs to join (``train.nodes`` > 1)."""
        return self.folder / "join.sh"


def torchrun_args(config: TrainConfig, job_file: Path, run_id: str) -> list[str]:
    """``torch.distributed.run``'s arguments for ``config``: N workers per machine, a c10d
    rendezvous, no restarts (a worker that dies ends the run), each worker running
    ``python -m onnxflow.recipes.ddp worker JOB``."""
    return [
        f"--nnodes={config.nodes}",
        f"--nproc-per-node={config.workers}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={config.rdzv or LOCAL_RENDEZVOUS}",
        f"--rdzv-id={run_id}",
        "--max-restarts=0",
        "-m",
        MODULE,
        "worker",
        str(job_file),
    ]


def torchrun_command(config: TrainConfig, job_file: Path, run_id: str) -> str:
    """The command line every machine runs (the launcher runs the same arguments)."""
    argv = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(config, job_file, run_id)]
    return shlex.join(argv)


def train_recipe_ddp(
    recipe_ref: str,
    dataset: ArrayDataset,
    config: TrainConfig,
    out_dir: Path,
    on_epoch: EpochCallback | None = None,
) -> TrainedModel:
    """The recipe trained by ``config.workers`` processes per machine (DDP); the model rank 0
    saved. TrainingError naming the worker that failed, and no model, otherwise."""
    from onnxflow.processes import start_process, stop_process

    job = DdpJob(recipe=recipe_ref, dataset=dataset, config=config, out_dir=out_dir.resolve())
    job.folder.mkdir(parents=True, exist_ok=True)
    for stale in (job.epochs, job.trained, job.failures, job.join):
        stale.unlink(missing_ok=True)
    job_file = job.folder / "job.json"
    job_file.write_text(job.model_dump_json())
    run_id = uuid.uuid4().hex[:12]
    if config.nodes > 1:
        job.join.write_text(torchrun_command(config, job_file, run_id) + "\n")
        log.info(
            "distributed training: %d machine(s) x %d worker(s); on every other machine run "
            "(also in %s): %s",
            config.nodes,
            config.workers,
            job.join,
            job.join.read_text().strip(),
        )
    log_path = job.folder / "launch.log"
    started = time.perf_counter()
    record = start_process(
        "ddp-train",
        [sys.executable, "-m", MODULE, "launch", str(job.failures)]
        + torchrun_args(config, job_file, run_id),
        env=os.environ,
        log_path=log_path,
        die_with_parent=True,
    )
    relay = _EpochRelay(job.epochs, on_epoch)
    try:
        code = _wait(record.pid, relay)
    finally:
        stop_process(record)  # whatever of its tree is left (an interrupt, an error here)
    seconds = time.perf_counter() - started
    what = f"train.workers {config.workers}" + (
        f" x train.nodes {config.nodes}" if config.nodes > 1 else ""
    )
    if job.failures.exists():
        raise TrainingError(
            f"{what}: {failure_line(json.loads(job.failures.read_text()))}; "
            f"nothing was saved (log: {log_path})"
        )
    if code != 0 or not job.trained.exists():
        raise TrainingError(
            f"{what}: the torchrun launcher ended with {_exit_words(code)} and no trained "
            f"model; last lines of {log_path}: {_tail(log_path)}"
        )
    trained = TrainedModel.model_validate_json(job.trained.read_text())
    log.info("%s trained in %.1f s (launch included)", what, seconds)
    return trained


def _wait(pid: int, relay: _EpochRelay) -> int:
    """The launcher's exit code (negative: killed by that signal), relaying epochs while it
    runs."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        relay.poll()
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(_POLL_S)


class _EpochRelay:
    """Rank 0's epoch lines, passed on to the step's ``on_epoch`` (and the log) as they come."""

    def __init__(self, path: Path, on_epoch: EpochCallback | None) -> None:
        self.path, self.on_epoch, self.offset = path, on_epoch, 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            entry = json.loads(line)
            log.info("%s", entry["line"])
            if self.on_epoch is not None:
                self.on_epoch(entry["epoch"], entry["metrics"])


def failure_line(failures: Mapping[str, object]) -> str:
    """One line from the launcher's ``failures.json``: the workers that failed, the likely
    cause first (a worker killed by a signal, or one with its own error, before the ones
    torchrun stopped afterwards), or the launcher's own error (a rendezvous that timed out)."""
    if "error" in failures:
        return f"the torchrun launcher failed: {failures['error']}"
    workers = sorted(failures["workers"], key=lambda w: (w["timestamp"], w["rank"]))  # type: ignore[arg-type,index]
    waited = [w for w in workers if _timed_out(w)]
    silent = [w for w in workers if not w.get("message") and w not in waited]
    if waited and silent:  # one waited for a peer that never came: the peer is the cause
        ranks = ", ".join(str(w["rank"]) for w in silent)
        return (
            f"{_worker_words(waited[0])}: train.ddp_timeout_s passed while it waited for "
            f"rank {ranks}, which hung or was stopped; torchrun then stopped rank {ranks}"
        )
    causes = [w for w in workers if not _stopped_by_agent(w)] or workers
    stopped = [str(w["rank"]) for w in workers if w not in causes]
    said: dict[tuple[object, object], list[Mapping[str, object]]] = {}
    for w in causes:  # the same error in every worker (a bad recipe) is said once
        said.setdefault((w["exitcode"], w.get("message")), []).append(w)
    line = "; ".join(
        _worker_words(first)
        + (f" (rank {', '.join(str(w['rank']) for w in more)} too)" if more else "")
        for first, *more in said.values()
    )
    if stopped:
        line += f"; torchrun then stopped rank {', '.join(stopped)}"
    return line


def _timed_out(worker: Mapping[str, object]) -> bool:
    return "timed out waiting" in str(worker.get("message", "")).lower()


def _stopped_by_agent(worker: Mapping[str, object]) -> bool:
    return worker["exitcode"] == -signal.SIGTERM


def _worker_words(worker: Mapping[str, object]) -> str:
    where = f"worker rank {worker['rank']} (pid {worker['pid']} on {worker['host']})"
    said = f": {worker['message']}" if worker.get("message") else ""
    return f"{where} {_exit_words(int(worker['exitcode']))}{said}"


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def _tail(path: Path, lines: int = 5) -> str:
    from onnxflow.processes import log_tail

    return " | ".join(line.strip() for line in log_tail(path, lines).splitlines() if line.strip())


# -- the processes: ``python -m onnxflow.recipes.ddp launch|worker ...`` -------------------


def launch(failures_file: Path, torchrun_argv: list[str]) -> int:
    """torchrun (``torch.distributed.run``, its own parser and agent) with ``torchrun_argv``;
    who failed, if anyone, written to ``failures_file``."""
    import socket

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(torchrun.parse_args(torchrun_argv))
    except ChildFailedError as exc:
        workers = [
            {
                "rank": rank,
                "local_rank": f.local_rank,
                "pid": f.pid,
                "host": socket.gethostname(),
                "exitcode": f.exitcode,
                "timestamp": f.timestamp,
                "message": _worker_message(f.message),
            }
            for rank, f in exc.failures.items()
        ]
        failures_file.write_text(json.dumps({"workers": workers}))
        return 1
    except Exception as exc:  # the agent's own failure: a rendezvous timeout, a bad address
        failures_file.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    return 0


def _worker_message(message: object) -> str:
    """The worker's exception as ``@record`` wrote it (nothing for a signal: torch's own
    "Signal 9 (SIGKILL) received by PID" says what the exit code already says)."""
    if isinstance(message, dict):
        message = message.get("message", "")
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", " ".join(str(message).split()))
    return "" if text.startswith(("Signal ", "To enable traceback")) else text[:600]


def work(job_file: Path) -> None:
    """One worker: join the group torchrun set up, train the recipe in DDP; rank 0 reports
    the epochs and saves the model."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_train)(DdpJob.model_validate_json(job_file.read_text()))


def _train(job: DdpJob) -> None:
    import torch.distributed as dist

    from onnxflow import distributed
    from onnxflow.recipes.steps import epoch_line, train_recipe
    from onnxflow.recipes.torch_recipe import resolve_device

    distributed.init_process_group(resolve_device(job.config.device), job.config.ddp_timeout_s)
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s rank {distributed.rank()} %(levelname)s %(name)s: %(message)s",
    )
    if distributed.is_main():
        logging.getLogger("onnxflow").setLevel(logging.INFO)
    try:
        on_epoch = None
        if distributed.is_main():

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                line = epoch_line(job.recipe, epoch, job.config.epochs, metrics)
                entry = {"epoch": epoch, "metrics": metrics, "line": line}
                with open(job.epochs, "a") as f:
                    f.write(json.dumps(entry) + "\n")

        trained = train_recipe(job.recipe, job.dataset, job.config, job.out_dir, on_epoch)
        if trained is not None:
            partial = job.trained.with_suffix(".partial")
            partial.write_text(trained.model_dump_json())
            partial.replace(job.trained)
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "launch":
        return launch(Path(rest[0]), rest[1:])
    if command == "worker":
        work(Path(rest[0]))
        return 0
    raise SystemExit(f"usage: python -m {MODULE} launch FAILURES TORCHRUN_ARGS... | worker JOB")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

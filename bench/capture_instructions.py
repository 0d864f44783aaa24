"""What capture costs in instructions (valgrind's callgrind), over REST and over gRPC.

Requests per second and p99 on a shared 2-core machine move by more between two rounds of
the same endpoint than the few percent capture costs. Instructions executed do not: the
same requests through the same code count the same, whatever else the machine runs
(two runs of one endpoint here differed by 0.04%). So beside the timed rounds,
``capture_bench`` runs each endpoint (off, then on) under callgrind, and for each front
sends it ``--requests`` batch-1 requests at 8 connections with h2load (V2 JSON over
HTTP/1.1, then ``ModelInfer`` over gRPC) after a warm-up, and counts per answered request:

* the **serving thread** (the event loop's: REST's decode, run, encode and the capture's
  offer; gRPC's requests run in gRPC's threads and are offered to the capture here);
* the **endpoint**: every thread of its process (gRPC's, the capture's sender).

Each count waits until the endpoint has handed its last batch to the writer (checked
afterwards: every answered request written, none dropped). These are user-space
instructions: the kernel's part (sockets, the writer's pipe) is not in them, nor is the
capture's writer process. Under callgrind the endpoint runs some fifty times slower, so
each of the writer's appends (every flush interval) would carry a fiftieth of the
requests it carries at full speed, and what each append costs whatever its size would
weigh that much more per request (counted so: about 19,000 instructions a REST request
and 26,000 a gRPC one). ``capture_bench`` reports the writer's CPU at full speed from its
own clock over the whole run, and the endpoint's CPU per request with the kernel's part.

    python bench/capture_instructions.py [--requests 2000]   (prints the figures)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.team_bench import cpu_s  # noqa: E402
from onnxflow.serving.launcher import ENDPOINT_ARGV, _child_env  # noqa: E402
from onnxflow.serving.settings import ServingSettings  # noqa: E402

WARM_UP = 200
MODEL = "capbench"
FRONTS = ("rest", "grpc")


def endpoint_settings(work: Path) -> dict[str, ServingSettings]:
    """The endpoints the capture benchmarks compare, on free ports: ``off``, and ``on``
    (capturing every request into ``work/captured``)."""
    from onnxflow.processes import free_port

    return {
        key: ServingSettings(
            model=f"{MODEL}@champion",
            port=free_port(),
            grpc_port=free_port(),
            cache_dir=work / "cache",
            log_level="warning",
            poll_interval_s=0,
            **options,
        )
        for key, options in (("off", {}), ("on", {"capture": str(work / "captured")}))
    }


def counters(url: str) -> dict:
    """The endpoint's answered inference requests (both fronts) and the capture's rows
    written, rows dropped and writer CPU seconds, from its ``/metrics``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = {"written": 0.0, "dropped": 0.0, "answered": 0.0, "capture_cpu_s": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "onnxflow_capture_writer_cpu_seconds_total":  # building too
                found["capture_cpu_s"] += sample.value
            elif sample.name == "onnxflow_capture_rows_written_total":
                found["written"] += sample.value
            elif sample.name == "onnxflow_capture_dropped_total":
                found["dropped"] += sample.value
            elif (
                sample.name == "onnxflow_requests_total"
                and sample.labels.get("route", "").endswith(("/infer", "grpc:ModelInfer"))
                and sample.labels.get("status") == "200"
            ):
                found["answered"] += sample.value
    return found


def grpc_message(path: Path, x) -> Path:
    """A batch-1 ``ModelInferRequest`` for ``x`` as one gRPC message: a 0 (not compressed),
    its length (4 bytes, big-endian), the protobuf."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())  # the input's bytes
    message = request.SerializeToString()
    path.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    return path


def h2load(front: str, address: str, body: Path, requests: int, connections: int = 8) -> int:
    """Send ``requests`` requests of ``body`` to the endpoint at ``address`` (host:port of
    ``front``): V2 JSON POSTs over HTTP/1.1, or gRPC ``ModelInfer`` calls, one in flight per
    connection. How many h2load saw answered with HTTP 200 (gRPC's own status is in the
    trailers: the caller checks the endpoint's count)."""
    if front == "rest":
        target = [
            "--h1",
            "--header=content-type: application/json",
            f"http://{address}/v2/models/{MODEL}/infer",
        ]
    else:
        target = [
            "--max-concurrent-streams=1",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            f"http://{address}/inference.GRPCInferenceService/ModelInfer",
        ]
    out = subprocess.run(
        [
            _tool("h2load"),
            f"--requests={requests}",
            f"--clients={connections}",
            "--threads=1",
            f"--data={body}",
            *target,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"status codes: (\d+) 2xx", out)
    return int(found.group(1)) if found else 0


def writers(pid: int) -> list[int]:
    """The processes ``pid``'s threads started (the capture's writer)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return kids


def _settle(pids: list[int], flush_s: float, timeout_s: float = 300) -> None:
    """Until the endpoint has handed its open batches over (two flush intervals) and the
    writer's CPU clock stood still for two seconds: the requests' capture is written."""
    time.sleep(2 * flush_s + 0.5)
    deadline = time.monotonic() + timeout_s
    last = [cpu_s(p) for p in pids]
    while time.monotonic() < deadline:
        time.sleep(2)
        now = [cpu_s(p) for p in pids]
        if now == last:
            return
        last = now


def _control(command: str, pid: int) -> None:
    subprocess.run([_tool("callgrind_control"), command, str(pid)], check=True, capture_output=True)


def _summaries(work: Path, pid: int, dump: int) -> dict[int, int]:
    """Instructions by thread (1: the main thread) in ``pid``'s dump number ``dump``."""
    found = {}
    for path in work.glob(f"callgrind.{pid}.{dump}-*"):
        thread = int(path.name.rsplit("-", 1)[1])
        found[thread] = int(re.search(r"^summary: (\d+)", path.read_text(), re.M).group(1))
    return found


def count_endpoint(settings: ServingSettings, bodies: dict[str, Path], requests: int) -> dict:
    """``settings``' endpoint under callgrind, each front of ``bodies`` counted in turn:
    instructions per answered request of its serving thread and of the whole endpoint."""
    import httpx

    work = Path(tempfile.mkdtemp(prefix="capture-instructions-"))
    process = subprocess.Popen(
        [
            _tool("valgrind"),
            "--tool=callgrind",
            "--instr-atstart=no",  # start-up runs at a quarter of full speed, not 1/50
            "--separate-threads=yes",
            f"--callgrind-out-file={work / 'callgrind.%p'}",
            *ENDPOINT_ARGV,
        ],
        env=_child_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=(work / "valgrind.log").open("w"),
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{settings.port}"
    addresses = {"rest": f"127.0.0.1:{settings.port}", "grpc": f"127.0.0.1:{settings.grpc_port}"}
    flush_s = settings.capture_flush_interval_s
    found: dict = {}
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the endpoint under callgrind did not start: {work}")
            time.sleep(1)
        for dump, (front, body) in enumerate(bodies.items(), start=1):
            h2load(front, addresses[front], body, WARM_UP)
            kids = writers(process.pid)
            _settle(kids, flush_s)
            before = counters(base)
            _control("--instr=on", process.pid)
            _control("--zero", process.pid)
            answered = h2load(front, addresses[front], body, requests)
            _settle(kids, flush_s)
            _control("--dump", process.pid)
            after = counters(base)
            served = after["answered"] - before["answered"]
            threads = _summaries(work, process.pid, dump)
            found[front] = {
                "answered": served,
                "h2load_2xx": answered,
                "serving_thread": threads[1] / served,
                "endpoint": sum(threads.values()) / served,
                # every request of the count (and of the warm-ups) written, none dropped
                "all_written": after["written"] == after["answered"] if settings.capture else None,
                "dropped": after["dropped"],
            }
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return found


def _tool(name: str) -> str:
    import shutil

    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} is not installed (Debian: apt-get install -y valgrind nghttp2-client)")
    return found


def compare(settings: dict[str, ServingSettings], bodies: dict[str, Path], requests: int) -> dict:
    """Each endpoint of ``settings`` (off, on) counted in turn, on each front of
    ``bodies``; capture's cost in percent of the serving thread's instructions and of the
    endpoint's (every thread)."""
    counted = {}
    for key, options in settings.items():
        counted[key] = count_endpoint(options, bodies, requests)
        for front, figures in counted[key].items():
            print(
                f"  {front} {key}: serving thread {figures['serving_thread']:,.0f}, endpoint "
                f"{figures['endpoint']:,.0f} instructions/request"
            )
    found: dict = {"requests": requests}
    for front in bodies:
        off, on = counted["off"][front], counted["on"][front]
        found[front] = {
            "off": off,
            "on": on,
            "serving_thread_pct": 100 * (on["serving_thread"] / off["serving_thread"] - 1),
            "endpoint_pct": 100 * (on["endpoint"] / off["endpoint"] - 1),
        }
    return found


def request_bodies(work: Path) -> dict[str, Path]:
    """A batch-1 request of the digits-sized MLP for each front."""
    import numpy as np

    x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    body = work / "body.json"
    features = {"name": "features", "datatype": "FP32", "shape": [1, 64], "data": x[0].tolist()}
    body.write_text(json.dumps({"inputs": [features]}))
    return {"rest": body, "grpc": grpc_message(work / "infer.grpc", x)}


def main() -> None:
    from bench.serve_bench import register

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="capture-instructions-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    register(os.environ["MLFLOW_TRACKING_URI"], MODEL, (64, 128, 10), work)
    found = compare(endpoint_settings(work), request_bodies(work), args.requests)
    print(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()

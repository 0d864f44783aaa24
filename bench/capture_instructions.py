"""What capture costs the serving thread, in instructions (valgrind's callgrind).

Requests per second and p99 on a shared 2-core machine move by more between two rounds of
the same endpoint than the few percent capture costs. Instructions executed do not: the
same requests through the same code count the same, whatever else the machine runs
(two runs of one endpoint here differed by 0.04%). So beside the timed rounds,
``capture_bench`` runs each endpoint under callgrind, sends it ``--requests`` batch-1 V2
REST requests at 8 connections (h2load) after a warm-up, and counts the instructions of
the serving thread (the event loop's, which decodes, runs the model inline, encodes and
offers to the capture) over exactly those requests. The capture's writer thread is not
in the figure: it runs on another core, and its CPU is reported from its own clock.

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

from onnxflow.serving.launcher import ENDPOINT_ARGV, _child_env  # noqa: E402
from onnxflow.serving.settings import ServingSettings  # noqa: E402

WARM_UP = 200
MODEL = "capbench"


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


def h2load_rest(h2load: str, url: str, body: Path, requests: int, connections: int = 8) -> int:
    """Send ``requests`` POSTs of ``body`` over HTTP/1.1; how many were answered with 2xx."""
    out = subprocess.run(
        [
            h2load,
            "--h1",
            f"--requests={requests}",
            f"--clients={connections}",
            f"--data={body}",
            "--header=content-type: application/json",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"status codes: (\d+) 2xx", out)
    return int(found.group(1)) if found else 0


def serving_instructions(
    settings: ServingSettings, infer_url: str, body: Path, requests: int, work: Path
) -> dict:
    """Instructions of the serving thread per answered request, ``settings``' endpoint run
    under callgrind (instrumented only while the counted requests run)."""
    import httpx

    valgrind, h2load = _tool("valgrind"), _tool("h2load")
    out = work / "callgrind.%p"
    process = subprocess.Popen(
        [
            valgrind,
            "--tool=callgrind",
            "--instr-atstart=no",  # start-up runs at a quarter of full speed, not 1/50
            "--separate-threads=yes",
            f"--callgrind-out-file={out}",
            *ENDPOINT_ARGV,
        ],
        env=_child_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=(work / "valgrind.log").open("w"),
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{settings.port}"
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
        h2load_rest(h2load, infer_url, body, WARM_UP)
        control = [_tool("callgrind_control")]
        subprocess.run([*control, "--instr=on", str(process.pid)], check=True, capture_output=True)
        subprocess.run([*control, "--zero", str(process.pid)], check=True, capture_output=True)
        answered = h2load_rest(h2load, infer_url, body, requests)
        subprocess.run([*control, "--dump", str(process.pid)], check=True, capture_output=True)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    # thread 1 is the serving thread (the event loop); the dump is the first (".1")
    dump = work / f"callgrind.{process.pid}.1-01"
    total = int(re.search(r"^summary: (\d+)", dump.read_text(), re.MULTILINE).group(1))
    return {"answered": answered, "instructions_per_request": total / max(answered, 1)}


def _tool(name: str) -> str:
    import shutil

    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} is not installed (Debian: apt-get install -y valgrind nghttp2-client)")
    return found


def compare(settings: dict[str, ServingSettings], model: str, body: Path, requests: int) -> dict:
    """Each endpoint of ``settings`` (off, on) counted in turn; the cost in percent."""
    found = {}
    for key, options in settings.items():
        work = Path(tempfile.mkdtemp(prefix=f"capture-instructions-{key}-"))
        url = f"http://127.0.0.1:{options.port}/v2/models/{model}/infer"
        found[key] = serving_instructions(options, url, body, requests, work)
        print(f"  {key}: {found[key]['instructions_per_request']:,.0f} instructions/request")
    off, on = (found[k]["instructions_per_request"] for k in ("off", "on"))
    found["cost_pct"] = 100 * (on / off - 1)
    found["requests"] = requests
    return found


def main() -> None:
    import numpy as np

    from bench.serve_bench import register

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="capture-instructions-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    register(os.environ["MLFLOW_TRACKING_URI"], MODEL, (64, 128, 10), work)
    x = np.random.default_rng(0).normal(size=64).astype(np.float32)
    body = work / "body.json"
    features = {"name": "features", "datatype": "FP32", "shape": [1, 64], "data": x.tolist()}
    body.write_text(json.dumps({"inputs": [features]}))
    print(json.dumps(compare(endpoint_settings(work), MODEL, body, args.requests), indent=2))


if __name__ == "__main__":
    main()

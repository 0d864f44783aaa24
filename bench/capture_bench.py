"""What capture costs: the digits-sized MLP (64->128->10) served with capture off and on.

Two endpoints serve the same champion from a fresh SQLite registry, one with
``capture`` (every request, a local folder); ``wrk`` drives each in alternating rounds at 8
connections (batch-1 V2 JSON requests). Reported: requests/s and p99 per side (medians of
the rounds), the cost in percent, and whether every answered request was captured
(``onnxflow_capture_rows_written_total`` against the answers, drops from
``onnxflow_capture_dropped_total``).

    python bench/capture_bench.py [--duration 10] [--rounds 3] [--connections 8]

Results are printed and written into ``docs/benchmarks.md`` ("Capture") and
``bench-results/capture.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import ensure_wrk, register, run_wrk, wrk_script  # noqa: E402
from onnxflow.processes import free_port  # noqa: E402
from onnxflow.serving.launcher import start_background, stop_background, wait_ready  # noqa: E402
from onnxflow.serving.settings import ServingSettings  # noqa: E402

MODEL = "capbench"
SECTION = "## Capture"


def counters(url: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {"written": 0.0, "dropped": 0.0, "answered": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "onnxflow_capture_rows_written_total":
                found["written"] += sample.value
            elif sample.name == "onnxflow_capture_dropped_total":
                found["dropped"] += sample.value
            elif (
                sample.name == "onnxflow_requests_total"
                and sample.labels.get("route", "").endswith("/infer")
                and sample.labels.get("status") == "200"
            ):
                found["answered"] += sample.value
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--install-wrk", action="store_true")
    args = parser.parse_args()
    wrk = ensure_wrk(args.install_wrk)
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="capture-bench-"))

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    register(os.environ["MLFLOW_TRACKING_URI"], MODEL, (64, 128, 10), work)
    x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    body = json.dumps(
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [1, 64], "data": x[0].tolist()}
            ]
        }
    )
    script = wrk_script(work / "post.lua", body)
    infos = {}
    for key, options in (("off", {}), ("on", {"capture": str(work / "captured")})):
        settings = ServingSettings(
            model=f"{MODEL}@champion",
            port=free_port(),
            cache_dir=work / "cache",
            log_level="warning",
            poll_interval_s=0,
            **options,
        )
        infos[key] = start_background(settings, work / key)
        wait_ready(infos[key], timeout_s=180)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for info in infos.values():  # warm-up
            run_wrk(wrk, f"{info.url}/v2/models/{MODEL}/infer", script, args.connections, 2)
        for _ in range(args.rounds):
            for key, info in infos.items():
                url = f"{info.url}/v2/models/{MODEL}/infer"
                runs[key].append(run_wrk(wrk, url, script, args.connections, args.duration))
        deadline = time.monotonic() + 30
        while True:  # the writer appends every half second
            seen = counters(infos["on"].url)
            if seen["written"] + seen["dropped"] >= seen["answered"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for key in infos:
            stop_background(work / key)
    result = {
        key: {
            "rps": statistics.median(r["rps"] for r in parts),
            "p99_ms": statistics.median(r["p99_ms"] for r in parts),
            "p50_ms": statistics.median(r["p50_ms"] for r in parts),
            "non_2xx": sum(r["non_2xx"] for r in parts),
        }
        for key, parts in runs.items()
    }
    result["cost_rps_pct"] = 100 * (1 - result["on"]["rps"] / result["off"]["rps"])
    result["cost_p99_pct"] = 100 * (result["on"]["p99_ms"] / result["off"]["p99_ms"] - 1)
    result["captured"] = seen
    result["setup"] = (
        f"{args.rounds} alternating rounds of {args.duration} s, wrk -t1 -c{args.connections}, "
        f"{os.cpu_count()} CPUs shared with the clients, load average {load_before:.1f} "
        f"before and {os.getloadavg()[0]:.1f} after"
    )
    print(json.dumps(result, indent=2))
    (ROOT / "bench-results").mkdir(exist_ok=True)
    (ROOT / "bench-results" / "capture.json").write_text(json.dumps(result, indent=2))
    write_report(result)


def write_report(result: dict) -> None:
    off, on, seen = result["off"], result["on"], result["captured"]
    lines = [
        SECTION,
        "",
        "`python bench/capture_bench.py` (in `make bench`): the 64->128->10 MLP, batch-1 V2 "
        f"JSON requests, {result['setup']}; medians of the rounds.",
        "",
        "| capture | requests/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| off | {off['rps']:.0f} | {off['p50_ms']:.2f} | {off['p99_ms']:.2f} |",
        f"| on (every request) | {on['rps']:.0f} | {on['p50_ms']:.2f} | {on['p99_ms']:.2f} |",
        "",
        f"Cost: {result['cost_rps_pct']:.1f}% of requests/s, {result['cost_p99_pct']:+.1f}% "
        f"on p99. Captured rows {seen['written']:.0f} of {seen['answered']:.0f} answered "
        f"requests (warm-up included), {seen['dropped']:.0f} dropped.",
        "",
        "On a machine whose other load varies (other processes on the same cores), the "
        "figures of one run vary more than the cost they measure: run it on a quiet "
        "machine before reading the percentage.",
        "",
    ]
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        text = head + "\n".join(lines) + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
    path.write_text(text)


if __name__ == "__main__":
    main()

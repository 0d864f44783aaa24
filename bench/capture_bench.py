"""What capture costs: the digits-sized MLP (64->128->10) served with capture off and on.

Three endpoints serve the same champion from a fresh SQLite registry: ``off``, ``on``
(``capture``: every request, a local folder) and ``control``, a second endpoint without
capture, set up like ``off``. Each round drives each of them in turn (the order rotates
from round to round) at 8 connections over REST (``wrk``, batch-1 V2 JSON requests) and
over gRPC (``h2load``, nghttp2's HTTP/2 load generator, sending a batch-1
``ModelInferRequest`` in gRPC's framing: a client in C, like wrk, so that the client's own
CPU takes little from the 2 cores it shares with the endpoint); then a few rounds at 64
connections. Reported: requests/s, p50 and p99 per endpoint (medians of the rounds), and
the cost in percent: on against off, from the medians, with a 90% bootstrap interval
over the rounds. The control is measured the same way against off: there is nothing to
find there, so what it shows is the method's own error on this machine, that day.
Also whether every answered request was captured (``onnxflow_capture_rows_written_total``
against the answers of both fronts, drops from ``onnxflow_capture_dropped_total``).
Then off and on again under valgrind's callgrind: the instructions per request of the
serving thread and of the whole endpoint, over REST and over gRPC (see
``bench/capture_instructions.py``), figures the machine's other load does not move.

    python bench/capture_bench.py [--duration 2] [--rounds 30] [--connections 8]
                                  [--many 64] [--many-rounds 3] [--instructions 2000]
                                  [--install-tools]

Results are printed and written into ``docs/benchmarks.md`` ("Capture") and
``bench-results/capture.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.capture_instructions import (  # noqa: E402
    MODEL,
    compare,
    counters,
    endpoint_settings,
    grpc_message,
    writers,
)
from bench.serve_bench import ensure_tool, register, run_wrk, wrk_script  # noqa: E402
from bench.team_bench import cpu_s  # noqa: E402
from onnxflow.processes import free_port  # noqa: E402
from onnxflow.serving.launcher import start_background, stop_background, wait_ready  # noqa: E402

SECTION = "## Capture"
#: The endpoints, in the order of the first round (each round starts one further on).
KEYS = ("off", "control", "on")


def rotated(n: int) -> tuple[str, ...]:
    """The endpoints in round ``n``'s order."""
    return KEYS[n % len(KEYS) :] + KEYS[: n % len(KEYS)]


def endpoint_cpu_s(pid: int) -> float:
    """CPU seconds of the endpoint ``pid`` and of its child processes (the capture's
    writer) that run."""
    total = cpu_s(pid)
    for kid in writers(pid):  # started by any of its threads (the writer: by capture's)
        try:
            total += cpu_s(kid)
        except FileNotFoundError:  # ended meanwhile
            pass
    return total


def run_h2load_grpc(h2load: str, address: str, body: Path, connections: int, duration: int):
    """``connections`` gRPC clients (one request in flight each) for ``duration`` seconds:
    requests/s, p50 and p99 from h2load's log of every request. h2load checks the HTTP
    status only; gRPC's own status (in the trailers) is checked against the endpoint's
    count of answered requests by the caller."""
    log = body.with_suffix(".log")
    log.unlink(missing_ok=True)
    cmd = [
        h2load,
        f"--duration={duration}",
        f"--clients={connections}",
        "--max-concurrent-streams=1",
        "--threads=1",
        f"--data={body}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        f"--log-file={log}",
        f"http://{address}/inference.GRPCInferenceService/ModelInfer",
    ]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    done = [line.split() for line in log.read_text().splitlines() if line.strip()]
    latencies = sorted(int(fields[2]) / 1000 for fields in done)  # us -> ms
    if not latencies:
        raise RuntimeError(f"h2load answered nothing: {' '.join(cmd)}")
    return {
        "rps": len(latencies) / duration,
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[int(len(latencies) * 0.99)],
        "requests": len(latencies),
        "non_2xx": sum(fields[1] != "200" for fields in done),
    }


def medians(parts: list[dict]) -> dict:
    return {
        **{
            figure: statistics.median(r[figure] for r in parts)
            for figure in ("rps", "p99_ms", "p50_ms", "cpu_us", "capture_cpu_us")
        },
        "non_2xx": sum(r["non_2xx"] for r in parts),
    }


def cost_of(base: list[list[dict]], other: list[dict], figure: str, sign: int, draws: int = 2000):
    """What ``other`` costs against ``base`` (the rounds of one or more endpoints, each
    as many as ``other``'s) in percent (``sign`` -1: a smaller figure is a cost,
    requests/s; 1: a larger one, p99 and CPU), from the medians of their rounds, and a 90%
    bootstrap interval: the rounds drawn again with replacement (a round's figures
    together, as they ran under one load), ``draws`` times."""
    a = np.array([[r[figure] for r in rounds] for rounds in base])  # (endpoints, rounds)
    b = np.array([r[figure] for r in other])
    point = 100 * sign * (np.median(b) / np.median(a) - 1)
    picks = np.random.default_rng(0).integers(0, len(b), size=(draws, len(b)))
    drawn_base = np.median(a[:, picks].transpose(1, 0, 2).reshape(draws, -1), axis=1)
    drawn = 100 * sign * (np.median(b[picks], axis=1) / drawn_base - 1)
    low, high = np.percentile(drawn, [5, 95])
    return float(point), [float(low), float(high)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=2, help="seconds per endpoint and round")
    parser.add_argument(
        "--rounds", type=int, default=30, help="rounds (each drives every endpoint once)"
    )
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--many", type=int, default=64, help="connections of the last rounds")
    parser.add_argument("--many-rounds", type=int, default=3, help="rounds at --many")
    parser.add_argument(
        "--install-tools",
        action="store_true",
        help="apt-get install wrk, nghttp2-client (h2load) and valgrind when they are missing",
    )
    parser.add_argument(
        "--instructions",
        type=int,
        default=2000,
        help="REST requests counted under callgrind on each endpoint (0: no count)",
    )
    args = parser.parse_args()
    wrk = ensure_tool("wrk", "wrk", "HTTP load generator", args.install_tools)
    h2load = ensure_tool("h2load", "nghttp2-client", "HTTP/2 load generator", args.install_tools)
    if args.instructions:
        ensure_tool("valgrind", "valgrind", "callgrind, to count instructions", args.install_tools)
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
    message = grpc_message(work / "infer.grpc", x)
    infos, grpc = {}, {}
    endpoints = endpoint_settings(work)
    # the A/A control: like off, on ports of its own
    endpoints["control"] = endpoints["off"].model_copy(
        update={"port": free_port(), "grpc_port": free_port()}
    )
    for key, settings in endpoints.items():
        infos[key] = start_background(settings, work / key)
        grpc[key] = f"127.0.0.1:{settings.grpc_port}"
        wait_ready(infos[key], timeout_s=180)
    runs: dict[str, list[dict]] = {f"{f}-{k}": [] for f in ("rest", "grpc") for k in infos}
    many: dict[str, list[dict]] = {f"{f}-{k}": [] for f in ("rest", "grpc") for k in infos}
    loads = []

    def server_cpu(key: str, run) -> dict:
        """``run()``'s figures and the endpoint's CPU per answered request meanwhile (the
        user + system time of the endpoint and of its capture writer process: steadier
        than requests/s on a shared machine)."""
        cpu, before = endpoint_cpu_s(infos[key].pid), counters(infos[key].url)
        found = run()
        after = counters(infos[key].url)
        found["answered"] = after["answered"] - before["answered"]
        per_request = 1e6 / max(found["answered"], 1)
        found["cpu_us"] = (endpoint_cpu_s(infos[key].pid) - cpu) * per_request
        # the writer's building and writing (what capture adds besides the request path's
        # offer), by its own clock
        found["capture_cpu_us"] = (after["capture_cpu_s"] - before["capture_cpu_s"]) * per_request
        # the tail against the middle of the same round: the machine's speed that round,
        # which moves both, drops out
        found["tail"] = found["p99_ms"] / found["p50_ms"]
        return found

    def rest(key: str, connections: int, duration: int) -> dict:
        url = f"{infos[key].url}/v2/models/{MODEL}/infer"
        return server_cpu(key, lambda: run_wrk(wrk, url, script, connections, duration))

    def rpc(key: str, connections: int, duration: int) -> dict:
        found = server_cpu(
            key, lambda: run_h2load_grpc(h2load, grpc[key], message, connections, duration)
        )
        # answered with a gRPC error: HTTP 200 to h2load, not counted as answered
        found["non_2xx"] += max(0, found["requests"] - found["answered"])
        return found

    try:
        for key in infos:  # warm-up
            rest(key, args.connections, 2)
            rpc(key, args.connections, 2)
        time.sleep(2 * endpoints["on"].capture_flush_interval_s)  # the warm-up written
        warmed = counters(infos["on"].url)
        for n in range(args.rounds):  # each endpoint once, in an order that rotates
            order = rotated(n)
            for key in order:
                runs[f"rest-{key}"].append(rest(key, args.connections, args.duration))
                loads.append(os.getloadavg()[0])
            for key in order:
                runs[f"grpc-{key}"].append(rpc(key, args.connections, args.duration))
            if (n + 1) % 10 == 0 or n + 1 == args.rounds:
                print(f"round {n + 1}/{args.rounds} done", flush=True)
        for n in range(args.many_rounds):
            for key in rotated(n):
                many[f"rest-{key}"].append(rest(key, args.many, args.duration))
                many[f"grpc-{key}"].append(rpc(key, args.many, args.duration))
        deadline = time.monotonic() + 30
        while True:  # the writer appends every flush interval (2 s)
            seen = counters(infos["on"].url)
            if seen["written"] + seen["dropped"] >= seen["answered"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for key in infos:
            stop_background(work / key)
    counted = None
    if args.instructions:  # the same endpoints again, each under callgrind
        print(f"counting instructions over {args.instructions} requests a front (callgrind) ...")
        body_file = work / "body.json"
        body_file.write_text(body)
        bodies = {"rest": body_file, "grpc": message}
        counted = compare(endpoint_settings(work), bodies, args.instructions)
    result = {key: medians(parts) for key, parts in runs.items()}
    result["rounds"] = runs
    result["many"] = {key: medians(parts) for key, parts in many.items()}
    result["many_rounds"] = many
    costs(result, runs)
    result["captured"] = seen
    # the writer's CPU per row over every round (its clock moves once a flush, so a 2 s
    # round's own figure, capture_cpu_us, is often 0 or two flushes' worth)
    rows = seen["written"] - warmed["written"]
    result["writer_cpu_us_per_row"] = 1e6 * (seen["capture_cpu_s"] - warmed["capture_cpu_s"]) / rows
    result["writer_nice"] = endpoints["on"].capture_writer_nice
    result["instructions"] = counted
    result["connections"] = args.connections
    result["many_connections"] = args.many
    result["setup"] = (
        f"{args.rounds} rounds per front, each driving off, control and on for "
        f"{args.duration} s in turn (the order rotating), wrk -t1 "
        f"-c{args.connections} (REST) and h2load -c{args.connections} -m1 (gRPC), "
        f"then {args.many_rounds} rounds at {args.many} connections; {os.cpu_count()} CPUs shared "
        f"with the clients and with other work: load average {load_before:.1f} before, "
        f"{statistics.median(loads):.1f} (median) during the REST rounds, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    (ROOT / "bench-results").mkdir(exist_ok=True)
    (ROOT / "bench-results" / "capture.json").write_text(json.dumps(result, indent=2))
    write_report(result)


def cost(result: dict, prefix: str, figure: str, sign: str = "") -> str:
    low, high = result[f"{prefix}_{figure}_interval"]
    return f"{result[f'{prefix}_{figure}_pct']:{sign}.1f}% [{low:{sign}.1f}..{high:{sign}.1f}]"


#: What each cost compares: (its name in the results, the baseline's rounds, the other's).
COMPARISONS = (
    ("cost", ("off",), "on"),
    # the two endpoints without capture, pooled: each process keeps a speed of its own
    # for a whole run, and two such processes differ by up to a few percent
    ("pooled", ("off", "control"), "on"),
    ("control", ("off",), "control"),  # the A/A control: the method's own error
)


def costs(result: dict, runs: dict[str, list[dict]]) -> None:
    """Into ``result``: every comparison's cost on each figure and front, from the
    medians of the rounds, with a 90% bootstrap interval."""
    for front in ("rest", "grpc"):
        for what, baseline, other in COMPARISONS:
            base = [runs[f"{front}-{key}"] for key in baseline]
            for figure, name, sign in (
                ("rps", "rps", -1),
                ("p99_ms", "p99", 1),
                ("tail", "tail", 1),
                ("cpu_us", "cpu", 1),
            ):
                point, interval = cost_of(base, runs[f"{front}-{other}"], figure, sign)
                prefix = f"{front}_{what}_{name}"
                result[f"{prefix}_pct"], result[f"{prefix}_interval"] = point, interval


def costs_of(result: dict, what: str) -> str:
    """The sentence of ``what`` (cost, control) on both fronts."""
    return "; ".join(
        f"{name} {cost(result, f'{front}_{what}', 'rps')} of requests/s, "
        f"{cost(result, f'{front}_{what}', 'p99', '+')} on p99 "
        f"({cost(result, f'{front}_{what}', 'tail', '+')} on p99/p50), "
        f"{cost(result, f'{front}_{what}', 'cpu', '+')} of the endpoint's CPU per request"
        for front, name in (("rest", "REST"), ("grpc", "gRPC"))
    )


def instruction_lines(counted: dict | None) -> list[str]:
    if not counted:
        return []
    lines = [
        f"Instructions per request, counted by callgrind over {counted['requests']:,} "
        "requests a front at 8 connections after a warm-up (the same requests count the "
        "same on a busy machine; user space only; `bench/capture_instructions.py`):",
        "",
        "| front | thread | off | on | capture's cost |",
        "|---|---|---|---|---|",
    ]
    for front, name in (("rest", "REST"), ("grpc", "gRPC")):
        off, on = counted[front]["off"], counted[front]["on"]
        for key, thread in (
            ("serving_thread", "serving thread (the event loop)"),
            ("endpoint", "the endpoint (every thread)"),
        ):
            pct = counted[front][f"{key}_pct"]
            lines.append(
                f"| {name} | {thread} | {off[key]:,.0f} | {on[key]:,.0f} | "
                f"**{pct:.1f}%** ({on[key] - off[key]:+,.0f}) |"
            )
    lines += [
        "",
        "The writer process is not in these counts (under callgrind each of its appends "
        "would carry a fiftieth of the requests it carries at full speed); its CPU at full "
        "speed is above.",
        "",
    ]
    return lines


def write_report(result: dict) -> None:
    seen, c, m = result["captured"], result["connections"], result["many_connections"]
    # runs before 2026-12-06 kept only each round's figure, over REST
    writer_cpu = result.get("writer_cpu_us_per_row", result["rest-on"]["capture_cpu_us"])
    labels = (("off", "off"), ("control", "off (the control)"), ("on", "on (every request)"))
    rows = []
    for source, connections in ((result, c), (result["many"], m)):
        for front, name in (("rest", "REST (wrk, V2 JSON)"), ("grpc", "gRPC (h2load)")):
            for key, label in labels:
                r = source[f"{front}-{key}"]
                rows.append(
                    f"| {name} | {connections} | {label} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                    f"{r['p99_ms']:.2f} | {r['cpu_us']:.0f} |"
                )
    lines = [
        SECTION,
        "",
        "`python bench/capture_bench.py` (in `make bench`): the 64->128->10 MLP, batch-1 "
        f"requests, {result['setup']}. Figures are the medians of the rounds.",
        "",
        "| front | connections | capture | requests/s | p50 ms | p99 ms | CPU us/req |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"**Cost at {c} connections** (on against off, from the medians of the rounds, [90% "
        f"bootstrap interval over the rounds]; p99/p50 is each round's p99 over its own "
        "p50, which the machine's speed that round moves alike): "
        f"{costs_of(result, 'cost')}.",
        "",
        "**Against both endpoints without capture** (off and the control, their rounds "
        "pooled: each endpoint process keeps a speed of its own for a whole run, see the "
        f"control below): {costs_of(result, 'pooled')}.",
        "",
        "The **control** measured the same way against off (a second endpoint without "
        "capture: nothing to find, so this is the method's own error here, that day): "
        f"{costs_of(result, 'control')}.",
        "",
        f"Building and writing the tables took {writer_cpu:.1f} us of CPU per request "
        f"({100 * writer_cpu / result['rest-off']['cpu_us']:.1f}% of the endpoint's CPU per "
        "REST request without capture; every round after the warm-up, both fronts), in the "
        "writer process at nice "
        f"{result['writer_nice']} (`capture_writer_nice`; its own clock, "
        "`onnxflow_capture_writer_cpu_seconds_total`; the endpoint's CPU above includes "
        "it). "
        f"Captured rows {seen['written']:.0f} of {seen['answered']:.0f} "
        f"answered requests (both fronts, every round and the warm-up), "
        f"{seen['dropped']:.0f} dropped.",
        "",
        *instruction_lines(result.get("instructions")),
        "Where the control's figures are as large as the cost's, this machine could not "
        "tell capture's cost apart from its other load that day: read the instructions "
        "above, which do not vary with the load. What capture cost before its request path "
        "and writer were reworked, and why, is in the "
        "[production loop guide](guide/production-loop.md#what-it-costs).",
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

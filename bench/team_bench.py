"""Serving a team, measured: REST against gRPC, and one model against five in one process.

Five 64->128->10 MLPs are registered as ``champion`` in a fresh SQLite registry. Each
figure comes from one run on this machine, with Triton's own Python clients
(``tritonclient.http`` / ``tritonclient.grpc``, one synchronous client per thread, batch-1
FP32 requests): the clients share the machine's cores with the endpoint, so the
figures compare the two fronts and the two set-ups, not the endpoint's ceiling (see
``bench/serve_bench.py`` for that, with wrk).

1. REST vs gRPC: one endpoint serving one model on both fronts; requests/s and p99 at
   1, 8 and 64 client threads (``--connections``), and the endpoint's CPU per request
   (its user + system time over the requests answered), the two fronts in turn; beside
   them grpcio's floor, a gRPC server that does nothing (``bench/grpc_floor.py``).
2. One model vs five in one process: start to ready, resident memory after load, and
   requests/s spread over every model served.
3. The champion with the challenger in shadow, off against on: two endpoints serving the
   same champion (one with ``--shadow challenger``, every request mirrored), driven in
   turn over alternating rounds; the champion's requests/s, p50 and p99, and what the
   shadow compared and dropped.

Results are printed and written into ``docs/benchmarks.md`` (the "Serving a team"
section) and ``bench-results/team.json``.

    python bench/team_bench.py [--duration 8] [--threads 4] [--connections 1,8,64]
    python bench/team_bench.py --fronts-only   # only the REST vs gRPC table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import register_mlp, run_threads  # noqa: E402
from onnxflow.processes import free_port  # noqa: E402
from onnxflow.serving.launcher import start_background, stop_background, wait_ready  # noqa: E402
from onnxflow.serving.settings import ServingSettings  # noqa: E402

NAMES = [f"team{i}" for i in range(5)]
START = "<!-- team-bench:start -->"
END = "<!-- team-bench:end -->"


def register_models(work: Path) -> str:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    example = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    for i, name in enumerate(NAMES):
        register_mlp(work / "models" / name, name, i, example)
    # the first model's challenger, for the shadow figures: another MLP of the same shape
    register_mlp(work / "models" / "challenger", NAMES[0], 99, example, alias="challenger")
    return uri


def start(
    work: Path, key: str, models: list[str], **options
) -> tuple[object, ServingSettings, float]:
    settings = ServingSettings(
        model=",".join(f"{m}@champion" for m in models),
        port=free_port(),
        grpc_port=free_port(),
        cache_dir=work / "cache",
        log_level="warning",
        **options,
    )
    info = start_background(settings, work / key)
    took = wait_ready(info, timeout_s=180)
    return info, settings, took


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def drive(kind: str, address: str, models: list[str], threads: int, duration: float) -> dict:
    """Batch-1 requests from ``threads`` synchronous clients for ``duration`` seconds."""
    if kind == "grpc":
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib
    data = np.random.default_rng(1).normal(size=(1, 64)).astype(np.float32)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    stop = time.perf_counter() + duration

    def work(slot: int) -> None:
        client = client_lib.InferenceServerClient(address)
        tensor = client_lib.InferInput("features", [1, 64], "FP32")
        tensor.set_data_from_numpy(data)
        i = slot
        while time.perf_counter() < stop:
            begin = time.perf_counter()
            try:
                client.infer(models[i % len(models)], [tensor])
            except Exception:  # noqa: BLE001  (counted; the figure says how many)
                errors[slot] += 1
            latencies[slot].append(time.perf_counter() - begin)
            i += 1

    elapsed = run_threads(work, threads)
    every = sorted(x for lane in latencies for x in lane)
    return {
        "requests_per_s": len(every) / elapsed,
        "errors": sum(errors),
        "p50_ms": statistics.median(every) * 1000,
        "p99_ms": every[int(len(every) * 0.99) - 1] * 1000,
        "requests": len(every),
        "latencies": every,
        "elapsed_s": elapsed,
    }


def cpu_s(pid: int) -> float:
    """The process's user + system CPU seconds so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fronts(work: Path, connections: list[int], duration: float, rounds: int = 4) -> list[dict]:
    """REST against gRPC on one endpoint serving one model, at each client thread count,
    in alternating rounds; the endpoint's CPU per request from its /proc figures around
    each run. A third part in each round: grpcio's floor (``bench/grpc_floor.py``, a
    gRPC server that does nothing) with the same client."""
    model = NAMES[0]
    info, settings, _ = start(work, "fronts", [model])
    floor_port = free_port()
    floor = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "grpc_floor.py"), str(floor_port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    rows = []
    try:
        if floor.stdout.readline().strip() != "ready":
            raise SystemExit("bench/grpc_floor.py did not start")
        # front: (client kind, address, the server's pid)
        addresses = {
            "rest": ("rest", info.url.removeprefix("http://"), info.pid),
            "grpc": ("grpc", f"127.0.0.1:{settings.grpc_port}", info.pid),
            "floor": ("grpc", f"127.0.0.1:{floor_port}", floor.pid),
        }
        for kind, address, _ in addresses.values():  # warm (connections, first-call imports)
            drive(kind, address, [model], 2, 1.0)
        for threads in connections:
            # the fronts in alternating rounds: a machine whose load changes (other jobs on
            # the same cores) weighs on both alike
            parts: dict[str, list[dict]] = {front: [] for front in addresses}
            cpu: dict[str, float] = dict.fromkeys(addresses, 0.0)
            for _ in range(rounds):
                for front, (kind, address, pid) in addresses.items():
                    before = cpu_s(pid)
                    parts[front].append(drive(kind, address, [model], threads, duration / rounds))
                    cpu[front] += cpu_s(pid) - before
            row = {"connections": threads}
            for front in addresses:
                figure = merge(parts[front])
                figure["server_cpu_us"] = cpu[front] / max(figure["requests"], 1) * 1e6
                row[front] = figure
            row["ratio"] = row["grpc"]["requests_per_s"] / row["rest"]["requests_per_s"]
            row["floor_ratio"] = row["floor"]["requests_per_s"] / row["rest"]["requests_per_s"]
            print(
                f"{threads:>3} connections: REST {row['rest']['requests_per_s']:,.0f} req/s "
                f"({row['rest']['server_cpu_us']:.0f} us CPU/req), gRPC "
                f"{row['grpc']['requests_per_s']:,.0f} req/s "
                f"({row['grpc']['server_cpu_us']:.0f} us CPU/req): {row['ratio']:.2f}x; "
                f"grpcio doing nothing {row['floor']['requests_per_s']:,.0f} req/s "
                f"({row['floor']['server_cpu_us']:.0f} us CPU/req): {row['floor_ratio']:.2f}x",
                flush=True,
            )
            rows.append(row)
    finally:
        floor.kill()
        floor.wait()
        stop_background(work / "fronts")
    return rows


def shadow_figures(url: str) -> dict:
    """The shadow's counters from /metrics, summed over its pairs."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"requests": 0.0, "dropped": 0.0, "errors": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for kind in totals:
            if family.name == f"onnxflow_shadow_{kind}":
                totals[kind] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


def shadow_off_on(work: Path, threads: int, duration: float, rounds: int = 2) -> dict:
    """The champion's figures with the shadow off and on, driven in alternating rounds."""
    import httpx

    model = NAMES[0]
    off, _, _ = start(work, "shadow-off", [model])
    on, _, _ = start(work, "shadow-on", [model], shadow="challenger")
    try:
        # the challenger loads beside the champion: mirrored requests show when it has
        row = {"inputs": [[0.5] * 64]}
        deadline = time.monotonic() + 120
        while shadow_figures(on.url)["requests"] == 0:
            if time.monotonic() > deadline:
                raise SystemExit("the shadow never compared a request")
            httpx.post(f"{on.url}/v2/models/{model}/invocations", json=row)
            time.sleep(0.1)
        before = shadow_figures(on.url)
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(rounds):
            for key, info in (("off", off), ("on", on)):
                address = info.url.removeprefix("http://")
                runs[key].append(drive("rest", address, [model], threads, duration / rounds))
        time.sleep(1.0)  # let the worker finish what is queued
        after = shadow_figures(on.url)
    finally:
        stop_background(work / "shadow-off")
        stop_background(work / "shadow-on")
    result = {key: merge(parts) for key, parts in runs.items()}
    result["shadow"] = {k: int(after[k] - before[k]) for k in after}
    return result


def merge(parts: list[dict]) -> dict:
    """Rounds of one set-up as one figure: total requests over total time, pooled latencies."""
    every = sorted(x for part in parts for x in part["latencies"])
    elapsed = sum(part["elapsed_s"] for part in parts)
    return {
        "requests_per_s": len(every) / elapsed,
        "errors": sum(part["errors"] for part in parts),
        "p50_ms": statistics.median(every) * 1000,
        "p99_ms": every[int(len(every) * 0.99) - 1] * 1000,
        "requests": len(every),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument(
        "--connections", default="1,8,64", help="client threads of the REST vs gRPC table"
    )
    parser.add_argument(
        "--fronts-only", action="store_true", help="only the REST vs gRPC table (printed)"
    )
    args = parser.parse_args()
    connections = [int(n) for n in args.connections.split(",")]
    results: dict = {
        "threads": args.threads,
        "duration_s": args.duration,
        "load_average": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="team-bench-") as tmp:
        work = Path(tmp)
        print("registering five models ...", flush=True)
        register_models(work)
        results["fronts"] = fronts(work, connections, args.duration)
        if args.fronts_only:
            print(json.dumps(results["fronts"], indent=2))
            return
        for key, models in (("one", NAMES[:1]), ("five", NAMES)):
            info, settings, took = start(work, key, models)
            try:
                # a second start with the models cached: what a restart costs
                stop_background(work / key)
                info, settings, took = start(work, key, models)
                entry = {"models": len(models), "ready_s": took, "rss_mb": rss_mb(info.pid)}
                rest = drive(
                    "rest", info.url.removeprefix("http://"), models, args.threads, args.duration
                )
                grpc = drive(
                    "grpc", f"127.0.0.1:{settings.grpc_port}", models, args.threads, args.duration
                )
                entry.update(rest=rest, grpc=grpc, rss_after_mb=rss_mb(info.pid))
                results[key] = entry
                print(
                    f"{key}: ready {took:.2f} s, {entry['rss_mb']:.0f} MB; REST "
                    f"{rest['requests_per_s']:,.0f} req/s (p99 {rest['p99_ms']:.2f} ms), "
                    f"gRPC {grpc['requests_per_s']:,.0f} req/s "
                    f"(p99 {grpc['p99_ms']:.2f} ms)",
                    flush=True,
                )
            finally:
                stop_background(work / key)
        shadow = shadow_off_on(work, args.threads, 2 * args.duration)
        results["shadow"] = shadow
        print(
            f"shadow off: {shadow['off']['requests_per_s']:,.0f} req/s (p50 "
            f"{shadow['off']['p50_ms']:.2f} ms, p99 {shadow['off']['p99_ms']:.2f} ms); on: "
            f"{shadow['on']['requests_per_s']:,.0f} req/s (p50 {shadow['on']['p50_ms']:.2f} "
            f"ms, p99 {shadow['on']['p99_ms']:.2f} ms); shadow {shadow['shadow']}",
            flush=True,
        )
    for entry in (results["one"], results["five"]):
        for front in ("rest", "grpc"):
            for key in ("latencies", "elapsed_s"):
                entry[front].pop(key)
    (ROOT / "bench-results").mkdir(exist_ok=True)
    (ROOT / "bench-results" / "team.json").write_text(json.dumps(results, indent=2))
    write_report(results)


def write_report(results: dict) -> None:
    one, five, shadow = results["one"], results["five"], results["shadow"]
    off, on, mirrored = shadow["off"], shadow["on"], shadow["shadow"]
    front_rows = "\n".join(
        f"| {r['connections']} | {r['rest']['requests_per_s']:,.0f} | "
        f"{r['grpc']['requests_per_s']:,.0f} | {r['ratio']:.2f}x | "
        f"{r['rest']['p99_ms']:.2f} | {r['grpc']['p99_ms']:.2f} | "
        f"{r['rest']['server_cpu_us']:.0f} | {r['grpc']['server_cpu_us']:.0f} | "
        f"{r['floor']['requests_per_s']:,.0f} ({r['floor_ratio']:.2f}x) | "
        f"{r['floor']['server_cpu_us']:.0f} |"
        for r in results["fronts"]
    )
    rows = []
    for label, entry in (("1 model", one), ("5 models", five)):
        for front in ("rest", "grpc"):
            fig = entry[front]
            rows.append(
                f"| {label} | {front.upper() if front == 'rest' else 'gRPC'} | "
                f"{fig['requests_per_s']:,.0f} | {fig['p50_ms']:.2f} | "
                f"{fig['p99_ms']:.2f} | {fig['errors']} |"
            )
    text = f"""{START}
## Serving a team: REST vs gRPC, one model vs five

`python bench/team_bench.py --duration {results["duration_s"]:g} --threads \
{results["threads"]}` (run by `make bench`): one endpoint process, 64->128->10 MLPs,
batch-1 FP32 requests from {results["threads"]} threads of Triton's own synchronous Python
clients on the same 2-core machine (the clients take much of the CPU, so these compare
the fronts and set-ups; `wrk` figures above give the endpoint's ceiling). With five
models, requests go round-robin over all five. Load average when it started:
{results["load_average"]:.1f} (on a busy machine these figures drop and swing).

**The two fronts side by side**, one model, the same clients at 1, 8 and 64 threads
(`team_bench.py --connections`), REST and gRPC in four alternating rounds at each (so
a change in the machine's load weighs on both alike); CPU/request is the endpoint's user + system
time over the requests it answered in that run (µs); p99 in ms. The last two columns are
grpcio's floor: `bench/grpc_floor.py`, a grpcio server with the endpoint's thread count
that answers every call with a fixed output and does nothing else, driven in the same
rounds by the same client (ratio to REST in brackets). No gRPC front built on grpcio can
pass that floor on this machine:

| threads | REST req/s | gRPC req/s | ratio | REST p99 | gRPC p99 | REST CPU | gRPC CPU \
| no-op grpcio req/s | its CPU |
|---|---|---|---|---|---|---|---|---|---|
{front_rows}

**One model vs five**, {results["threads"]} client threads:

| served | front | requests/s | p50 ms | p99 ms | errors |
|---|---|---|---|---|---|
{chr(10).join(rows)}

gRPC / REST: {one["grpc"]["requests_per_s"] / one["rest"]["requests_per_s"]:.2f}x with one
model. Start to ready with the models cached: {one["ready_s"]:.2f} s for one model,
{five["ready_s"]:.2f} s for five. Resident memory after load: {one["rss_mb"]:.0f} MB for one
model, {five["rss_mb"]:.0f} MB for five ({(five["rss_mb"] - one["rss_mb"]) / 4:.1f} MB per
extra model of this size).

**The challenger in shadow.** Two endpoints serve the same champion, one with `--shadow
challenger` (every request mirrored to a challenger of the same size), driven in turn
over two alternating rounds ({results["duration_s"] * 2:g} s each in all), REST, same
clients:

| shadow | requests/s | p50 ms | p99 ms | errors |
|---|---|---|---|---|
| off | {off["requests_per_s"]:,.0f} | {off["p50_ms"]:.2f} | {off["p99_ms"]:.2f} | {off["errors"]} |
| on | {on["requests_per_s"]:,.0f} | {on["p50_ms"]:.2f} | {on["p99_ms"]:.2f} | {on["errors"]} |

Champion p99 on / off: {on["p99_ms"] / off["p99_ms"]:.2f}x; requests/s on / off:
{on["requests_per_s"] / off["requests_per_s"]:.2f}x. The shadow compared
{mirrored["requests"]:,} requests, dropped {mirrored["dropped"]:,} (queue full) and
counted {mirrored["errors"]} errors. Mirroring is not free: the endpoint encodes and
writes each request to the shadow's worker process (about 15 µs), and the worker (niced)
decodes it, runs the challenger and compares. With the clients on the same 2 cores, that
CPU is taken from them and from the champion, which is what the ratios show for a model
this small (its run is about 15 µs); `--shadow-fraction` mirrors a share of the requests.
{END}
"""
    doc = ROOT / "docs" / "benchmarks.md"
    current = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if START in current:
        current = (
            current[: current.index(START)] + text + current[current.index(END) + len(END) + 1 :]
        )
    else:
        current = current.rstrip("\n") + "\n\n" + text
    doc.write_text(current)
    print(f"written to {doc}")


if __name__ == "__main__":
    main()

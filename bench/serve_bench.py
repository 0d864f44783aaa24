"""Serving benchmarks: the onnxflow endpoint against ``mlflow models serve``, in one run.

1. A 64->128->10 MLP is registered as ``champion`` in a fresh registry behind a local
   ``mlflow server`` (the production set-up). Both servers serve it; ``wrk`` drives each
   with batch-1 JSON requests on /invocations at 8 connections, metrics on. Printed:
   requests/s, p50, p99 for both and the ratio, our resident memory, and our start to
   ready time with the model already cached.
2. Dynamic batching on a model heavy enough for it to matter (64->2048x4->10): our
   endpoint unbatched and batched at 32 connections.

Results go to ``docs/benchmarks.md`` (and JSON under ``bench-results/``).

    python bench/serve_bench.py [--duration 15] [--install-tools] [--skip-mlflow]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import register_mlp, start_tracking_server, stop_group, wait_http
from onnxflow.mlflow_servers import start_scoring_server
from onnxflow.processes import free_port
from onnxflow.serving.launcher import start_background, stop_background
from onnxflow.serving.settings import ServingSettings

# --- load generator ----------------------------------------------------------------------


def ensure_tool(command: str, package: str, what: str, install: bool) -> str:
    """The path of ``command``; with ``install``, Debian's ``package`` is installed with
    apt-get when it is missing (as root, else with sudo); else a message says how."""
    found = shutil.which(command)
    if found:
        return found
    if install and shutil.which("apt-get"):
        print(f"{command} is missing; installing it with apt-get (Debian package {package!r}) ...")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", package], check=True)
        found = shutil.which(command)
        if found:
            return found
    sys.exit(
        f"{command} ({what}) is not installed.\n"
        f"  Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y {package}\n"
        f"  or run this benchmark with --install-tools"
    )


def wrk_script(path: Path, body: str) -> Path:
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [==[{body}]==]\n"
    )
    return path


def run_wrk(
    wrk: str, url: str, script: Path, connections: int, duration: int, threads: int = 1
) -> dict:
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    latency = {p: _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.MULTILINE)}
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors:.*", out)
    return {
        "rps": rps,
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": socket_errors.group(0) if socket_errors else "",
        "command": " ".join(cmd[:-2] + ["<post.lua>", url]),
    }


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


# --- registry and servers ----------------------------------------------------------------


def register(tracking_uri: str, name: str, sizes: tuple[int, ...], work: Path) -> str:
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    example = np.random.default_rng(0).normal(size=(1, sizes[0])).astype(np.float32)
    return register_mlp(work / "models" / name, name, 0, example, sizes=sizes)


class OurEndpoint:
    def __init__(self, work: Path, key: str, **options) -> None:
        self.state = work / key
        self.settings = ServingSettings(
            port=free_port(), cache_dir=work / "cache", log_level="warning", **options
        )
        self.info = None

    def start(self) -> float:
        """Seconds from process start to ready."""
        self.info = start_background(self.settings, self.state)
        start = self.info.started_at
        wait_http(f"{self.info.url}/v2/health/ready", 120)
        return time.time() - start

    def rss_mb(self) -> tuple[float, float]:
        status = Path(f"/proc/{self.info.pid}/status").read_text()
        kb = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
        return int(kb["VmRSS"]) / 1024, int(kb["VmHWM"]) / 1024

    def stop(self) -> None:
        stop_background(self.state)


def mlflow_serve(model_uri: str, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = start_scoring_server(model_uri, port, work / "mlflow-serve.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ping", 180, proc)
    return proc, url


def group_rss_mb(pid: int) -> tuple[float, float]:
    """(all, largest child) resident MB: ``mlflow models serve`` runs a uvicorn worker."""
    parent = subprocess.run(
        ["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    children = subprocess.run(
        ["ps", "-o", "rss=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    sizes = [int(x) / 1024 for x in children]
    return sum(int(x) for x in parent) / 1024 + sum(sizes), max(sizes, default=0.0)


def check_answer(url: str, body: str) -> dict:
    response = httpx.post(
        f"{url}/invocations", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    response.raise_for_status()
    return response.json()


# --- the benchmarks ----------------------------------------------------------------------


def measure_rounds(
    wrk: str, targets: dict[str, str], script: Path, connections: int, args
) -> dict[str, dict]:
    """Alternate wrk runs over the targets, ``args.rounds`` times; medians per target.

    Alternating spreads any drift in the machine's load (other processes) over all
    targets instead of favouring whichever ran in the quiet moment.
    """
    for url in targets.values():
        run_wrk(wrk, url, script, connections, 3)  # warm-up
    runs: dict[str, list[dict]] = {key: [] for key in targets}
    for _ in range(args.rounds):
        for key, url in targets.items():
            runs[key].append(run_wrk(wrk, url, script, connections, args.duration))
    summary = {}
    for key, results in runs.items():
        summary[key] = {
            "rps": statistics.median(r["rps"] for r in results),
            "p50_ms": statistics.median(r["p50_ms"] for r in results),
            "p99_ms": statistics.median(r["p99_ms"] for r in results),
            "non_2xx": sum(r["non_2xx"] for r in results),
            "rounds": results,
            "command": results[0]["command"],
        }
    return summary


def bench_vs_mlflow(args, wrk: str, work: Path, tracking_uri: str) -> dict:
    name = "bench-mlp"
    version = register(tracking_uri, name, (64, 128, 10), work)
    row = np.random.default_rng(1).normal(size=(1, 64)).round(6).tolist()
    body = json.dumps({"inputs": row})
    script = wrk_script(work / "post-mlp.lua", body)
    result = {"model": f"{name} v{version} (64->128->10 MLP)"}

    ours = OurEndpoint(work, "ours", model=f"{name}@champion")
    ours.start()  # downloads into the cache
    ours.stop()
    starts = []
    for _ in range(3):
        starts.append(ours.start())
        ours.stop()
    result["start_to_ready_s"] = starts
    result["sqlite_registry"] = sqlite_registry_figures(wrk, work, name, script)
    ours.start()
    targets = {"ours": f"{ours.info.url}/invocations"}
    proc = None
    try:
        answer = check_answer(ours.info.url, body)
        if not args.skip_mlflow:
            proc, url = mlflow_serve(f"models:/{name}@champion", work)
            theirs = check_answer(url, body)
            np.testing.assert_allclose(
                answer["predictions"]["logits"], theirs["predictions"]["logits"], rtol=1e-5
            )
            targets["mlflow"] = f"{url}/invocations"
        result.update(measure_rounds(wrk, targets, script, args.connections, args))
        result["ours"]["rss_mb"], result["ours"]["rss_peak_mb"] = ours.rss_mb()
        if proc is not None:
            result["mlflow"]["rss_mb"], result["mlflow"]["rss_worker_mb"] = group_rss_mb(proc.pid)
            result["ratio"] = result["ours"]["rps"] / result["mlflow"]["rps"]
    finally:
        ours.stop()
        if proc is not None:
            stop_group(proc)
    return result


def sqlite_registry_figures(wrk: str, work: Path, name: str, script: Path) -> dict:
    """Start time and memory when the endpoint reads a local SQLite registry directly.

    Without a tracking server the endpoint needs MLflow's client (and SQLAlchemy) in its
    own process; this measures what that costs, on the same cached model.
    """
    saved = os.environ["MLFLOW_TRACKING_URI"]
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    endpoint = OurEndpoint(work, "ours-sqlite", model=f"{name}@champion")
    try:
        start = endpoint.start()
        result = run_wrk(wrk, f"{endpoint.info.url}/invocations", script, 8, 5)
        rss, peak = endpoint.rss_mb()
    finally:
        endpoint.stop()
        os.environ["MLFLOW_TRACKING_URI"] = saved
    return {"start_to_ready_s": start, "rss_mb": rss, "rss_peak_mb": peak, "rps": result["rps"]}


def bench_batching(args, wrk: str, work: Path, tracking_uri: str) -> dict:
    name = "bench-heavy"
    version = register(tracking_uri, name, (64, 2048, 2048, 2048, 2048, 10), work)
    body = json.dumps({"inputs": np.random.default_rng(2).normal(size=(1, 64)).round(6).tolist()})
    script = wrk_script(work / "post-heavy.lua", body)
    result = {
        "model": f"{name} v{version} (64->2048x4->10 MLP)",
        "connections": args.batch_connections,
    }
    configs = {
        "unbatched": {},
        "batched": {
            "max_batch_size": args.max_batch_size,
            "max_batch_delay_ms": args.max_batch_delay_ms,
        },
    }
    endpoints = {
        key: OurEndpoint(work, f"heavy-{key}", model=f"{name}@champion", **options)
        for key, options in configs.items()
    }
    try:
        for endpoint in endpoints.values():
            endpoint.start()
            check_answer(endpoint.info.url, body)
        targets = {key: f"{e.info.url}/invocations" for key, e in endpoints.items()}
        result.update(measure_rounds(wrk, targets, script, args.batch_connections, args))
    finally:
        for endpoint in endpoints.values():
            endpoint.stop()
    for key, options in configs.items():
        result[key]["settings"] = options
    result["ratio"] = result["batched"]["rps"] / result["unbatched"]["rps"]
    return result


# --- report ------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Serving benchmarks",
        "",
        f"Produced by `make bench` (`python bench/serve_bench.py`) on {results['date']}: "
        f"{m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}. "
        "Load generator: `wrk` (Debian package) on the same machine, one thread, "
        'batch-1 JSON `{"inputs": [[64 floats]]}` POSTed to `/invocations`; '
        "our endpoint has metrics on (every request counted and timed). "
        f"Each figure is the median of {results['rounds']} runs of {results['duration']} s, "
        "the servers measured in turn within each round.",
        "",
    ]
    v = results.get("vs_mlflow")
    if v:
        ours = v["ours"]
        lines += [
            f"## Endpoint vs `mlflow models serve --env-manager local` ({v['model']}, "
            f"{results['connections']} connections)",
            "",
            "| server | requests/s | p50 ms | p99 ms | non-2xx | resident MB |",
            "|---|---:|---:|---:|---:|---:|",
            f"| onnxflow endpoint | {ours['rps']:,.0f} | {ours['p50_ms']:.2f} | "
            f"{ours['p99_ms']:.2f} | {ours['non_2xx']} | {ours['rss_mb']:.0f} "
            f"(peak {ours['rss_peak_mb']:.0f}) |",
        ]
        if "mlflow" in v:
            t = v["mlflow"]
            lines.append(
                f"| mlflow models serve | {t['rps']:,.0f} | {t['p50_ms']:.2f} | "
                f"{t['p99_ms']:.2f} | {t['non_2xx']} | {t['rss_mb']:.0f} "
                f"(uvicorn worker {t['rss_worker_mb']:.0f}) |"
            )
            lines += [
                "",
                f"**Ratio: {v['ratio']:.1f}×** the requests/s of mlflow models serve (goal ≥ 10×).",
            ]
        starts = v["start_to_ready_s"]
        sq = v["sqlite_registry"]
        lines += [
            "",
            f"Start to ready with the model cached (process start to first 200 on "
            f"`/v2/health/ready`, 3 restarts): {', '.join(f'{s:.2f}' for s in starts)} s "
            f"(goal < 3 s). Goals: p99 < 5 ms, resident memory < 150 MB.",
            "",
            "The registry sits behind a local `mlflow server` (the production set-up): the "
            "endpoint resolves the alias over MLflow's REST API and never imports MLflow. "
            "Pointed at the SQLite file directly, it needs MLflow's client and SQLAlchemy "
            f"in process: start to ready {sq['start_to_ready_s']:.2f} s, resident "
            f"{sq['rss_mb']:.0f} MB, {sq['rps']:,.0f} requests/s (one 5 s run).",
            "",
            f"wrk: `{ours['command']}`",
        ]
    b = results.get("batching")
    if b:
        lines += [
            "",
            f"## Dynamic batching ({b['model']}, {b['connections']} connections)",
            "",
            "| endpoint | requests/s | p50 ms | p99 ms | non-2xx |",
            "|---|---:|---:|---:|---:|",
        ]
        for key in ("unbatched", "batched"):
            r = b[key]
            label = (
                key
                if not r["settings"]
                else (
                    f"batched (max {r['settings']['max_batch_size']} rows, "
                    f"{r['settings']['max_batch_delay_ms']} ms)"
                )
            )
            lines.append(
                f"| {label} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r['non_2xx']} |"
            )
        lines += [
            "",
            f"**Batched / unbatched: {b['ratio']:.1f}×** (goal ≥ 4×; the in-process "
            "ceiling quoted in the issue is 6.9×).",
        ]
    lines += [
        "",
        "## Notes",
        "",
        "* Run to run, `mlflow models serve` varied between about 750 and 1,450 requests/s "
        "on this shared machine (other work running), so the ratio moved with it (8.7× to "
        "15.7× in the runs made while building the endpoint); the issue measured 880.",
        "* Where the endpoint's time goes (py-spy, strace, under this load): one event-loop "
        "process at 100 % of a core, one `read` and one `write` system call per request "
        "(headers and body go out in one write, see `serving/http.py`), onnxruntime about "
        "10 % of the CPU, the rest uvicorn's and our per-request Python.",
        "* Batching runs one merged batch at a time on one onnxruntime thread while the event "
        "loop parses the next requests; unbatched runs use two worker threads.",
        "",
        "Raw figures: `bench-results/results.json`. Regenerate this page from them with "
        "`python bench/serve_bench.py --report-only`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server (median)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--batch-connections", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    parser.add_argument("--skip-mlflow", action="store_true", help="only our endpoint")
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--only-batching", action="store_true")
    parser.add_argument(
        "--install-tools",
        "--install-wrk",
        dest="install_wrk",
        action="store_true",
        help="apt-get install wrk when it is missing",
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from the last results.json, run nothing",
    )
    args = parser.parse_args()

    if args.report_only:
        results = json.loads((args.workdir / "results.json").read_text())
        args.output.write_text(report(results))
        print(report(results))
        return
    wrk = ensure_tool("wrk", "wrk", "HTTP load generator", args.install_wrk)
    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    os.environ.pop("ONNXFLOW_SERVE_TOKEN", None)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "connections": args.connections,
        "duration": args.duration,
        "rounds": args.rounds,
    }
    server, tracking_uri = start_tracking_server(
        work, "--artifacts-destination", str(work / "artifacts")
    )
    try:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        if not args.only_batching:
            results["vs_mlflow"] = bench_vs_mlflow(args, wrk, work, tracking_uri)
        if not args.skip_batching:
            results["batching"] = bench_batching(args, wrk, work, tracking_uri)
    finally:
        stop_group(server)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Start-up and memory of the endpoint: seconds from start to ready, and resident memory of
its whole process tree once ready, with the served models already in the cache.

Two registry set-ups, each measured ``--runs`` times (median, min and max printed):

* ``sqlite``: ``MLFLOW_TRACKING_URI=sqlite:///...`` (the ``make demo`` path, no server);
* ``server``: a local ``mlflow server`` on the same store (the production set-up).

With ``--models N`` (and an endpoint that serves several models), the same figures for
1..N models in one process, to show the cost per extra model.

    python bench/startup_bench.py [--runs 5] [--models 1] [--output docs/startup.md]

Ready is the first 200 on ``/v2/health/ready``; the clock starts when the process is
spawned. Memory is the sum of VmRSS over the endpoint and every descendant (a registry
helper process counts while it lives), read once ready and again 2 s later (reported).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import register_mlp, start_tracking_server, stop_group  # noqa: E402
from onnxflow.serving.launcher import free_port, start_background, stop_background  # noqa: E402
from onnxflow.serving.settings import ServingSettings  # noqa: E402


def tree_rss_mb(pid: int) -> float:
    """Resident MB of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        ppid = int(fields["PPid"].strip())
        children.setdefault(ppid, []).append(int(entry.name))
        rss[int(entry.name)] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo.extend(children.get(current, []))
    return total / 1024


def register_models(tracking_uri: str, count: int, work: Path) -> list[str]:
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    names = []
    for i in range(count):
        name = f"startup-{i}"
        example = np.random.default_rng(i).normal(size=(1, 64)).astype(np.float32)
        register_mlp(work / "models" / name, name, i, example)
        names.append(name)
    return names


def serves_several_models() -> bool:
    return hasattr(ServingSettings, "model_references")  # model: "a@champion,b@champion"


def settings_for(names: list[str], work: Path) -> ServingSettings:
    refs = [f"{n}@champion" for n in names]
    return ServingSettings(
        model=",".join(refs),
        port=free_port(),
        cache_dir=work / "cache",
        log_level="warning",
        poll_interval_s=10,
    )


def one_start(settings: ServingSettings, state: Path) -> dict:
    info = start_background(settings, state)
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=2) as http:
            while True:
                try:
                    if http.get(f"{info.url}/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not ready after 120 s; see {info.log_path}")
                time.sleep(0.01)
        ready_s = time.time() - info.started_at
        at_ready = tree_rss_mb(info.pid)
        time.sleep(2)
        settled = tree_rss_mb(info.pid)
    finally:
        stop_background(state)
    return {"ready_s": ready_s, "rss_at_ready_mb": at_ready, "rss_mb": settled}


def measure(label: str, names: list[str], runs: int, work: Path) -> dict:
    settings = settings_for(names, work)
    state = work / f"state-{label}"
    one_start(settings, state)  # fills the cache; not counted
    samples = [one_start(settings, state) for _ in range(runs)]
    summary = {"label": label, "models": len(names), "runs": samples}
    for key in ("ready_s", "rss_mb", "rss_at_ready_mb"):
        values = [s[key] for s in samples]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    print(
        f"{label:>10} {len(names)} model(s): ready {summary['ready_s']['median']:.2f} s "
        f"(min {summary['ready_s']['min']:.2f}, max {summary['ready_s']['max']:.2f}), "
        f"tree RSS {summary['rss_mb']['median']:.0f} MB (min {summary['rss_mb']['min']:.0f}"
        f", max {summary['rss_mb']['max']:.0f})",
        flush=True,
    )
    return summary


def report(results: dict) -> str:
    lines = [
        "# Endpoint start-up and memory",
        "",
        f"{results['date']}, {results['machine']}; `python bench/startup_bench.py "
        f"--runs {results['runs']} --models {results['max_models']}`.",
        "",
        "Start to ready: process spawn to the first 200 on `/v2/health/ready`, models in "
        "the cache. Memory: VmRSS summed over the endpoint's process tree 2 s after ready. "
        f"Median of {results['runs']} starts (min-max). Load average (1 min) at the start "
        f"and end: {results.get('load', ['?', '?'])[0]} and {results.get('load', ['?', '?'])[1]}"
        " (times stretch with it; memory does not).",
        "",
        "| registry | models | start to ready (s) | process tree RSS (MB) |",
        "|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        r, m = row["ready_s"], row["rss_mb"]
        lines.append(
            f"| {row['label']} | {row['models']} | {r['median']:.2f} "
            f"({r['min']:.2f}-{r['max']:.2f}) | {m['median']:.0f} "
            f"({m['min']:.0f}-{m['max']:.0f}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="starts per set-up (median)")
    parser.add_argument(
        "--models",
        type=int,
        default=1,
        help="also measure 2..N models in one endpoint (if it serves several)",
    )
    parser.add_argument("--only", choices=("sqlite", "server"), help="one registry set-up")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-results" / "startup")
    parser.add_argument(
        "--output", type=Path, default=None, help="write the Markdown table here too"
    )
    args = parser.parse_args()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.pop("ONNXFLOW_SERVE_TOKEN", None)
    counts = [1]
    if args.models > 1:
        if serves_several_models():
            counts = sorted({1, 2, args.models})  # the cost per extra model
        else:
            print("this endpoint serves one model: measuring 1 model only")
    sqlite_uri = f"sqlite:///{work / 'mlflow.db'}"
    load_at_start = round(os.getloadavg()[0], 1)
    import platform

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "runs": args.runs,
        "max_models": max(counts),
        "rows": [],
    }
    server, server_uri = start_tracking_server(  # no job runner: a dozen processes fewer
        work,
        "--default-artifact-root",
        str(work / "artifacts"),
        timeout=300,  # a loaded 2-core machine
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # registers through it: one store
    try:
        names = register_models(server_uri, max(counts), work)
        for label, uri in (("server", server_uri), ("sqlite", sqlite_uri)):
            if args.only and args.only != label:
                continue
            os.environ["MLFLOW_TRACKING_URI"] = uri
            for count in counts:
                results["rows"].append(measure(label, names[:count], args.runs, work))
    finally:
        stop_group(server)
    results["load"] = [load_at_start, round(os.getloadavg()[0], 1)]
    (work / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    if args.output:
        args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

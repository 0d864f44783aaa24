"""How long the demo pipeline takes, and how much of it is Prefect and MLflow.

Runs, each in a fresh process and a fresh temporary folder:

1. ``steps``: the plain step functions (data, then train → export → simplify → validate
   for torch and keras) with no Prefect and no MLflow: the work itself.
2. ``flow``: ``onnxflow run --framework both`` exactly as ``make demo`` runs it (Prefect's
   temporary server, MLflow SQLite store, registration, promotion), without --deploy.

Prints both wall times and the difference, which is what orchestration and tracking
cost. The machine is shared: run it when it is quiet and read the medians.

    python bench/pipeline_bench.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import BIN, timed_run  # noqa: E402

STEPS = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from onnxflow.config import PipelineConfig
from onnxflow.data import prepare_data
from onnxflow.simplify import simplify_model
from onnxflow.sources import TableSource, validate_sourced
cfg, out, times = PipelineConfig(), Path("out"), {}
def step(name, fn, *args):
    t = time.perf_counter()
    result = fn(*args)
    times[name] = time.perf_counter() - t
    return result
ds = step("data", prepare_data, cfg.data, out / "data")
for fw in ("torch", "keras"):
    src = TableSource(framework=fw, dataset=ds, train_config=cfg.train, export_config=cfg.export)
    tr = step(f"{fw} train", src.train, out / fw / "train")
    ex = step(f"{fw} export", src.export, tr, out / fw)
    si = step(f"{fw} simplify", simplify_model, ex.exported.path, cfg.simplify, out / fw / "s")
    step(f"{fw} validate", validate_sourced, src, ex, si.path, cfg.validate_, out / fw / "validate")
times["total in process"] = time.perf_counter() - t0
print("RESULT " + json.dumps(times))
"""


def timed(cmd: list[str], cwd: Path, prefect_home: Path) -> tuple[float, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db",
        "PREFECT_HOME": str(prefect_home),
        "PYTHONPATH": str(ROOT),
    }
    return timed_run(cmd, cwd, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--fresh-prefect",
        action="store_true",
        help="give each flow run a new PREFECT_HOME (first-run database migration included)",
    )
    args = parser.parse_args()
    steps_walls, flow_walls, breakdown = [], [], None
    prefect_home = Path(tempfile.mkdtemp(prefix="onnxflow-prefect-"))
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            wall, out = timed([str(BIN / "python"), "-c", STEPS], Path(tmp), prefect_home)
            steps_walls.append(wall)
            breakdown = json.loads(out.split("RESULT ", 1)[1])
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp) / "prefect-home" if args.fresh_prefect else prefect_home
            cmd = [str(BIN / "onnxflow"), "run", "--framework", "both"]
            wall, _ = timed(cmd, Path(tmp), home)
            flow_walls.append(wall)
        print(
            f"run {i + 1}: steps only {steps_walls[-1]:.1f} s, onnxflow run {flow_walls[-1]:.1f} s",
            flush=True,
        )
    s, f = statistics.median(steps_walls), statistics.median(flow_walls)
    print("\nstep times in the last steps-only run (s):")
    for name, seconds in breakdown.items():
        print(f"  {name:<18} {seconds:6.2f}")
    print(
        f"\nmedian of {args.repeats}: steps only {s:.1f} s | onnxflow run (make demo without "
        f"--deploy) {f:.1f} s | Prefect + MLflow overhead {f - s:.1f} s ({(f - s) / f:.0%})"
    )


if __name__ == "__main__":
    main()

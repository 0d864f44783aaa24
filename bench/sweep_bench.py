"""Wall time of ``--framework all`` and of an 8-trial sweep on 1 vs 2 Dask workers.

Runs, one after the other, each as the ``onnxflow`` command in a fresh temporary folder
(own MLflow SQLite store, one shared PREFECT_HOME so only the first run migrates it):

1. ``onnxflow run --framework all`` (chains one after the other, the default settings:
   what ``make demo`` trains);
2. ``onnxflow run --framework all --dask`` (chains side by side on a local 2-worker cluster);
3. ``onnxflow run --sweep 8 --dask-workers 1``;
4. ``onnxflow run --sweep 8 --dask-workers 2``.

The sweeps train the small CNN for ``--epochs`` epochs and search the learning rate with
Optuna's seeded random sampler and no pruning, so that both sweeps train the same eight
models and differ only in how many workers train them.

Prints the wall times and the 2-vs-1-worker ratio of the sweep, and writes them into
docs/benchmarks.md between the sweep-bench markers, with the load average at the start
(the machine is shared: figures swing with it).

    python bench/sweep_bench.py [--trials 8] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import BIN, timed_run  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
START = "<!-- sweep-bench:start -->"
END = "<!-- sweep-bench:end -->"


def timed(args: list[str], work: Path, prefect_home: Path) -> tuple[float, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "PREFECT_HOME": str(prefect_home),
        "ONNXFLOW_PREFECT_SERVER": "temporary",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("ONNXFLOW_DASK_ADDRESS", None)
    cmd = [str(BIN / "onnxflow"), "run", *args]
    return timed_run(cmd, work, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=30, help="train.epochs of a trial")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    load = os.getloadavg()
    prefect_home = Path(tempfile.mkdtemp(prefix="onnxflow-prefect-"))
    cases = {
        "all": ["--framework", "all"],
        "all_dask": ["--framework", "all", "--dask"],
        "sweep_1": ["--sweep", str(args.trials), "--dask-workers", "1"],
        "sweep_2": ["--sweep", str(args.trials), "--dask-workers", "2"],
    }
    results: dict[str, object] = {"trials": args.trials, "epochs": args.epochs, "load": load}
    for name, case in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if name.startswith("sweep"):
                config = work / "sweep.yaml"
                config.write_text(json.dumps(sweep_config(args.epochs)))
                case = [*case, "--config", str(config)]
            wall, out = timed(case, work, prefect_home)
        results[name] = wall
        summary = re.search(r"sweep \S+: (.*)", out)
        if summary:
            results[f"{name}_trials"] = summary.group(1)
        print(f"{' '.join(cases[name]):<40} {wall:7.1f} s", flush=True)
    results["ratio"] = results["sweep_1"] / results["sweep_2"]
    print(f"sweep: 1 worker / 2 workers = {results['ratio']:.2f}x")
    (ROOT / "bench-results").mkdir(exist_ok=True)
    (ROOT / "bench-results" / "sweep.json").write_text(json.dumps(results, indent=2))
    if not args.no_write:
        write_report(results)


def sweep_config(epochs: int) -> dict:
    return {
        "train": {"epochs": epochs, "model": "cnn"},
        "sweep": {
            "space": {"learning_rate": {"low": 3e-4, "high": 3e-3, "log": True}},
            "sampler": "random",
            "pruning": False,
        },
    }


def write_report(r: dict) -> None:
    load = ", ".join(f"{x:.1f}" for x in r["load"])
    text = f"""{START}
## Chains and sweeps on Dask (`make bench-sweep`)

`python bench/sweep_bench.py --trials {r["trials"]} --epochs {r["epochs"]}`: each row is
the whole `onnxflow run` command (temporary Prefect server, MLflow SQLite store, data,
training, export, validation, registration, promotion), in one run of the script on this
2-core machine, load average {load} (1/5/15 min) at the start: the machine was shared with
other work, so read the ratio more than the seconds. `--framework all` trains the default
settings (torch and Keras MLPs, 30 epochs, and scikit-learn). Each sweep trains the same
eight small CNNs (`train: {{model: cnn, epochs: {r["epochs"]}}}`, learning rate from Optuna's
seeded random sampler, no pruning) and registers the best.

| command | wall time |
|---|---|
| `run --framework all` (chains one after the other) | {r["all"]:.1f} s |
| `run --framework all --dask` (chains on 2 local Dask workers) | {r["all_dask"]:.1f} s |
| `run --sweep {r["trials"]} --dask-workers 1` | {r["sweep_1"]:.1f} s |
| `run --sweep {r["trials"]} --dask-workers 2` | {r["sweep_2"]:.1f} s |

Sweep on 1 worker / on 2 workers: **{r["ratio"]:.2f}x** (1 worker:
{r.get("sweep_1_trials", "-")}; 2 workers: {r.get("sweep_2_trials", "-")}). Each Dask worker
is a fresh single-threaded process that imports torch, Prefect and MLflow before its first
trial, and every trial also pays its task run, MLflow child run and Optuna storage round
trips; on 2 cores shared with the Prefect server, the flow and other work, two workers can
at best halve the training part.
{END}"""
    doc = DOC.read_text()
    if START in doc:
        doc = doc.split(START)[0] + text + doc.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    DOC.write_text(doc)
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

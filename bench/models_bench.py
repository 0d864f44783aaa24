"""Figures for the example recipes, full size, through the whole chain (``make bench-models``).

For each example in ``examples/``: the chain runs as ``onnxflow run --recipe`` runs it (a
temporary Prefect server, a SQLite MLflow store in a temporary folder), then:

* train, export and simplify figures, parity and test accuracy from the registered version;
* onnxruntime vs the source framework (the saved model, on CPU), median ms per call at
  batch 1 and 32, the two measured in interleaved rounds so both see the same machine load;
* the endpoint serving the version: requests/s at 8 connections, each a tritonclient HTTP
  client sending one test row as binary tensor data, for ``--seconds`` seconds.

Prints one Markdown table (paste it into docs/benchmarks.md) and writes it to
``test-results/models-bench.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import run_threads  # noqa: E402

EXAMPLES = {
    "images": "examples/images/recipe.py",
    "text": "examples/text/recipe.py",
    "keras_tabular": "examples/keras_tabular/recipe.py",
}


def interleaved_medians(fns: dict, feeds: dict, rounds: int) -> dict[str, float]:
    """Median ms per call of each fn, calling them in turn each round (after a warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(3):
            fn(feeds)
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn(feeds)
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(t) * 1000) for name, t in times.items()}


def requests_per_second(
    url: str, model: str, row: dict[str, np.ndarray], seconds: float, connections: int = 8
) -> float:
    import tritonclient.http as triton

    datatypes = {"float32": "FP32", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}
    counts = [0] * connections
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        inputs = []
        for name, array in row.items():
            inputs.append(triton.InferInput(name, list(array.shape), datatypes[str(array.dtype)]))
            inputs[-1].set_data_from_numpy(array, binary_data=True)
        outputs = [triton.InferRequestedOutput("probabilities", binary_data=True)]
        while time.monotonic() < stop:
            client.infer(model, inputs, outputs=outputs)
            counts[i] += 1
        client.close()

    return sum(counts) / run_threads(worker, connections)


def bench_one(name: str, recipe: str, work: Path, seconds: float, rounds: int) -> dict[str, str]:
    import onnxruntime as ort

    from onnxflow.arrays import read_split
    from onnxflow.config import PipelineConfig
    from onnxflow.flows.pipeline import run
    from onnxflow.processes import free_port
    from onnxflow.recipes import with_recipe_defaults
    from onnxflow.recipes.steps import recipe_reference
    from onnxflow.serving.launcher import start_background, stop_background, wait_ready
    from onnxflow.serving.settings import ServingSettings

    model_name = f"bench-{name.replace('_', '-')}"
    config = with_recipe_defaults(
        PipelineConfig.model_validate(
            {"recipe": str(ROOT / recipe), "register": {"model_name": model_name}}
        )
    )
    started = time.perf_counter()
    result = run(config=config, out_dir=work / name)
    chain_seconds = time.perf_counter() - started
    chain = result.chains[0]
    tags = chain.version.tags

    dataset_dir = work / name / "data"
    from onnxflow.arrays import ArrayDataset, read_dataset_info

    dataset = ArrayDataset(path=dataset_dir / "splits.npz", info=read_dataset_info(dataset_dir))
    inputs, _ = read_split(dataset, "test")
    reference = recipe_reference(chain.trained, dataset.info)
    session = ort.InferenceSession(str(chain.simplified.path), providers=["CPUExecutionProvider"])
    latency = {}
    for batch in (1, 32):
        feeds = {k: np.resize(v, (batch, *v.shape[1:])).astype(v.dtype) for k, v in inputs.items()}
        medians = interleaved_medians(
            {"onnx": lambda f: session.run(None, f), "framework": reference}, feeds, rounds
        )
        latency[batch] = medians

    settings = ServingSettings(
        model=f"{model_name}@champion", port=free_port(), cache_dir=work / "cache"
    )
    info = start_background(settings, work / f"endpoint-{name}")
    try:
        wait_ready(info, timeout_s=120)
        rps = requests_per_second(
            info.url, model_name, {k: v[:1] for k, v in inputs.items()}, seconds
        )
    finally:
        stop_background(work / f"endpoint-{name}")

    return {
        "example": name,
        "framework": chain.framework,
        "parameters": f"{int(chain.trained.params['n_parameters']):,}",
        "train s": f"{chain.trained.train_seconds:.0f}",
        "export s": f"{chain.exported.export_seconds:.1f}",
        "nodes (before → after)": f"{chain.simplified.nodes_before} → "
        f"{chain.simplified.nodes_after}",
        "parity max abs / rel": f"{tags['parity_max_abs']} / {tags['parity_max_rel']}",
        "test accuracy (onnx)": f"{float(tags['accuracy']):.2%}",
        "model MB": f"{chain.validation.model_bytes / 1e6:.2f}",
        "b1 ms ort / fw": f"{latency[1]['onnx']:.3f} / {latency[1]['framework']:.3f}",
        "b32 ms ort / fw": f"{latency[32]['onnx']:.2f} / {latency[32]['framework']:.2f}",
        "endpoint req/s (8 conn)": f"{rps:,.0f}",
        "whole chain s": f"{chain_seconds:.0f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        choices=sorted(EXAMPLES),
        action="append",
        help="Bench only this example (repeatable).",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="Load per endpoint.")
    parser.add_argument("--rounds", type=int, default=30, help="Interleaved latency rounds.")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Prefect's temporary server may take longer than its default 20 s on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    rows = []
    with tempfile.TemporaryDirectory(prefix="models-bench-") as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        os.chdir(work)  # MLflow's artifact root ./mlruns lands here
        for name in args.only or EXAMPLES:
            print(f"--- {name}: the whole chain, full size", file=sys.stderr, flush=True)
            rows.append(bench_one(name, EXAMPLES[name], work, args.seconds, args.rounds))
            print(rows[-1], file=sys.stderr, flush=True)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    out = ROOT / "test-results"
    out.mkdir(exist_ok=True)
    (out / "models-bench.md").write_text(table)


if __name__ == "__main__":
    main()

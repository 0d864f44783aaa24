"""Training throughput of onnxflow's torch loop (``make bench-train``).

On one generated image folder (the images example's shapes), the same model, batch size
and epochs, each run in a process of its own:

* **built-in, in memory**: onnxflow's loop (:func:`onnxflow.recipes.torch_recipe.fit`) on
  the folder decoded into memory (``data.stream: false``);
* **built-in, streamed**: the same loop, the folder decoded per batch by
  ``train.loader_workers`` DataLoader workers (``data.stream: true``);
* **tuned**: a hand-written loop with the data resident on the device as tensors, indices
  shuffled on the device, bf16 autocast and channels_last on CUDA, no per-step sync.

Figures: training samples/s (the mean of the epochs after the first, which pays for
start-up); CPU time per training sample (trainer and loader workers together, validation
passes included: on a shared machine this moves far less than wall time); the peak RSS
of the training process (VmHWM) and the peak PSS of its whole process tree (sampled from
the parent). Each mode runs ``--rounds`` times in turn; the fastest run is kept, and the
streamed ratio is also given as the median of the rounds' own ratios (paired runs).

On CUDA (when torch sees one: ``--device auto``) the defaults are ResNet-18 on
12,000 64x64 images in bf16; on CPU a small CNN on 3,000 32x32 images in fp32 (ResNet-18
runs at ~40 images/s on two cores). Prints a Markdown table and writes it to
``test-results/train-bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODES = ("builtin-memory", "builtin-streamed", "tuned")


def build_model(name: str, n_classes: int):
    import torch

    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(weights=None, num_classes=n_classes)

    def block(c_in: int, c_out: int):
        return [
            torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(c_out),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        ]

    return torch.nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        *block(64, 128),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(128, n_classes),
    )


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM")) / 1024


def run_builtin(args, dataset) -> list[float]:
    from onnxflow.config import TrainConfig
    from onnxflow.recipes.steps import training_data
    from onnxflow.recipes.torch_recipe import fit, resolve_device

    device = resolve_device(args.device)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        learning_rate=1e-3,
        precision=args.precision,
        loader_workers=args.workers,
    ).on_device(device)
    model = build_model(args.model, dataset.info.n_classes).to(device)
    rates: list[float] = []
    fit(
        model,
        training_data(dataset),
        dataset.info,
        config,
        device,
        lambda epoch, metrics: rates.append(metrics["train_samples_per_second"]),
    )
    return rates


def run_tuned(args, dataset) -> list[float]:
    """The data as tensors on the device, shuffled there; bf16 + channels_last on CUDA."""
    import numpy as np
    import torch

    from onnxflow.arrays import read_split
    from onnxflow.recipes.torch_recipe import autocast_dtype, optimizer_step, resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(0)
    cuda = device == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format

    def resident(split: str):
        inputs, labels = read_split(dataset, split)
        x = torch.from_numpy(np.ascontiguousarray(inputs["image"])).to(device)
        return x.contiguous(memory_format=layout), torch.from_numpy(labels).long().to(device)

    x, y = resident("train")
    x_val, y_val = resident("validation")
    model = build_model(args.model, dataset.info.n_classes).to(device, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = autocast_dtype(args.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator(device=device).manual_seed(0)
    rates = []
    for _ in range(args.epochs):
        started = time.perf_counter()
        model.train()
        total = torch.zeros((), device=device)
        order = torch.randperm(len(y), device=device, generator=generator)
        for start in range(0, len(y), args.batch):
            rows = order[start : start + args.batch]
            with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn(model(x[rows]).float(), y[rows])
            optimizer_step(loss, optimizer, scaler)
            total += loss.detach()
        total.item()
        rates.append(len(y) / (time.perf_counter() - started))
        model.eval()  # the validation pass the built-in loop makes too
        with (
            torch.no_grad(),
            torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None),
        ):
            correct = sum(
                (model(x_val[i : i + 256]).argmax(1) == y_val[i : i + 256]).sum()
                for i in range(0, len(y_val), 256)
            )
        correct.item()
    return rates


def child(args) -> None:
    """One mode in this process: its samples/s per epoch and peak RSS, as one JSON line."""
    import gc

    from onnxflow.arrays import ArrayDataset

    dataset = ArrayDataset.model_validate_json(Path(args.dataset).read_text())
    run = run_tuned if args.mode == "tuned" else run_builtin
    before = cpu_seconds()
    rates = run(args, dataset)
    gc.collect()  # the loaders go, their workers are joined: their CPU time is counted
    cpu = cpu_seconds() - before
    per_sample = cpu / (args.epochs * dataset.info.n_train)
    print(json.dumps({"mode": args.mode, "rates": rates, "rss": peak_rss_mb(), "cpu": per_sample}))


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (loader workers):
    unlike wall time, it hardly changes with other work on the machine."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare(args, work: Path) -> dict[str, Path]:
    """The image folder, and its in-memory and streamed datasets (as JSON files)."""
    import importlib.util

    from onnxflow.arrays import load_image_folder, prepare_arrays
    from onnxflow.config import DataConfig
    from onnxflow.stream_plan import stream_data

    spec = importlib.util.spec_from_file_location("shapes", ROOT / "examples/images/recipe.py")
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    started = time.perf_counter()
    folder = shapes.generate(work / "shapes", per_class=args.images // 3, size=args.size)
    print(f"{args.images} PNGs of {args.size}x{args.size} in {time.perf_counter() - started:.0f} s")
    config = DataConfig(path=folder, image_size=args.size, sample_rows=256)
    memory = prepare_arrays(load_image_folder(folder, config), config, work / "memory")
    streamed = stream_data(folder, config.model_copy(update={"stream": True}), work / "stream", "")
    paths = {}
    for name, dataset in (("builtin-memory", memory), ("builtin-streamed", streamed)):
        paths[name] = work / f"{name}.json"
        paths[name].write_text(dataset.model_dump_json())
    paths["tuned"] = paths["builtin-memory"]
    return paths


def run_child(args, mode: str, dataset: Path) -> dict:
    """One mode in a process of its own, its process tree's memory sampled from here."""
    from bench._common import PeakMemory

    command = [sys.executable, __file__, "--mode", mode, "--dataset", str(dataset)]
    for key in ("device", "model", "images", "size", "epochs", "batch", "workers", "precision"):
        command += [f"--{key}", str(getattr(args, key))]
    if args.threads:
        command += ["--threads", str(args.threads)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as peak:
        out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"{mode} failed:\n{err[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "tree_pss": peak.pss_mb}


def _mean(rates: list[float]) -> float:
    """Samples/s of the epochs after the first (which pays for start-up and warm-up)."""
    later = rates[1:] or rates
    return sum(later) / len(later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", choices=["small", "resnet18"])
    parser.add_argument("--images", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int)
    parser.add_argument(
        "--workers", type=int, help="loader workers (streamed); default onnxflow's: 0 on CPU"
    )
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    parser.add_argument(
        "--threads", type=int, help="torch threads of the trainer (default: torch's own)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each mode; best kept, ratios paired"
    )
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    defaults = (
        {
            "model": "resnet18",
            "images": 12000,
            "size": 64,
            "batch": 256,
            "precision": "bf16",
        }
        if cuda
        else {
            "model": "small",
            "images": 3000,
            "size": 32,
            "batch": 64,
            "precision": "fp32",
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:  # onnxflow's default for the device
        from onnxflow.config import TrainConfig

        args.workers = TrainConfig().on_device("cuda" if cuda else "cpu").loader_workers
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode:
        child(args)
        return

    device = "cuda" if cuda else "cpu"
    results: dict[str, dict] = {}
    # in-memory / streamed samples/s of each round: the two ran back to back, under the
    # same load, so their ratio moves less than either figure
    paired: list[float] = []
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        paths = prepare(args, Path(tmp))
        for round_ in range(args.rounds):
            this_round = {}
            for mode in MODES:  # in turn, so that each mode sees the machine's load alike
                result = this_round[mode] = run_child(args, mode, paths[mode])
                print(f"round {round_ + 1} {mode}: {result}", flush=True)
                best = results.get(mode)
                if best is None or _mean(result["rates"]) > _mean(best["rates"]):
                    results[mode] = result
            paired.append(
                _mean(this_round["builtin-memory"]["rates"])
                / _mean(this_round["builtin-streamed"]["rates"])
            )

    def rate(mode: str) -> float:
        return _mean(results[mode]["rates"])

    title = (
        f"{args.model} on {args.images:,} {args.size}x{args.size} images, batch {args.batch}, "
        f"{args.epochs} epochs, {device} ({torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores), {args.precision}"
        + (f", {torch.cuda.get_device_name()}" if cuda else "")
    )
    rows = [
        "| loop | data | samples/s | vs tuned | CPU ms per sample | peak RSS of the trainer, "
        "MB | peak PSS of trainer + workers, MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "builtin-memory": ("onnxflow's", "in memory"),
        "builtin-streamed": ("onnxflow's", f"streamed, {args.workers} workers"),
        "tuned": ("tuned by hand", "resident on the device"),
    }
    for mode in MODES:
        loop, data = labels[mode]
        result = results[mode]
        rows.append(
            f"| {loop} | {data} | {rate(mode):,.0f} | {rate(mode) / rate('tuned'):.2f}x | "
            f"{result['cpu'] * 1000:.2f} | {result['rss']:.0f} | {result['tree_pss']:.0f} |"
        )
    ratio = rate("builtin-memory") / rate("builtin-streamed")
    cpu_ratio = results["builtin-streamed"]["cpu"] / results["builtin-memory"]["cpu"]
    table = "\n".join(
        [
            f"**{title}**",
            "",
            *rows,
            "",
            f"Streamed vs in memory: in-memory samples/s / streamed = {ratio:.2f}x "
            f"(fastest runs), {statistics.median(paired):.2f}x (median of the "
            f"{len(paired)} rounds' ratios: " + ", ".join(f"{r:.2f}" for r in paired) + "; "
            "target: at most 1.2x on CPU); CPU time per sample, streamed / in memory = "
            f"{cpu_ratio:.2f}x. Load average at the end: "
            + ", ".join(f"{v:.1f}" for v in os.getloadavg())
            + ".",
        ]
    )
    print("\n" + table)
    out_dir = ROOT / "test-results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "train-bench.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

"""Figures for ``onnxflow convert --to tensorflow`` (``make bench-convert``).

For each case, in its own folder and SQLite registry under ``--work``: the pipeline runs
as a user runs it (``onnxflow run``; skipped when the folder already holds a champion),
then ``onnxflow convert NAME champion --to tensorflow`` (the recipes with ``--sample`` of
their own generated data, as their versions record one input row); report.json gives the row:
conversion time, sizes, parity of the SavedModel and the TFLite file against onnxruntime
on the version's sample, and latency (median of 20 calls) of onnxruntime, TensorFlow and
TFLite at batch 1 and 32. Prints a markdown table (docs/benchmarks.md holds it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONNXFLOW = str(Path(sys.executable).with_name("onnxflow"))
CASES = {
    "digits": ("digits", ["--framework", "torch"]),
    "images": ("shapes", ["--recipe", str(ROOT / "examples/images/recipe.py")]),
    "text": ("tokens", ["--recipe", str(ROOT / "examples/text/recipe.py")]),
}


def run_case(case: str, work: Path, epochs: int | None) -> dict:
    name, args = CASES[case]
    folder = work / case
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if not (folder / "mlflow.db").exists():
        extra = ["--epochs", str(epochs)] if epochs else []
        with open(folder / "run.log", "w") as log:
            subprocess.run(
                [ONNXFLOW, "run", *args, *extra],
                cwd=folder,
                env=env,
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    out = folder / f"convert-{int(time.time())}"
    sample = SAMPLES[case](folder / "sample.npz") if case in SAMPLES else None
    extra = ["--sample", str(sample)] if sample else []
    with open(folder / "convert.log", "w") as log:
        done = subprocess.run(
            [ONNXFLOW, "convert", name, "champion", "--to", "tensorflow", "--out", str(out)]
            + extra,
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    report_path = out / "report.json"
    if not report_path.exists():
        return {"case": case, "error": (folder / "convert.log").read_text()[-500:]}
    report = json.loads(report_path.read_text())
    report["case"], report["exit"] = case, done.returncode
    return report


def text_sample(path: Path) -> Path:
    """The last 256 sequences of the text recipe's generated data (ids, mask)."""
    import numpy as np

    data = np.load(ROOT / "examples/text/data/tokens.npz", allow_pickle=True)
    np.savez(path, ids=data["ids"][-256:], mask=data["mask"][-256:])
    return path


def images_sample(path: Path) -> Path:
    """The last 22 images of each class, read as onnxflow's image-folder loader reads them."""
    import numpy as np
    from PIL import Image

    folder = ROOT / "examples/images/data/shapes"
    images = [
        np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
        for name in ("circle", "square", "triangle")
        for f in sorted((folder / name).glob("*.png"))[-22:]
    ]
    np.savez(path, image=np.stack(images))
    return path


#: A recipe version records a one-row input example only: parity on more of its own data.
SAMPLES = {"text": text_sample, "images": images_sample}


def row(report: dict) -> str:
    if "figures" not in report:
        error = report.get("error") or report.get("worker", {}).get("error", "?")
        return f"| {report['case']} | failed: {' '.join(str(error).split())[:200]} |" + " |" * 8
    f, p = report["figures"], report["parity_max_abs"]
    lat = f["latency_ms"]

    def ms(kind: str, batch: int) -> str:
        value = lat[kind][f"batch_{batch}"]
        return f"{value:.3f}" if isinstance(value, float) else "n/a"

    mib = 1024 * 1024
    batch = "; ".join(f"{k}: {v.split(':')[0]}" for k, v in f["batch"].items())
    return (
        f"| {report['case']} | {f['convert_seconds']:.0f} s | {f['onnx_bytes'] / mib:.2f} / "
        f"{f['savedmodel_bytes'] / mib:.2f} / {f['tflite_bytes'] / mib:.2f} | "
        f"{p['tensorflow']:.2g} | {p['tflite']:.2g} | {ms('onnxruntime', 1)} / "
        f"{ms('tensorflow', 1)} / {ms('tflite', 1)} | {ms('onnxruntime', 32)} / "
        f"{ms('tensorflow', 32)} / {ms('tflite', 32)} | {report['rows']} | {batch} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("artifacts/convert-bench"))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--epochs", type=int, default=None, help="Override training epochs.")
    options = parser.parse_args()
    rows = [row(run_case(c, options.work.resolve(), options.epochs)) for c in options.cases]
    print(
        "| model | convert | size MiB (ONNX / SavedModel / TFLite) | TF max abs | TFLite max abs "
        "| ms batch 1 (ORT / TF / TFLite) | ms batch 32 (ORT / TF / TFLite) | rows | batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""The validation report: ``report.json`` for machines, ``report.md`` and PNG plots for a
reviewer (they reach the MLflow run under ``validation/``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from onnxflow.interface import declared
from onnxflow.onnxfiles import model_size, onnx_digest
from onnxflow.validation.checks import Check
from onnxflow.validation.timing import LATENCY_BATCHES


def model_section(model_path: Path, proto, opset: int) -> dict[str, Any]:
    """What the report says about the model file: digest, size, opset, its interface."""
    return {
        "path": str(model_path),
        "sha256": onnx_digest(model_path),
        "bytes": model_size(model_path),
        "opset": opset,
        "ir_version": proto.ir_version,
        "inputs": [_described(v) for v in proto.graph.input],
        "outputs": [_described(v) for v in proto.graph.output],
    }


def _described(value) -> dict[str, Any]:
    tensor = declared(value)
    return {"name": tensor.name, "type": tensor.dtype, "shape": list(tensor.shape)}


def write_report(
    checks: list[Check], report: dict[str, Any], out_dir: Path, plots: list[str] | None = None
) -> tuple[Path, list[str]]:
    """Write ``report.json`` and ``report.md``; the JSON's path and the failed checks' lines."""
    failures = [c.line for c in checks if not c.passed]
    report = {
        "passed": not failures,
        "failures": failures,
        "checks": [asdict(c) for c in checks],
        **report,
        "plots": plots or [],
    }
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    return json_path, failures


def markdown(report: dict[str, Any]) -> str:
    model, metric = report["model"], report.get("metric")
    lines = [
        f"# Validation report: {'PASSED' if report['passed'] else 'FAILED'}",
        "",
        f"* model: `{model['path']}` (opset {model['opset']}, IR {model['ir_version']}, "
        f"{model['bytes']:,} bytes, sha256 `{model['sha256'][:16]}…`)",
        f"* framework: {report['framework']['name']} (`{report['framework']['path']}`)",
        f"* data: {report['dataset']['name']} {report['dataset']['split']} split, "
        f"{report['dataset']['rows']} rows, "
        f"digest `{report['dataset']['digest']}`",
        "",
        "## Checks",
        "",
        "| | check | result |",
        "|---|---|---|",
    ]
    for check in report["checks"]:
        detail = check["detail"].replace("|", "\\|")
        lines.append(f"| {'✓' if check['passed'] else '✗'} | {check['name']} | {detail} |")
    lines += ["", "## Figures", "", "| figure | framework | onnxruntime |", "|---|---|---|"]
    if metric:
        lines.append(f"| {metric['name']} | {metric['framework']:.4f} | {metric['onnx']:.4f} |")
    latency = report.get("latency_ms", {})
    for key in [*(f"b{b}" for b in LATENCY_BATCHES), "sample"]:
        if f"onnx_{key}" in latency:
            fw_ms = latency.get(f"framework_{key}")
            label = f"batch {key[1:]}" if key != "sample" else "the whole sample"
            lines.append(
                f"| latency {label}, median ms | "
                f"{'-' if fw_ms is None else f'{fw_ms:.3f}'} | "
                f"{latency[f'onnx_{key}']:.3f} |"
            )
    for name, parity in report.get("parity", {}).items():
        lines.append(
            f"| `{name}` max abs / max rel diff | | "
            f"{parity['max_abs']:.3g} / {parity['max_rel']:.3g} |"
        )
    if report.get("parity_note"):
        lines += ["", f"**Parity not checked**: {report['parity_note']}."]
    if report.get("batch_axis") == "none":
        lines += [
            "",
            "**No dynamic batch axis**: served without batching; batch consistency not checked.",
        ]
    if report["plots"]:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def plots(
    out_dir: Path,
    task: str,
    class_names: Sequence[str],
    y: np.ndarray,
    framework_out: np.ndarray,
    onnx_out: np.ndarray,
    latency: dict[str, float],
) -> list[str]:
    """PNG files for a reviewer; matplotlib's Agg canvas, no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        written.append(name)

    fw, ox = framework_out.reshape(-1), onnx_out.reshape(-1)
    if fw.shape == ox.shape:
        fig = Figure(figsize=(9, 4))
        scatter, hist = fig.subplots(1, 2)
        scatter.scatter(fw, ox, s=4, alpha=0.5)
        low, high = float(min(fw.min(), ox.min())), float(max(fw.max(), ox.max()))
        scatter.plot([low, high], [low, high], color="grey", linewidth=0.8)
        scatter.set(xlabel="framework", ylabel="onnxruntime", title="output parity (test split)")
        diff = np.abs(fw.astype(np.float64) - ox.astype(np.float64))
        hist.hist(np.log10(diff + 1e-12), bins=50)
        hist.set(
            xlabel="log10 |onnx - framework| (+1e-12)",
            ylabel="values",
            title=f"max abs diff {diff.max():.3g}",
        )
        save(fig, "parity.png")

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    positions = np.arange(len(LATENCY_BATCHES))
    for offset, who in ((-0.2, "framework"), (0.2, "onnx")):
        ax.bar(
            positions + offset,
            [latency[f"{who}_b{b}"] for b in LATENCY_BATCHES],
            width=0.4,
            label="onnxruntime" if who == "onnx" else "framework",
        )
    ax.set_xticks(positions, [f"batch {b}" for b in LATENCY_BATCHES])
    ax.set(ylabel="median ms per call", title="latency")
    ax.legend()
    save(fig, "latency.png")

    if task == "classification":
        n = len(class_names)
        matrix = np.zeros((n, n), dtype=int)
        np.add.at(matrix, (y, onnx_out.argmax(axis=1)), 1)
        fig = Figure(figsize=(5.5, 5))
        ax = fig.subplots()
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if count > matrix.max() / 2 else "black",
                )
        ax.set_xticks(range(n), list(class_names), rotation=90 if n > 12 else 0)
        ax.set_yticks(range(n), list(class_names))
        ax.set(xlabel="predicted (onnxruntime)", ylabel="true", title="confusion matrix (test)")
        save(fig, "confusion_matrix.png")
    else:
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        ax.scatter(y, ox, s=6, alpha=0.6)
        low, high = float(min(y.min(), ox.min())), float(max(y.max(), ox.max()))
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
        ax.set(xlabel="true", ylabel="predicted (onnxruntime)", title="predictions (test)")
        save(fig, "predictions.png")
    return written


def _json_safe(value: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value

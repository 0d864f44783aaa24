"""quantize: an int8 copy of a validated model with onnxruntime's quantization tools,
kept only if it loses at most ``max_accuracy_drop`` on the test split.

Weights are quantized per channel: the standardisation folded into a first layer scales
its rows by ``1 / std``, and one scale per tensor cost the MLPs ~40 accuracy points.

* ``dynamic``: ``quantize_dynamic``: int8 weights, activations quantized at run time.
* ``static``: ``quantize_static`` in QDQ format: int8 weights and activations, with ranges
  calibrated on ``calibration_rows`` rows of the training split (never the test split the
  gate measures on).

The report (``report.json``, ``report.md``) holds the metric, size and latency before and
after; it is written before the gate raises :class:`QuantizationError`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from onnxflow.config import QuantizeConfig
from onnxflow.errors import QuantizationError
from onnxflow.interface import INPUT_NAME
from onnxflow.onnxfiles import model_size, node_count
from onnxflow.results import DatasetArtifact, QuantizedModel
from onnxflow.runtime import open_session
from onnxflow.validation.timing import LATENCY_BATCHES, latencies

log = logging.getLogger(__name__)


def quantize_model(
    model_path: Path, dataset: DatasetArtifact, config: QuantizeConfig, out_dir: Path
) -> QuantizedModel:
    """Write ``out_dir/model.onnx`` (int8) and the report; raise QuantizationError when the
    metric drops more than allowed. Never modifies ``model_path``."""
    from onnxflow.data import load_splits

    if config.mode == "off":
        raise QuantizationError("quantize_model called with mode 'off'")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.onnx"
    splits = load_splits(dataset)
    try:
        _quantize(Path(model_path), target, config, splits["X_train"][: config.calibration_rows])
    except Exception as exc:  # onnxruntime.quantization raises many types
        raise QuantizationError(
            f"{config.mode} quantization of {model_path} failed: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        ) from exc

    X, y = splits["X_test"], splits["y_test"]
    before, after = _runner(model_path), _runner(target)
    feeds = {INPUT_NAME: X}
    float_out, quant_out = before(feeds)[0], after(feeds)[0]
    classification = dataset.info.task == "classification"
    if classification:
        name = "accuracy"
        float_metric = float(np.mean(float_out.argmax(axis=1) == y))
        quant_metric = float(np.mean(quant_out.argmax(axis=1) == y))
        drop, allowed = float_metric - quant_metric, config.max_accuracy_drop
    else:
        name = "rmse"
        float_metric = float(np.sqrt(np.mean((float_out.reshape(-1) - y) ** 2)))
        quant_metric = float(np.sqrt(np.mean((quant_out.reshape(-1) - y) ** 2)))
        drop, allowed = quant_metric - float_metric, config.max_accuracy_drop * float_metric
    latency = latencies({"float": before, "quantized": after}, feeds, config.latency_repeats)
    result = QuantizedModel(
        path=target,
        mode=config.mode,
        report_dir=out_dir,
        metric_name=name,
        float_metric=float_metric,
        quantized_metric=quant_metric,
        drop=drop,
        max_abs_diff=float(np.max(np.abs(quant_out.astype(np.float64) - float_out))),
        bytes_before=model_size(Path(model_path)),
        bytes_after=model_size(target),
        latency_ms=latency,
    )
    passed = drop <= allowed + 1e-12
    _write_report(result, Path(model_path), allowed, passed, out_dir)
    log.info(
        "quantize (%s): %s %.4f -> %.4f, %d -> %d bytes, b1 %.3f -> %.3f ms: %s",
        config.mode,
        name,
        float_metric,
        quant_metric,
        result.bytes_before,
        result.bytes_after,
        latency["float_b1"],
        latency["quantized_b1"],
        "kept" if passed else "refused",
    )
    if not passed:
        what = "lost" if classification else "gained"
        raise QuantizationError(
            f"{config.mode} quantization {what} {drop:.4f} {name} ({float_metric:.4f} -> "
            f"{quant_metric:.4f}), more than the allowed {allowed:.4g}; not registered. "
            f"Report: {out_dir / 'report.json'}"
        )
    return result


def quantization_tags(result: QuantizedModel) -> dict[str, str]:
    """Version tags of a quantized model (on top of its float parent's lineage)."""
    return {
        "quantized": result.mode,
        "validation": "passed",
        "metric_name": result.metric_name,
        result.metric_name: f"{result.quantized_metric:.6g}",
        f"framework_{result.metric_name}": f"{result.float_metric:.6g}",
        "quantize_drop": f"{result.drop:.4g}",
        "parity_max_abs": f"{result.max_abs_diff:.3g}",
        "parity_against": "the float ONNX model",
        "model_bytes": str(result.bytes_after),
        "model_bytes_float": str(result.bytes_before),
        "latency_ms_onnx_b1": f"{result.latency_ms['quantized_b1']:.4g}",
        "latency_ms_float_b1": f"{result.latency_ms['float_b1']:.4g}",
        "nodes_after": str(node_count(result.path)),
    }


def _quantize(source: Path, target: Path, config: QuantizeConfig, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name("prepared.onnx")
    try:  # shape inference + optimisation, as onnxruntime recommends before quantizing
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        source = prepared
    except Exception as exc:  # the raw model quantizes too, just less well
        log.warning("quantize: pre-processing failed (%s); quantizing the model as it is", exc)
    if config.mode == "dynamic":
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
        return

    class TrainingRows(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(calibration[i : i + 16] for i in range(0, len(calibration), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.rows, None)
            return None if batch is None else {INPUT_NAME: batch.astype(np.float32)}

    quantize_static(
        str(source),
        str(target),
        TrainingRows(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    prepared.unlink(missing_ok=True)


def _runner(path: Path):
    """The model as a function of its feeds (``{features: X}``) -> its outputs."""
    session = open_session(path)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(None, feeds)

    return run


def _write_report(
    result: QuantizedModel, source: Path, allowed: float, passed: bool, out_dir: Path
) -> None:
    report: dict[str, Any] = {
        "passed": passed,
        "mode": result.mode,
        "float_model": str(source),
        "quantized_model": str(result.path),
        "metric": {
            "name": result.metric_name,
            "float": result.float_metric,
            "quantized": result.quantized_metric,
            "drop": result.drop,
            "allowed": allowed,
        },
        "max_abs_diff": result.max_abs_diff,
        "bytes": {"float": result.bytes_before, "quantized": result.bytes_after},
        "latency_ms": result.latency_ms,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lat = result.latency_ms
    lines = [
        f"# Quantization report ({result.mode}): {'KEPT' if passed else 'REFUSED'}",
        "",
        "| figure | float | int8 |",
        "|---|---|---|",
        f"| {result.metric_name} (test split) | {result.float_metric:.4f} | "
        f"{result.quantized_metric:.4f} |",
        f"| size, bytes | {result.bytes_before:,} | {result.bytes_after:,} |",
        *(
            f"| latency batch {b}, median ms | {lat[f'float_b{b}']:.3f} | "
            f"{lat[f'quantized_b{b}']:.3f} |"
            for b in LATENCY_BATCHES
        ),
        "",
        f"Change: {result.drop:+.4f} {result.metric_name} "
        f"({'loss' if result.metric_name == 'accuracy' else 'increase'}; allowed {allowed:.4g}); "
        f"max abs output difference {result.max_abs_diff:.3g}.",
    ]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")

"""convert --to tensorflow|tflite: an ONNX model into a SavedModel and a TFLite file.

    resolve (download, sample) ─► converter venv: onnx2tf ─► SavedModel + model_float32.tflite
        ─► both run on the sample there ─► parity here against onnxruntime ─► report
        ─► a registry version: files, report and tags logged on the version's run

onnx2tf runs in its own venv (:mod:`onnxflow.converter_env`); onnxflow never imports
TensorFlow for this. One onnx2tf run writes both files, so both are checked, whichever
``--to`` names: the SavedModel through its ``serving_default`` signature, the TFLite file
through the ``ai_edge_litert`` interpreter. Parity uses the same tolerances as the torch
conversion (atol 1e-4, rtol 1e-3 by default).

Layout: the model's own. onnx2tf turns NCHW inputs into NHWC unless told otherwise; the
inputs are passed as ``keep_shape_absolutely_input_names``, so the SavedModel and the TFLite
file take exactly the arrays the ONNX model takes (same shapes, same sample, same clients),
and no transpose needs recording anywhere. The price is a Transpose inside the graph
before the first convolution, which the latency figures include.

Names: inputs keep the ONNX names; onnx2tf names the SavedModel's outputs ``output_0``,
``output_1``... in ONNX output order, and the report maps them to the ONNX names.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from onnxflow.convert import ConvertConfig, compare_outputs, resolve_source
from onnxflow.errors import ConversionError
from onnxflow.results import ConvertedModel
from onnxflow.runtime import open_session
from onnxflow.validation.checks import Check

log = logging.getLogger(__name__)

KINDS = ("tensorflow", "tflite")


def convert_to_tensorflow(
    model: str | Path, config: ConvertConfig, out_dir: Path, sample: Path | None = None
) -> ConvertedModel:
    """Convert ``model`` (registry URI or ``.onnx`` path) with onnx2tf into
    ``out_dir/tensorflow/saved_model`` (+ ``model_float32.tflite``), check both against
    onnxruntime on the sample, write ``report.json``; for a registry version, log the files
    and the report on its run and tag it. ConversionError naming the operator onnx2tf
    stopped at, or every failed check."""
    from onnxflow.converter_env import run_worker

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, feeds, sample_name = resolve_source(str(model), out_dir / "source", sample)
    feeds = {k: v[: config.max_rows] for k, v in feeds.items()}
    if any(v.dtype == object for v in feeds.values()):
        raise ConversionError(f"{model} takes string inputs, which onnx2tf does not convert")
    np.savez(out_dir / "feeds.npz", **feeds)
    work_dir = out_dir / "tensorflow"
    worker = run_worker(onnx_path, work_dir, out_dir / "feeds.npz")
    report_path = out_dir / "report.json"
    report = {"source": str(model), "onnx_path": str(onnx_path), "sample": sample_name}
    if not worker.get("ok"):
        operator = worker.get("operator")
        report.update(passed=False, worker=worker)
        report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        _log_on_version(str(model), report_path, None, {"tf_conversion": "failed"})
        raise ConversionError(
            f"onnx2tf could not convert {model}"
            + (f": operator {operator}" if operator else "")
            + f" ({worker.get('error', 'no error recorded')}); log: {work_dir / 'worker.log'}"
        )

    session = open_session(onnx_path)
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feeds), strict=True))
    checks: list[Check] = []
    parity: dict[str, dict[str, dict[str, float]]] = {}
    for kind in KINDS:
        found = dict(np.load(work_dir / f"outputs_{kind}.npz"))
        missing = [n for n in names if n not in found]
        if missing:
            checks.append(Check(f"{kind} outputs", False, f"no {missing}"))
        more, parity[kind] = compare_outputs(found, expected, config, kind)
        checks += more
    for check in checks:
        (log.info if check.passed else log.warning)(
            "\t%s %s", "✓" if check.passed else "✗", check.line
        )
    saved = Path(worker["saved_model"])
    tflite = Path(worker["tflite"])
    rows = min((len(v) for v in feeds.values() if v.ndim), default=1)
    failures = [c.line for c in checks if not c.passed]
    max_abs = {k: max((p["max_abs"] for p in parity[k].values()), default=math.nan) for k in KINDS}
    figures = {
        "convert_seconds": worker.get("convert_seconds"),
        "savedmodel_bytes": _size(saved) - _size(tflite),
        "tflite_bytes": _size(tflite),
        "onnx_bytes": sum(_size(f) for f in onnx_path.parent.glob(f"{onnx_path.name}*")),
        "latency_ms": {"onnxruntime": _ort_latencies(session, feeds), **worker["latency_ms"]},
        "batch": worker.get("batch", {}),
    }
    report.update(
        passed=not failures,
        failures=failures,
        checks=[c.__dict__ for c in checks],
        saved_model=str(saved),
        tflite=str(tflite),
        inputs=worker["inputs"],
        outputs=worker["outputs"],
        savedmodel_output_names={f"output_{i}": n for i, n in enumerate(worker["outputs"])},
        layout="as the ONNX model (keep_shape_absolutely_input_names): no transpose",
        rows=rows,
        parity=parity,
        parity_max_abs=max_abs,
        figures=figures,
        tolerances=config.model_dump(),
        converter=worker.get("versions", {}),
    )
    report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if failures:
        _log_on_version(str(model), report_path, None, {"tf_conversion": "parity failed"})
        raise ConversionError(
            f"{len(failures)} check(s) failed converting {model} to TensorFlow:\n"
            + "\n".join(f"  ✗ {f}" for f in failures)
            + f"\nReport: {report_path}"
        )
    tags = {
        "tf_conversion": "passed",
        "tf_parity_max_abs": f"{max_abs['tensorflow']:.3g}",
        "tflite_parity_max_abs": f"{max_abs['tflite']:.3g}",
        "tf_converter": worker.get("versions", {}).get("onnx2tf", "onnx2tf"),
    }
    _log_on_version(str(model), report_path, work_dir, tags)
    kind = "tflite" if config.to == "tflite" else "tensorflow"
    return ConvertedModel(
        source=str(model),
        onnx_path=onnx_path,
        path=tflite if kind == "tflite" else saved,
        artifact_format="tflite" if kind == "tflite" else "savedmodel",
        dynamic_batch=figures["batch"].get(kind) == "dynamic",
        sample=sample_name,
        rows=rows,
        parity=parity[kind],
        parity_max_abs=max_abs[kind],
        report_path=report_path,
        seconds=time.perf_counter() - started,
        figures={**figures, "parity_max_abs": max_abs, "tflite_path": str(tflite)},
    )


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _ort_latencies(session, feeds, repeats: int = 20) -> dict[str, float]:
    """Median ms per call at batch 1 and 32, measured as the worker measures TF/TFLite."""
    figures = {}
    for batch in (1, 32):
        part = {k: np.resize(v, (batch, *v.shape[1:])).astype(v.dtype) for k, v in feeds.items()}
        try:
            session.run(None, part)
        except Exception as exc:  # a fixed-batch model
            figures[f"batch_{batch}"] = f"not run: {type(exc).__name__}"
            continue
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            session.run(None, part)
            times.append(time.perf_counter() - began)
        figures[f"batch_{batch}"] = float(np.median(times) * 1000)
    return figures


def _log_on_version(uri: str, report: Path, files: Path | None, tags: dict[str, str]) -> None:
    """The report (and the converted files) on the version's run, under
    ``converted/tensorflow``; ``tags`` on the version. Nothing for a file path."""
    if not uri.startswith("models:/"):
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    name, _, ref = uri.removeprefix("models:/").partition("@")
    if ref:
        version = client.get_model_version_by_alias(name, ref)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number)
    target = "converted/tensorflow"
    if version.run_id:
        client.log_artifact(version.run_id, str(report), target)
        if files is not None:
            for part in ("saved_model",):
                client.log_artifacts(version.run_id, str(files / part), f"{target}/{part}")
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    log.info(
        "logged the conversion on %s version %s (run %s)", name, version.version, version.run_id
    )

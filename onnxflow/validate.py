"""validate: the ONNX model against its framework original, on the held-out test split.

Modelled on optimum's ``validate_model_outputs``: check the interface (names, then
shapes), then values against declared tolerances; log one ✓/✗ line per check; collect
every failure; write the report (``report.json``, ``report.md``, plots); then raise one
:class:`ValidationError` if anything failed.

Definitions used by the checks:

* **max abs diff** of an output: ``max |onnx - framework|`` over all its elements.
* **max rel diff**: ``max |onnx - framework| / |framework|`` over the elements whose
  reference ``|framework| > atol``. Below that the ratio says nothing (a probability of
  1e-9 that comes out as 2e-9 is "100 % off" yet harmless); the absolute check covers them.
  With no such element it is 0.
* **accuracy drop** (classification): framework accuracy minus ONNX accuracy, a fraction
  (argmax of the probabilities). For regression the ONNX RMSE may exceed the framework's by at
  most ``max_accuracy_drop`` *relative* to it, since RMSE has the target's units.
* **batch consistency**: the first rows of the test split, each run alone (batch 1), against
  the same rows run in batches of ``batch_size``, both through onnxruntime.
* **runtime support**: the model's default-domain opset and IR version against the highest
  the installed onnxruntime registers (its operator schemas, mapped to an IR version with
  ``onnx.helper.VERSION_TABLE``); creating the session is the final word.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxflow.config import ValidateConfig
from onnxflow.data import load_splits
from onnxflow.errors import ValidationError
from onnxflow.frameworks import INPUT_NAME, get_adapter, output_name
from onnxflow.onnxfiles import model_size, onnx_digest
from onnxflow.results import DatasetArtifact, DatasetInfo, TrainedModel, ValidationSummary

log = logging.getLogger(__name__)

LATENCY_BATCHES = (1, 32)
#: Rows run one at a time in the batch-consistency check (enough to see a batching bug).
BATCH_ONE_ROWS = 256
_WARMUP_RUNS = 3
_PROVIDERS = ["CPUExecutionProvider"]


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    @property
    def line(self) -> str:
        return f"{self.name}: {self.detail}"


def validate_model(
    model_path: Path,
    trained: TrainedModel,
    dataset: DatasetArtifact,
    config: ValidateConfig,
    out_dir: Path,
) -> ValidationSummary:
    """Run every check on the test split, write the report into ``out_dir``, then raise
    :class:`ValidationError` naming each failed check, or return the summary."""
    import onnx

    model_path = Path(model_path)
    info = dataset.info
    splits = load_splits(dataset)
    X, y = splits["X_test"], splits["y_test"]
    out_dir.mkdir(parents=True, exist_ok=True)

    proto = onnx.load(str(model_path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    report: dict[str, Any] = {
        "model": _model_section(model_path, proto, opset),
        "framework": {"name": trained.framework, "path": str(trained.path)},
        "dataset": {"name": info.name, "digest": info.digest, "split": "test", "rows": len(y)},
        "tolerances": config.model_dump(),
    }
    checks: list[Check] = []

    def record(check: Check) -> None:
        checks.append(check)
        if check.passed:
            log.info("\t✓ %s", check.line)
        else:
            log.warning("\t✗ %s", check.line)

    log.info("validating %s against %s on %d test rows", model_path, trained.path, len(y))
    record(_check_runtime_support(opset, proto.ir_version, report))
    session, load_check = _open_session(model_path)
    record(load_check)
    record(_check_input(proto, info))
    record(_check_output_names(proto, info))
    if session is None or len(session.get_inputs()) != 1 or not session.get_outputs():
        return _finish(checks, report, out_dir, None)  # nothing can be run: raises

    run_onnx = _onnx_runner(session, session.get_inputs()[0].name)
    try:
        onnx_out = run_onnx(X)
    except Exception as exc:  # onnxruntime's Fail/InvalidArgument/RuntimeException
        record(Check("onnxruntime runs the test split", False, " ".join(str(exc).split())[:300]))
        return _finish(checks, report, out_dir, None)
    framework = get_adapter(trained.framework).load_predictor(trained.path)
    reference = {output_name(info.task): framework(X)}
    # pair outputs by name; a misnamed single output is still compared (its name check failed)
    by_name = dict(zip([o.name for o in session.get_outputs()], onnx_out, strict=True))
    outputs = {name: by_name.get(name, onnx_out[0]) for name in reference}

    parity = {}
    for name, expected in reference.items():
        found = outputs[name]
        shape_check = _check_shape(name, proto, found, expected, info)
        record(shape_check)
        if shape_check.passed:
            parity[name] = _parity(found, expected, config.atol)
            record(_check_abs(name, parity[name], config.atol))
            record(_check_rel(name, parity[name], config.rtol))
    report["parity"] = parity
    record(_check_batches(lambda feeds: run_onnx(next(iter(feeds.values()))),
                          {INPUT_NAME: X}, config, report))
    if len(parity) < len(reference):
        return _finish(checks, report, out_dir, None)  # wrong shapes: no metric to compare

    main = output_name(info.task)
    metric_check, metric = _check_metric(info, y, reference[main], outputs[main], config)
    record(metric_check)
    report["metric"] = metric

    latency = _latencies(framework, run_onnx, X, config.latency_repeats)
    report["latency_ms"] = latency
    log.info("latency (median ms): %s",
             ", ".join(f"{k} {v:.3f}" for k, v in latency.items()))

    plots = _plots(out_dir, info, y, reference[main], outputs[main], latency)
    summary = ValidationSummary(
        report_dir=out_dir,
        passed=all(c.passed for c in checks),
        metric_name=metric["name"],
        framework_metric=metric["framework"],
        onnx_metric=metric["onnx"],
        parity_max_abs=max((p["max_abs"] for p in parity.values()), default=math.inf),
        parity_max_rel=max((p["max_rel"] for p in parity.values()), default=math.inf),
        latency_ms=latency,
        opset=opset,
        ir_version=proto.ir_version,
        model_bytes=report["model"]["bytes"],
    )
    return _finish(checks, report, out_dir, summary, plots)


def validate_imported(
    model_path: Path,
    feeds: dict[str, np.ndarray],
    config: ValidateConfig,
    out_dir: Path,
    *,
    source: dict[str, str],
    sample: dict[str, Any],
    reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None = None,
    expected: dict[str, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
) -> ValidationSummary:
    """Validate any ONNX model on its sample: every input and output, any tensor type.

    Parity is per output, by name: against ``reference`` (the source framework's outputs,
    in the ONNX model's output order) when there is one, else against ``expected`` (given
    outputs), else it is not checked and the report says so. Float outputs are compared
    against atol/rtol, every other type must be equal. Batch-1 vs batch-N consistency runs
    only when every input and output has a dynamic first axis. ``source``: ``name``,
    ``path``, ``format`` of the imported file; ``sample``: ``name``, ``digest``, ``rows``.
    ``labels`` (class indices of the sample's rows, with a ``reference``): the accuracy of
    the first output's argmax through onnxruntime and the reference is the summary's
    metric, and may drop at most ``max_accuracy_drop``.
    """
    import onnx

    model_path = Path(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(model_path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    dynamic_batch = has_dynamic_batch(proto)
    report: dict[str, Any] = {
        "model": _model_section(model_path, proto, opset),
        "framework": dict(source),
        "dataset": {"split": "sample", **sample},
        "tolerances": config.model_dump(),
        "batch_axis": "dynamic" if dynamic_batch else "none",
    }
    checks: list[Check] = []

    def record(check: Check) -> None:
        checks.append(check)
        (log.info if check.passed else log.warning)("\t%s %s", "✓" if check.passed else "✗",
                                                     check.line)

    log.info("validating %s (imported from %s) on %s", model_path, source.get("path"),
             sample.get("name"))
    record(_check_runtime_support(opset, proto.ir_version, report))
    session, load_check = _open_session(model_path)
    record(load_check)
    if session is None:
        return _finish(checks, report, out_dir, None)
    record(Check("inputs fit the sample", True, ", ".join(
        f"{k} {v.dtype} {list(v.shape)}" for k, v in feeds.items())))
    output_names = [o.name for o in session.get_outputs()]

    def run_onnx(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(output_names, batch)

    try:
        outputs = dict(zip(output_names, run_onnx(feeds), strict=True))
    except Exception as exc:  # onnxruntime's Fail/InvalidArgument/RuntimeException
        record(Check("onnxruntime runs the sample", False, " ".join(str(exc).split())[:300]))
        return _finish(checks, report, out_dir, None)

    wanted, compared_with = None, None
    if reference is not None:
        produced = reference(feeds)
        compared_with = source.get("name", "framework")
        if len(produced) != len(output_names):
            record(Check("output count", False, f"{compared_with} gives {len(produced)} "
                         f"outputs, the ONNX model {len(output_names)} ({output_names})"))
        else:
            wanted = dict(zip(output_names, (np.asarray(p) for p in produced), strict=True))
    elif expected:
        wanted, compared_with = dict(expected), "expected outputs"
    parity: dict[str, dict[str, float]] = {}
    unequal = 0
    if wanted is None and reference is None:
        why = ("a bare ONNX model has no framework to compare with, and no expected outputs "
               "were given (--expected)")
        report["parity_checked"], report["parity_note"] = False, why
        record(Check("parity", True, f"not checked: {why}"))
    elif wanted is not None:
        report["parity_checked"] = True
        report["parity_against"] = compared_with
        for name, reference_out in wanted.items():
            found = outputs[name]
            if found.shape != reference_out.shape:
                record(Check(f"output {name!r} shape", False,
                             f"onnx {list(found.shape)}, {compared_with} "
                             f"{list(reference_out.shape)}"))
                continue
            record(Check(f"output {name!r} shape", True, f"{list(found.shape)} {found.dtype}"))
            if found.dtype.kind in "fc" and reference_out.dtype.kind in "fciub":
                parity[name] = _parity(found, reference_out, config.atol)
                record(_check_abs(name, parity[name], config.atol))
                record(_check_rel(name, parity[name], config.rtol))
            else:
                same = _equal_values(found, reference_out)
                differ = int(found.size - same)
                unequal += differ
                parity[name] = {"max_abs": 0.0 if not differ else math.inf, "max_rel": 0.0,
                                "mean_abs": 0.0, "rel_elements": 0, "non_finite": 0,
                                "unequal": differ}
                record(Check(f"output {name!r}", not differ,
                             f"{found.dtype} values: {differ} of {found.size} differ"))
        if len(wanted) < len(output_names):
            report["outputs_not_compared"] = [n for n in output_names if n not in wanted]
    report["parity"] = parity
    record(_check_batches(run_onnx, feeds, config, report, dynamic_batch))
    metric = None
    if labels is not None and wanted is not None and output_names[0] in wanted:
        first = output_names[0]
        metric_check, metric = _check_accuracy(labels, wanted[first], outputs[first], config)
        record(metric_check)
        report["metric"] = metric

    latency = _sample_latencies(reference, run_onnx, feeds, dynamic_batch,
                                config.latency_repeats)
    report["latency_ms"] = latency
    checked = bool(parity)
    max_abs = max((p["max_abs"] for p in parity.values()), default=math.nan)
    summary = ValidationSummary(
        report_dir=out_dir,
        passed=all(c.passed for c in checks),
        metric_name=metric["name"] if metric else IMPORT_METRIC,
        framework_metric=metric["framework"] if metric else 0.0 if checked else math.nan,
        onnx_metric=metric["onnx"] if metric else max_abs,
        parity_max_abs=max_abs,
        parity_max_rel=max((p["max_rel"] for p in parity.values()), default=math.nan),
        latency_ms=latency,
        opset=opset,
        ir_version=proto.ir_version,
        model_bytes=report["model"]["bytes"],
    )
    return _finish(checks, report, out_dir, summary)


#: What an imported model's summary reports as its metric: there are no labels to score.
IMPORT_METRIC = "parity_max_abs"


def has_dynamic_batch(proto) -> bool:
    """Every graph input and output has a first axis, and it is symbolic (not fixed)."""
    values = [*proto.graph.input, *proto.graph.output]
    initializers = {t.name for t in proto.graph.initializer}
    for value in values:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return bool(values)


def _model_section(model_path: Path, proto, opset: int) -> dict[str, Any]:
    return {
        "path": str(model_path),
        "sha256": onnx_digest(model_path),
        "bytes": model_size(model_path),
        "opset": opset,
        "ir_version": proto.ir_version,
        "inputs": [_declared(v) for v in proto.graph.input],
        "outputs": [_declared(v) for v in proto.graph.output],
    }


def _equal_values(found: np.ndarray, expected: np.ndarray) -> int:
    """How many elements are equal (strings compared as text, bytes decoded)."""
    if found.dtype.kind in "OUS" or expected.dtype.kind in "OUS":
        def text(a):
            return np.array([x.decode() if isinstance(x, bytes) else str(x)
                             for x in a.reshape(-1)], dtype=object)
        return int(np.sum(text(found) == text(expected)))
    return int(np.sum(found == expected))


def _sample_latencies(reference, run_onnx, feeds: dict[str, np.ndarray], dynamic_batch: bool,
                      repeats: int) -> dict[str, float]:
    """Median ms per call on one row and (with a dynamic batch axis) on 32 rows."""
    figures = {}
    sizes = LATENCY_BATCHES if dynamic_batch else (None,)
    for batch in sizes:
        if batch is None:
            rows, key = feeds, "sample"
        else:
            rows = {k: np.resize(v, (batch, *v.shape[1:])).astype(v.dtype) for k, v in feeds.items()}
            key = f"b{batch}"
        if reference is not None:
            figures[f"framework_{key}"] = median_ms(reference, rows, repeats)
        figures[f"onnx_{key}"] = median_ms(run_onnx, rows, repeats)
    return figures


# -- checks ----------------------------------------------------------------------------


def onnxruntime_limits() -> tuple[int | None, int | None]:
    """Highest default-domain opset and IR version the installed onnxruntime knows, or
    ``(None, None)`` when this build does not expose its operator schemas."""
    import onnx

    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        schemas = ort_c.get_all_operator_schema()
    except (ImportError, AttributeError, RuntimeError):
        return None, None
    max_opset = max(s.since_version for s in schemas if s.domain in ("", "ai.onnx"))
    max_ir = max((row[1] for row in onnx.helper.VERSION_TABLE if row[2] <= max_opset),
                 default=None)
    return max_opset, max_ir


def _check_runtime_support(opset: int, ir_version: int, report: dict[str, Any]) -> Check:
    import onnxruntime as ort

    max_opset, max_ir = onnxruntime_limits()
    report["onnxruntime"] = {"version": ort.__version__, "max_opset": max_opset,
                             "max_ir_version": max_ir}
    name = f"opset/IR supported by onnxruntime {ort.__version__}"
    if max_opset is None:
        return Check(name, True, f"opset {opset}, IR {ir_version} (limits not exposed; "
                                 "loading the session decides)")
    passed = opset <= max_opset and (max_ir is None or ir_version <= max_ir)
    relation = "<=" if passed else "exceeds"
    return Check(name, passed,
                 f"opset {opset}, IR {ir_version} {relation} max opset {max_opset}, IR {max_ir}")


def _open_session(model_path: Path):
    import onnxruntime as ort

    name = "onnxruntime loads the model"
    try:
        session = ort.InferenceSession(str(model_path), providers=_PROVIDERS)
    except Exception as exc:  # onnxruntime raises Fail/InvalidGraph/... with the reason
        return None, Check(name, False, " ".join(str(exc).split())[:300])
    return session, Check(name, True, f"providers {session.get_providers()}")


def _check_input(proto, info: DatasetInfo) -> Check:
    import onnx

    expected = [(INPUT_NAME, "FLOAT", ["batch?", info.n_features])]
    found = [(v.name, onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
              _dims(v, symbolic="batch?")) for v in proto.graph.input]
    passed = found == expected
    return Check(f"input {INPUT_NAME!r}", passed,
                 f"{_fmt(found)}" + ("" if passed else f", expected {_fmt(expected)} "
                                    "(batch? = a dynamic axis)"))


def _check_output_names(proto, info: DatasetInfo) -> Check:
    expected = [output_name(info.task)]
    found = [v.name for v in proto.graph.output]
    passed = found == expected
    return Check("output names", passed, f"{found}" + ("" if passed else f", expected {expected}"))


def _check_shape(name: str, proto, found: np.ndarray, expected: np.ndarray,
                 info: DatasetInfo) -> Check:
    declared = next((_dims(v, symbolic="batch?") for v in proto.graph.output if v.name == name),
                    _dims(proto.graph.output[0], symbolic="batch?"))
    wanted = (len(expected), info.n_outputs)
    problems = []
    if declared != ["batch?", info.n_outputs]:
        problems.append(f"declared {declared}, expected ['batch?', {info.n_outputs}]")
    if found.shape != wanted or expected.shape != wanted:
        problems.append(f"onnx {found.shape}, framework {expected.shape}, expected {wanted}")
    detail = "; ".join(problems) if problems else f"{list(found.shape)} (declared {declared})"
    return Check(f"output {name!r} shape", not problems, detail)


def _parity(found: np.ndarray, expected: np.ndarray, atol: float) -> dict[str, float]:
    a, b = found.astype(np.float64), expected.astype(np.float64)
    diff = np.abs(a - b)
    meaningful = np.abs(b) > atol
    rel = diff[meaningful] / np.abs(b[meaningful])
    return {
        "max_abs": float(np.max(diff)) if diff.size else 0.0,
        "mean_abs": float(np.mean(diff)) if diff.size else 0.0,
        "max_rel": float(np.max(rel)) if rel.size else 0.0,
        "rel_elements": int(meaningful.sum()),
        "non_finite": int((~np.isfinite(a)).sum()),
    }


def _check_abs(name: str, parity: dict[str, float], atol: float) -> Check:
    value = parity["max_abs"]
    passed = value <= atol  # False for NaN too
    return Check(f"output {name!r}", passed,
                 f"max abs diff {value:.3g} {'<=' if passed else '>'} atol {atol:g}"
                 + (f" ({parity['non_finite']} non-finite values)" if parity["non_finite"] else ""))


def _check_rel(name: str, parity: dict[str, float], rtol: float) -> Check:
    value = parity["max_rel"]
    passed = value <= rtol
    return Check(f"output {name!r}", passed,
                 f"max rel diff {value:.3g} {'<=' if passed else '>'} rtol {rtol:g} "
                 f"(over {parity['rel_elements']} values with |framework| > atol)")


def _check_batches(run_onnx: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
                   feeds: dict[str, np.ndarray], config: ValidateConfig, report: dict[str, Any],
                   dynamic_batch: bool = True) -> Check:
    """The first rows run one at a time vs in batches of ``config.batch_size``; floats are
    compared against atol, other types must be equal. Skipped (and said so) when the model
    has no dynamic batch axis or the sample has a single row."""
    name = f"batch 1 vs batch {config.batch_size}"
    n = min(len(v) for v in feeds.values()) if feeds else 0
    if not dynamic_batch or n < 2:
        why = ("the model has no dynamic batch axis (first axis of every input and output)"
               if not dynamic_batch else f"the sample has {n} row(s)")
        report["batch_consistency"] = {"checked": False, "reason": why}
        return Check(name, True, f"not checked: {why}")
    rows = min(n, BATCH_ONE_ROWS)

    def part(start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop] for k, v in feeds.items()}

    singles = [run_onnx(part(i, i + 1)) for i in range(rows)]
    batched = [run_onnx(part(i, min(i + config.batch_size, rows)))
               for i in range(0, rows, config.batch_size)]
    largest, unequal = 0.0, 0
    for k in range(len(singles[0])):
        one = np.concatenate([s[k] for s in singles])
        many = np.concatenate([b[k] for b in batched])
        if one.shape != many.shape:
            largest = math.inf
            break
        if one.dtype.kind in "fc":
            diff = np.abs(one.astype(np.float64) - many.astype(np.float64))
            largest = max(largest, float(np.max(diff)) if one.size else 0.0)
        else:
            unequal += int(np.sum(one != many))
    report["batch_consistency"] = {"rows": rows, "batch_size": config.batch_size,
                                   "max_abs": largest, "checked": True}
    passed = largest <= config.atol and not unequal
    detail = (f"max abs diff {largest:.3g} {'<=' if largest <= config.atol else '>'} "
              f"atol {config.atol:g} over {rows} rows")
    if unequal:
        detail += f"; {unequal} non-float values differ"
    return Check(name, passed, detail)


def _check_metric(info: DatasetInfo, y: np.ndarray, framework_out: np.ndarray,
                  onnx_out: np.ndarray, config: ValidateConfig) -> tuple[Check, dict[str, Any]]:
    if info.task == "classification":
        return _check_accuracy(y, framework_out, onnx_out, config)
    else:
        fw = float(np.sqrt(np.mean((framework_out.reshape(-1) - y) ** 2)))
        ox = float(np.sqrt(np.mean((onnx_out.reshape(-1) - y) ** 2)))
        drop, allowed = ox - fw, config.max_accuracy_drop * fw
        metric = {"name": "rmse", "framework": fw, "onnx": ox, "drop": drop}
    passed = drop <= allowed + 1e-12  # float noise in the subtraction is not a drop
    name = metric["name"]
    detail = (f"onnx {ox:.4f} vs framework {fw:.4f}, "
              f"{'loss' if name == 'accuracy' else 'increase'} {drop:.4f} "
              f"{'<=' if passed else '>'} allowed {allowed:.4g}")
    return Check(name, passed, detail), metric


def _check_accuracy(y: np.ndarray, framework_out: np.ndarray, onnx_out: np.ndarray,
                    config: ValidateConfig) -> tuple[Check, dict[str, Any]]:
    """Accuracy of the class scores' argmax through onnxruntime vs the framework."""
    fw_pred, onnx_pred = framework_out.argmax(axis=1), onnx_out.argmax(axis=1)
    fw, ox = float(np.mean(fw_pred == y)), float(np.mean(onnx_pred == y))
    drop, allowed = fw - ox, config.max_accuracy_drop
    metric = {"name": "accuracy", "framework": fw, "onnx": ox, "drop": drop,
              "prediction_agreement": float(np.mean(fw_pred == onnx_pred))}
    passed = drop <= allowed + 1e-12  # float noise in the subtraction is not a drop
    detail = (f"onnx {ox:.4f} vs framework {fw:.4f}, loss {drop:.4f} "
              f"{'<=' if passed else '>'} allowed {allowed:.4g}")
    return Check("accuracy", passed, detail), metric


def _onnx_runner(session, feed_name: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    def run(features: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {feed_name: features})

    return run


def _latencies(framework: Callable, run_onnx: Callable, X: np.ndarray,
               repeats: int) -> dict[str, float]:
    """Median milliseconds per call; batches larger than the test split repeat its rows."""
    figures = {}
    for batch in LATENCY_BATCHES:
        rows = np.resize(X, (batch, X.shape[1])).astype(np.float32)
        figures[f"framework_b{batch}"] = median_ms(framework, rows, repeats)
        figures[f"onnx_b{batch}"] = median_ms(run_onnx, rows, repeats)
    return figures


def median_ms(fn: Callable, rows: np.ndarray, repeats: int) -> float:
    """Median wall time of ``fn(rows)`` in ms, after a few warm-up runs."""
    for _ in range(_WARMUP_RUNS):
        fn(rows)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(rows)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


# -- report ----------------------------------------------------------------------------


def _finish(checks: list[Check], report: dict[str, Any], out_dir: Path,
            summary: ValidationSummary | None, plots: list[str] | None = None
            ) -> ValidationSummary:
    failures = [c.line for c in checks if not c.passed]
    report = {"passed": not failures, "failures": failures,
              "checks": [asdict(c) for c in checks], **report, "plots": plots or []}
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    (out_dir / "report.md").write_text(_markdown(report))
    if failures:
        log.warning("validation failed (%d of %d checks); report: %s",
                    len(failures), len(checks), json_path)
        raise ValidationError(failures, str(json_path))
    assert summary is not None  # every early exit has a failure
    log.info("validation passed (%d checks); report: %s", len(checks), json_path)
    return summary


def _markdown(report: dict[str, Any]) -> str:
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
            lines.append(f"| latency {label}, median ms | "
                         f"{'-' if fw_ms is None else f'{fw_ms:.3f}'} | "
                         f"{latency[f'onnx_{key}']:.3f} |")
    for name, parity in report.get("parity", {}).items():
        lines.append(f"| `{name}` max abs / max rel diff | | "
                     f"{parity['max_abs']:.3g} / {parity['max_rel']:.3g} |")
    if report.get("parity_note"):
        lines += ["", f"**Parity not checked**: {report['parity_note']}."]
    if report.get("batch_axis") == "none":
        lines += ["", "**No dynamic batch axis**: served without batching; batch "
                  "consistency not checked."]
    if report["plots"]:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _plots(out_dir: Path, info: DatasetInfo, y: np.ndarray, framework_out: np.ndarray,
           onnx_out: np.ndarray, latency: dict[str, float]) -> list[str]:
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
        hist.set(xlabel="log10 |onnx - framework| (+1e-12)", ylabel="values",
                 title=f"max abs diff {diff.max():.3g}")
        save(fig, "parity.png")

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    positions = np.arange(len(LATENCY_BATCHES))
    for offset, who in ((-0.2, "framework"), (0.2, "onnx")):
        ax.bar(positions + offset, [latency[f"{who}_b{b}"] for b in LATENCY_BATCHES], width=0.4,
               label="onnxruntime" if who == "onnx" else "framework")
    ax.set_xticks(positions, [f"batch {b}" for b in LATENCY_BATCHES])
    ax.set(ylabel="median ms per call", title="latency")
    ax.legend()
    save(fig, "latency.png")

    if info.task == "classification":
        n = info.n_outputs
        matrix = np.zeros((n, n), dtype=int)
        np.add.at(matrix, (y, onnx_out.argmax(axis=1)), 1)
        fig = Figure(figsize=(5.5, 5))
        ax = fig.subplots()
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > matrix.max() / 2 else "black")
        ax.set_xticks(range(n), info.class_names, rotation=90 if n > 12 else 0)
        ax.set_yticks(range(n), info.class_names)
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


def _declared(value) -> dict[str, Any]:
    import onnx

    return {"name": value.name,
            "type": onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type),
            "shape": _dims(value)}


def _dims(value, symbolic: str | None = None) -> list[int | str | None]:
    """Declared dimensions; named (dynamic) ones as their name, or as ``symbolic`` if given."""
    return [
        (symbolic or d.dim_param) if d.HasField("dim_param")
        else d.dim_value if d.HasField("dim_value") else symbolic
        for d in value.type.tensor_type.shape.dim
    ]


def _fmt(values: list[tuple]) -> str:
    return ", ".join(f"{name} {dtype} {dims}" for name, dtype, dims in values) or "none"


def _json_safe(value: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value

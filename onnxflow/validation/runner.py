"""The one way into validation, for every source of a model.

:func:`validate_onnx`: any ONNX model on its source's sample (every input and output, any
tensor type), against the source's declared interface, its framework original on CPU or
given expected outputs; accuracy or RMSE/MAE when the sample has labels; latency, plots.

Modelled on optimum's ``validate_model_outputs``: check the interface (names, then
shapes), then values against declared tolerances; log one ✓/✗ line per check; collect
every failure; write the report (``report.json``, ``report.md``, plots); then raise one
:class:`ValidationError` if anything failed. :class:`ValidationRun` is that skeleton.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from onnxflow.config import ValidateConfig
from onnxflow.errors import ValidationError
from onnxflow.interface import ModelInterface, default_opset, load_graph, read_interface
from onnxflow.results import ValidationSummary
from onnxflow.sources import Reference, ValidationSample, read_sample
from onnxflow.validation import checks
from onnxflow.validation.checks import Check, Feeds, one_line
from onnxflow.validation.report import model_section, plots, write_report
from onnxflow.validation.timing import latencies

log = logging.getLogger(__name__)

#: What an imported model's summary reports as its metric: there are no labels to score.
IMPORT_METRIC = "parity_max_abs"


class ValidationRun:
    """One validation under way: the model, the checks recorded so far, and the report
    they go into. ``finish`` writes the report, then raises or returns the summary."""

    def __init__(self, model_path: Path, out_dir: Path, report: dict[str, Any]) -> None:
        self.model_path, self.out_dir = Path(model_path), out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.proto = load_graph(self.model_path)
        self.opset = default_opset(self.proto)
        self.interface = read_interface(self.proto)
        self.report: dict[str, Any] = {
            "model": model_section(self.model_path, self.proto, self.opset),
            **report,
        }
        self.checks: list[Check] = []

    def record(self, check: Check) -> None:
        self.checks.append(check)
        (log.info if check.passed else log.warning)(
            "\t%s %s", "✓" if check.passed else "✗", check.line
        )

    def open_session(self):
        """Check the opset/IR against onnxruntime, then load the session (None if it fails)."""
        self.record(checks.check_runtime_support(self.opset, self.proto.ir_version, self.report))
        session, loaded = checks.check_session(self.model_path)
        self.record(loaded)
        return session

    def first_run(
        self, session, feeds: Feeds, what: str
    ) -> tuple[Callable[[Feeds], list[np.ndarray]], dict[str, np.ndarray] | None]:
        """The model as a function of its feeds, and its outputs by name on ``feeds``; None
        for the outputs (and a failed check) when onnxruntime cannot run them."""
        names = [o.name for o in session.get_outputs()]

        def run_onnx(batch: Feeds) -> list[np.ndarray]:
            return session.run(names, batch)

        try:
            return run_onnx, dict(zip(names, run_onnx(feeds), strict=True))
        except Exception as exc:  # onnxruntime's Fail/InvalidArgument/RuntimeException
            self.record(Check(f"onnxruntime runs {what}", False, one_line(exc)))
            return run_onnx, None

    def summary(
        self,
        *,
        metric_name: str,
        framework_metric: float,
        onnx_metric: float,
        parity: dict[str, dict[str, float]],
        latency: dict[str, float],
        missing: float,
    ) -> ValidationSummary:
        """The figures the register step tags; ``missing`` stands for parity not measured."""
        return ValidationSummary(
            report_dir=self.out_dir,
            passed=all(c.passed for c in self.checks),
            metric_name=metric_name,
            framework_metric=framework_metric,
            onnx_metric=onnx_metric,
            parity_max_abs=max((p["max_abs"] for p in parity.values()), default=missing),
            parity_max_rel=max((p["max_rel"] for p in parity.values()), default=missing),
            latency_ms=latency,
            opset=self.opset,
            ir_version=self.proto.ir_version,
            model_bytes=self.report["model"]["bytes"],
        )

    def finish(
        self, summary: ValidationSummary | None = None, plot_files: list[str] | None = None
    ) -> ValidationSummary:
        """Write the report; raise :class:`ValidationError` naming every failed check."""
        json_path, failures = write_report(self.checks, self.report, self.out_dir, plot_files)
        if failures:
            log.warning(
                "validation failed (%d of %d checks); report: %s",
                len(failures),
                len(self.checks),
                json_path,
            )
            raise ValidationError(failures, str(json_path))
        assert summary is not None  # every early exit has a failure
        log.info("validation passed (%d checks); report: %s", len(self.checks), json_path)
        return summary


def validate_onnx(
    model_path: Path,
    sample: ValidationSample,
    config: ValidateConfig,
    out_dir: Path,
    *,
    origin: dict[str, Any],
    reference: Reference | None = None,
    declared: ModelInterface | None = None,
) -> ValidationSummary:
    """Validate any ONNX model on its sample, whatever its source; write the report into
    ``out_dir``, then raise :class:`ValidationError` naming each failed check, or return
    the summary.

    ``declared``: the interface the source promises (names, types, shapes), checked first.
    Parity is per output, by name: against ``reference`` (the source framework's outputs
    on CPU, in the ONNX model's output order) when there is one, else against the sample's
    expected outputs, else it is not checked and the report says so. Float outputs are
    compared against atol/rtol, every other type must be equal. Batch-1 vs batch-N
    consistency runs only when every input and output has a dynamic first axis. A sample
    with labels adds the metric of the first output through both (accuracy of its argmax,
    or RMSE and MAE for regression), its allowed drop, and the plots; ``origin`` is the
    report's ``framework`` section.
    """
    arrays = read_sample(sample)
    feeds, labels = arrays.inputs, arrays.labels
    run = ValidationRun(
        model_path,
        out_dir,
        {
            "framework": dict(origin),
            "dataset": {
                "name": sample.name,
                "digest": sample.digest,
                "split": sample.split,
                "rows": sample.rows,
            },
            "tolerances": config.model_dump(),
        },
    )
    dynamic_batch = run.interface.dynamic_batch
    run.report["batch_axis"] = "dynamic" if dynamic_batch else "none"
    log.info(
        "validating %s against %s on %d %s rows",
        model_path,
        origin.get("path"),
        sample.rows,
        sample.split,
    )
    session = run.open_session()
    if declared is not None:
        run.record(checks.check_inputs(declared, run.interface))
        run.record(checks.check_output_names(declared, run.interface))
    if session is None:
        return run.finish()
    run.record(
        Check(
            "inputs fit the sample",
            True,
            ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in feeds.items()),
        )
    )
    run_onnx, outputs = run.first_run(session, feeds, f"the {sample.split} rows")
    if outputs is None:
        return run.finish()
    output_names = list(outputs)

    wanted, compared_with = None, None
    if reference is not None:
        framework_out = reference(feeds)
        compared_with = origin.get("name", "framework")
        if len(framework_out) != len(output_names):
            run.record(
                Check(
                    "output count",
                    False,
                    f"{compared_with} gives {len(framework_out)} outputs, the ONNX model "
                    f"{len(output_names)} ({output_names})",
                )
            )
        else:
            wanted = dict(zip(output_names, (np.asarray(p) for p in framework_out), strict=True))
    elif arrays.expected:
        wanted, compared_with = dict(arrays.expected), "expected outputs"
    parity: dict[str, dict[str, float]] = {}
    if wanted is None and reference is None:
        why = (
            "a bare ONNX model has no framework to compare with, and no expected outputs "
            "were given (--expected)"
        )
        run.report["parity_checked"], run.report["parity_note"] = False, why
        run.record(Check("parity", True, f"not checked: {why}"))
    elif wanted is not None:
        run.report["parity_checked"] = True
        run.report["parity_against"] = compared_with
        for name, reference_out in wanted.items():
            if declared is not None:
                shape = checks.check_output_shape(
                    name, declared, run.interface, outputs[name], reference_out
                )
                if not shape.passed:
                    run.record(shape)
                    continue
            compared, figures = checks.compare_output(
                name, outputs[name], reference_out, compared_with, config
            )
            for check in compared:
                run.record(check)
            if figures is not None:
                parity[name] = figures
        if len(wanted) < len(output_names):
            run.report["outputs_not_compared"] = [n for n in output_names if n not in wanted]
    run.report["parity"] = parity
    run.record(checks.check_batches(run_onnx, feeds, config, run.report, dynamic_batch))
    metric = None
    first = output_names[0]
    if labels is not None and sample.task and wanted is not None and first in parity:
        metric_check, metric = checks.check_metric(
            sample.task, labels, wanted[first], outputs[first], config
        )
        run.record(metric_check)
        run.report["metric"] = metric
    elif wanted is not None and len(parity) < len(wanted):
        return run.finish()  # wrong shapes: no metric to compare

    runners = {"framework": reference} if reference is not None else {}
    latency = latencies({**runners, "onnx": run_onnx}, feeds, config.latency_repeats, dynamic_batch)
    run.report["latency_ms"] = latency
    log.info("latency (median ms): %s", ", ".join(f"{k} {v:.3f}" for k, v in latency.items()))
    plot_files = None
    if metric is not None and wanted is not None:
        plot_files = plots(
            out_dir,
            sample.task,
            sample.class_names,
            labels,
            wanted[first],
            outputs[first],
            latency,
        )
    max_abs = max((p["max_abs"] for p in parity.values()), default=math.nan)
    summary = run.summary(
        metric_name=metric["name"] if metric else IMPORT_METRIC,
        framework_metric=metric["framework"] if metric else (0.0 if parity else math.nan),
        onnx_metric=metric["onnx"] if metric else max_abs,
        parity=parity,
        latency=latency,
        missing=math.nan,
    )
    return run.finish(summary, plot_files)

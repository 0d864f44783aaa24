"""The checks of a validation: each returns one :class:`Check` (passed or not, and why).

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxflow.config import ValidateConfig
from onnxflow.interface import ModelInterface, TensorDecl

#: Rows run one at a time in the batch-consistency check (enough to see a batching bug).
BATCH_ONE_ROWS = 256
#: How a dynamic axis reads in the interface checks (any name will do).
DYNAMIC = "batch?"

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    @property
    def line(self) -> str:
        return f"{self.name}: {self.detail}"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (onnxruntime's C++ errors span several)."""
    return " ".join(str(exc).split())[:limit]


# -- the model as a file -----------------------------------------------------------------


def check_runtime_support(opset: int, ir_version: int, report: dict[str, Any]) -> Check:
    import onnxruntime as ort

    from onnxflow.runtime import onnxruntime_limits

    max_opset, max_ir = onnxruntime_limits()
    report["onnxruntime"] = {
        "version": ort.__version__,
        "max_opset": max_opset,
        "max_ir_version": max_ir,
    }
    name = f"opset/IR supported by onnxruntime {ort.__version__}"
    if max_opset is None:
        return Check(
            name,
            True,
            f"opset {opset}, IR {ir_version} (limits not exposed; loading the session decides)",
        )
    passed = opset <= max_opset and (max_ir is None or ir_version <= max_ir)
    relation = "<=" if passed else "exceeds"
    return Check(
        name,
        passed,
        f"opset {opset}, IR {ir_version} {relation} max opset {max_opset}, IR {max_ir}",
    )


def check_session(model_path) -> tuple[Any, Check]:
    """The onnxruntime session of the model, or None with the reason it does not load."""
    from onnxflow.runtime import open_session

    name = "onnxruntime loads the model"
    try:
        session = open_session(model_path)
    except Exception as exc:  # onnxruntime raises Fail/InvalidGraph/... with the reason
        return None, Check(name, False, one_line(exc))
    return session, Check(name, True, f"providers {session.get_providers()}")


# -- the declared interface ------------------------------------------------------------------


def check_inputs(declared: ModelInterface, found: ModelInterface) -> Check:
    """The inputs by name, type and shape (any dynamic axis standing for the batch)."""
    expected = [_row(t) for t in declared.inputs]
    got = [_row(t) for t in found.inputs]
    passed = got == expected
    what = ", ".join(repr(t.name) for t in declared.inputs)
    return Check(
        f"input {what}",
        passed,
        f"{_fmt(got)}"
        + ("" if passed else f", expected {_fmt(expected)} ({DYNAMIC} = a dynamic axis)"),
    )


def check_output_names(declared: ModelInterface, found: ModelInterface) -> Check:
    expected = [t.name for t in declared.outputs]
    got = [t.name for t in found.outputs]
    passed = got == expected
    return Check("output names", passed, f"{got}" + ("" if passed else f", expected {expected}"))


def check_output_shape(
    name: str,
    declared: ModelInterface,
    found: ModelInterface,
    onnx_out: np.ndarray,
    reference: np.ndarray,
) -> Check:
    """One output's declared shape, and the shapes both sides produced on the rows."""
    want = next(t for t in declared.outputs if t.name == name).with_dynamic_as(DYNAMIC)
    have = next((t for t in found.outputs if t.name == name), found.outputs[0])
    have_shape = list(have.with_dynamic_as(DYNAMIC).shape)
    rows = (len(reference), *(d for d in want.shape[1:]))
    problems = []
    if have_shape != list(want.shape):
        problems.append(f"declared {have_shape}, expected {list(want.shape)}")
    if onnx_out.shape != rows or reference.shape != rows:
        problems.append(f"onnx {onnx_out.shape}, framework {reference.shape}, expected {rows}")
    detail = "; ".join(problems) if problems else f"{list(onnx_out.shape)} (declared {have_shape})"
    return Check(f"output {name!r} shape", not problems, detail)


def _row(t: TensorDecl) -> tuple[str, str, list]:
    return t.name, t.dtype, list(t.with_dynamic_as(DYNAMIC).shape)


def _fmt(values: list[tuple]) -> str:
    return ", ".join(f"{name} {dtype} {dims}" for name, dtype, dims in values) or "none"


# -- values ------------------------------------------------------------------------------


def parity_figures(found: np.ndarray, expected: np.ndarray, atol: float) -> dict[str, float]:
    """Max and mean abs diff, max rel diff (over ``|expected| > atol``), non-finite count."""
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


def check_abs(name: str, figures: dict[str, float], atol: float) -> Check:
    value = figures["max_abs"]
    passed = value <= atol  # False for NaN too
    return Check(
        f"output {name!r}",
        passed,
        f"max abs diff {value:.3g} {'<=' if passed else '>'} atol {atol:g}"
        + (f" ({figures['non_finite']} non-finite values)" if figures["non_finite"] else ""),
    )


def check_rel(name: str, figures: dict[str, float], rtol: float) -> Check:
    value = figures["max_rel"]
    passed = value <= rtol
    return Check(
        f"output {name!r}",
        passed,
        f"max rel diff {value:.3g} {'<=' if passed else '>'} rtol {rtol:g} "
        f"(over {figures['rel_elements']} values with |framework| > atol)",
    )


def equal_values(found: np.ndarray, expected: np.ndarray) -> int:
    """How many elements are equal (strings compared as text, bytes decoded)."""
    if found.dtype.kind in "OUS" or expected.dtype.kind in "OUS":

        def text(a):
            return np.array(
                [x.decode() if isinstance(x, bytes) else str(x) for x in a.reshape(-1)],
                dtype=object,
            )

        return int(np.sum(text(found) == text(expected)))
    return int(np.sum(found == expected))


def compare_output(
    name: str, found: np.ndarray, expected: np.ndarray, against: str, config: ValidateConfig
) -> tuple[list[Check], dict[str, float] | None]:
    """Any-typed output against its reference: shape, then floats within atol/rtol and
    every other type equal. The checks, and the output's parity figures (None when the
    shapes differ)."""
    if found.shape != expected.shape:
        return [
            Check(
                f"output {name!r} shape",
                False,
                f"onnx {list(found.shape)}, {against} {list(expected.shape)}",
            )
        ], None
    checks = [Check(f"output {name!r} shape", True, f"{list(found.shape)} {found.dtype}")]
    if found.dtype.kind in "fc" and expected.dtype.kind in "fciub":
        figures = parity_figures(found, expected, config.atol)
        return [
            *checks,
            check_abs(name, figures, config.atol),
            check_rel(name, figures, config.rtol),
        ], figures
    differ = int(found.size - equal_values(found, expected))
    figures = {
        "max_abs": 0.0 if not differ else math.inf,
        "max_rel": 0.0,
        "mean_abs": 0.0,
        "rel_elements": 0,
        "non_finite": 0,
        "unequal": differ,
    }
    return [
        *checks,
        Check(
            f"output {name!r}", not differ, f"{found.dtype} values: {differ} of {found.size} differ"
        ),
    ], figures


def check_batches(
    run_onnx: Callable[[Feeds], list[np.ndarray]],
    feeds: Feeds,
    config: ValidateConfig,
    report: dict[str, Any],
    dynamic_batch: bool = True,
) -> Check:
    """The first rows run one at a time vs in batches of ``config.batch_size``; floats are
    compared against atol, other types must be equal. Skipped (and said so) when the model
    has no dynamic batch axis or the sample has a single row."""
    name = f"batch 1 vs batch {config.batch_size}"
    n = min(len(v) for v in feeds.values()) if feeds else 0
    if not dynamic_batch or n < 2:
        why = (
            "the model has no dynamic batch axis (first axis of every input and output)"
            if not dynamic_batch
            else f"the sample has {n} row(s)"
        )
        report["batch_consistency"] = {"checked": False, "reason": why}
        return Check(name, True, f"not checked: {why}")
    rows = min(n, BATCH_ONE_ROWS)

    def part(start: int, stop: int) -> Feeds:
        return {k: v[start:stop] for k, v in feeds.items()}

    singles = [run_onnx(part(i, i + 1)) for i in range(rows)]
    batched = [
        run_onnx(part(i, min(i + config.batch_size, rows)))
        for i in range(0, rows, config.batch_size)
    ]
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
    report["batch_consistency"] = {
        "rows": rows,
        "batch_size": config.batch_size,
        "max_abs": largest,
        "checked": True,
    }
    passed = largest <= config.atol and not unequal
    detail = (
        f"max abs diff {largest:.3g} {'<=' if largest <= config.atol else '>'} "
        f"atol {config.atol:g} over {rows} rows"
    )
    if unequal:
        detail += f"; {unequal} non-float values differ"
    return Check(name, passed, detail)


def check_metric(
    task: str,
    y: np.ndarray,
    framework_out: np.ndarray,
    onnx_out: np.ndarray,
    config: ValidateConfig,
) -> tuple[Check, dict[str, Any]]:
    """Accuracy (classification: argmax of the scores against class indices ``y``) or RMSE
    (regression; MAE reported beside it) through both, and the drop allowed."""
    if task == "classification":
        fw_pred, onnx_pred = framework_out.argmax(axis=1), onnx_out.argmax(axis=1)
        fw, ox = float(np.mean(fw_pred == y)), float(np.mean(onnx_pred == y))
        drop, allowed = fw - ox, config.max_accuracy_drop
        metric = {
            "name": "accuracy",
            "framework": fw,
            "onnx": ox,
            "drop": drop,
            "prediction_agreement": float(np.mean(fw_pred == onnx_pred)),
        }
    else:
        fw = float(np.sqrt(np.mean((framework_out.reshape(-1) - y) ** 2)))
        ox = float(np.sqrt(np.mean((onnx_out.reshape(-1) - y) ** 2)))
        drop, allowed = ox - fw, config.max_accuracy_drop * fw
        metric = {
            "name": "rmse",
            "framework": fw,
            "onnx": ox,
            "drop": drop,
            "mae_framework": float(np.mean(np.abs(framework_out.reshape(-1) - y))),
            "mae_onnx": float(np.mean(np.abs(onnx_out.reshape(-1) - y))),
        }
    passed = drop <= allowed + 1e-12  # float noise in the subtraction is not a drop
    name = metric["name"]
    detail = (
        f"onnx {ox:.4f} vs framework {fw:.4f}, "
        f"{'loss' if name == 'accuracy' else 'increase'} {drop:.4f} "
        f"{'<=' if passed else '>'} allowed {allowed:.4g}"
    )
    return Check(name, passed, detail), metric

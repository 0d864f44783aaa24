"""Import upgrades: an ONNX model whose opset onnxruntime no longer runs, moved forward.

    onnxruntime opens it? ─ yes ─► kept as it is
            │ no
            ▼
    onnx.version_converter to opset+1, +2, ... ─► the first that onnxruntime opens
            ▼
    onnx.reference: original vs upgraded on the sample ─► equal? ─► upgraded in place

The lowest opset that runs is taken, not the newest: each step of the converter is an
adapter that may change numerics, so the fewer the better. The check is made with onnx's
own reference evaluator on both models, as onnxruntime cannot run the original. When the
converter has no adapter, the error names the operators whose schema changes between
the two opsets and the opsets themselves.

Step logic only; ``onnx`` and ``onnxruntime`` are imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from onnxflow.errors import ModelImportError
from onnxflow.interface import default_opset

log = logging.getLogger(__name__)

ATOL = 1e-6
"""Reference evaluator, original vs upgraded: an upgrade renames attributes and moves
them into inputs, it does not change arithmetic."""


def upgrade_for_runtime(path: Path, sample: Mapping[str, np.ndarray]) -> int | None:
    """Upgrade the ONNX file at ``path`` (a copy the import step owns; its external data,
    if any, stays beside it) to the lowest opset onnxruntime runs, when it does not run the
    one it has. Returns the opset it had, or None when nothing was done. Raises
    :class:`ModelImportError` naming the operators and opsets the converter cannot move,
    or the outputs that differ after the upgrade."""
    import onnx

    path = Path(path)
    problem = _runtime_error(path)
    if problem is None or not any(s in problem for s in ("NOT_IMPLEMENTED", "opset")):
        return None  # runs, or fails for another reason that validation reports
    original = onnx.load(str(path))
    from_opset = default_opset(original)
    newest = onnx.defs.onnx_opset_version()
    if not from_opset or from_opset >= newest:
        return None  # not an opset problem: validation reports onnxruntime's error
    upgraded, target, reasons = _lowest_runnable(original, from_opset, newest)
    if upgraded is None:
        raise ModelImportError(
            f"{path.name}: onnxruntime cannot run opset {from_opset} ({problem}) and "
            f"onnx.version_converter cannot upgrade it: " + "; ".join(reasons)
        )
    feeds = _bind(upgraded, sample)
    _check_equal(original, upgraded, feeds, from_opset, target)
    onnx.save(upgraded, str(path))
    log.info("upgraded %s from opset %d to %d (onnx.reference agrees)", path, from_opset, target)
    return from_opset


def _runtime_error(model) -> str | None:
    """onnxruntime's reason for refusing ``model`` (path or bytes), one line; None if it runs."""
    import onnxruntime as ort

    from onnxflow.runtime import PROVIDERS

    try:
        ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), providers=list(PROVIDERS)
        )
    except Exception as exc:  # onnxruntime raises its own Fail/NotImplemented types
        return " ".join(str(exc).split())[:300]
    return None


def _lowest_runnable(original, from_opset: int, newest: int):
    """(upgraded model, its opset, []) for the lowest opset above ``from_opset`` that
    onnxruntime runs, else (None, 0, reasons naming operator and opsets)."""
    from onnx import version_converter

    reasons: list[str] = []
    for target in range(from_opset + 1, newest + 1):
        try:
            upgraded = version_converter.convert_version(original, target)
        except Exception as exc:  # the converter raises RuntimeError/ConvertError
            ops = changed_operators(original, from_opset, target)
            reasons.append(
                f"opset {from_opset} -> {target} fails for operator(s) "
                f"{', '.join(ops) or 'unknown'}: {' '.join(str(exc).split())[:200]}"
            )
            break  # an adapter missing at one step is missing for every later target
        refused = _runtime_error(upgraded.SerializeToString())
        if refused is None:
            return upgraded, target, []
        reasons.append(f"opset {target}: onnxruntime: {refused}")
    return None, 0, reasons[-3:]


def changed_operators(model, from_opset: int, to_opset: int) -> list[str]:
    """``Op(opset a -> b)`` for each operator of ``model`` whose schema changes between the
    two opsets: the ones the converter needs an adapter for."""
    import onnx

    found = []
    for op in sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}):
        try:
            since = onnx.defs.get_schema(op, to_opset).since_version
        except Exception:  # onnx.defs.SchemaError: the operator was removed
            found.append(f"{op}(opset {from_opset}, removed by {to_opset})")
            continue
        if since > from_opset:
            found.append(f"{op}(opset {from_opset} -> {since})")
    return found


def _bind(model, sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from onnxflow.importing import bind_sample
    from onnxflow.runtime import PROVIDERS

    session = ort.InferenceSession(model.SerializeToString(), providers=list(PROVIDERS))
    return bind_sample(sample, session.get_inputs())


def _check_equal(original, upgraded, feeds, from_opset: int, target: int) -> None:
    from onnx.reference import ReferenceEvaluator

    try:
        want = ReferenceEvaluator(original).run(None, feeds)
    except Exception as exc:  # the evaluator raises per-operator errors
        raise ModelImportError(
            f"onnx.reference cannot run the opset-{from_opset} original to check the upgrade: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from None
    got = ReferenceEvaluator(upgraded).run(None, feeds)
    names = [o.name for o in original.graph.output]
    differ = []
    for name, w, g in zip(names, want, got, strict=True):
        w, g = np.asarray(w), np.asarray(g)
        if w.shape != g.shape or not np.allclose(g, w, atol=ATOL, rtol=0, equal_nan=True):
            diff = np.max(np.abs(g - w)) if w.shape == g.shape else "shape"
            differ.append(f"{name} ({diff})")
    if differ:
        raise ModelImportError(
            f"the upgrade from opset {from_opset} to {target} changes output(s) "
            f"{', '.join(differ)} on the sample (onnx.reference, atol {ATOL:g}): not imported"
        )

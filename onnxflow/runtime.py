"""onnxruntime for the pipeline's steps, in one place: the session a step runs a model
with, and what the installed onnxruntime supports.

Every step (validate, quantize, simplify, import, convert, register) opens its sessions
here, on the CPU provider, so they all run a model the same way. The endpoint tunes its
own sessions (threads, memory) in :mod:`onnxflow.serving.model`. ``onnxruntime`` is
imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path

#: The execution providers every step runs models with.
PROVIDERS = ("CPUExecutionProvider",)


def open_session(model_path: Path):
    """An ``onnxruntime.InferenceSession`` of ``model_path`` (external data read from beside
    it) on :data:`PROVIDERS`; onnxruntime's own error, naming the reason, if it cannot."""
    import onnxruntime as ort

    return ort.InferenceSession(str(model_path), providers=list(PROVIDERS))


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
    max_ir = max((row[1] for row in onnx.helper.VERSION_TABLE if row[2] <= max_opset), default=None)
    return max_opset, max_ir

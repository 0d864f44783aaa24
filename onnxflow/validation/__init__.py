"""Validation: an ONNX model against its source, every check reported before one verdict.

* :mod:`~onnxflow.validation.runner`: ``validate_onnx``, the one entry point (every
  source of a model), over :class:`~onnxflow.validation.runner.ValidationRun`;
* :mod:`~onnxflow.validation.checks`: each check, returning a ``Check``;
* :mod:`~onnxflow.validation.timing`: median latency (also used by quantize);
* :mod:`~onnxflow.validation.report`: ``report.json``, ``report.md`` and the plots.

What a model is expected to take and give comes from :mod:`onnxflow.interface`; its
onnxruntime session from :mod:`onnxflow.runtime`.
"""

from onnxflow.validation.runner import IMPORT_METRIC, validate_onnx

__all__ = ["IMPORT_METRIC", "validate_onnx"]

"""onnxflow: train in PyTorch or Keras, ship as ONNX.

The step logic lives in this package as plain typed functions; ``onnxflow.tasks``
(``tasks/``) wraps them as Prefect tasks, ``onnxflow.flows`` (``flows/``) wires the tasks,
``onnxflow.cli`` and ``onnxflow.stack`` are the entry points, and ``onnxflow.serving``
(``serving/``) is the endpoint. Imports point down those layers only: docs/architecture.md.
Nothing here imports a framework or creates a client at import time.
"""

__version__ = "0.1.0"

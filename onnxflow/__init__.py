"""onnxflow: train in PyTorch or Keras, ship as ONNX.

The step logic lives in this package as plain typed functions; ``tasks/`` wraps them
as Prefect tasks, ``flows/`` wires the tasks, and ``serving/`` is the endpoint.
Nothing here imports a framework or creates a client at import time.
"""

__version__ = "0.1.0"

"""The onnxflow endpoint: serves the registry's champion with onnxruntime.

``python -m onnxflow.serving`` runs it; :mod:`onnxflow.serving.app` is the ASGI app, :mod:`onnxflow.serving.manager`
follows the alias, :mod:`onnxflow.serving.v2` and :mod:`onnxflow.serving.mlflow_format` are the two wire
protocols. Nothing is imported or started at import time.
"""

import sys

#: What the endpoint's processes never load. MLflow imports pandas and pyarrow when they
#: are installed (inside ``suppress(ImportError)``); torch and tensorflow have no business
#: here at all. A blocked module raises ImportError.
BLOCKED_MODULES = ("pandas", "pyarrow", "torch", "tensorflow")


def block_heavy_imports() -> None:
    """Call first thing in an endpoint process's main, never in a library function: it
    changes ``sys.modules`` for the whole process."""
    for name in BLOCKED_MODULES:
        sys.modules.setdefault(name, None)

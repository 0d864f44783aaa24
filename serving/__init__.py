"""The onnxflow endpoint: serves the registry's champion with onnxruntime.

``python -m onnxflow.serving`` runs it. :mod:`onnxflow.serving.dataplane` owns the served
models (resolve, check, execute, metadata, readiness), :mod:`onnxflow.serving.manager`
follows each alias, :mod:`onnxflow.serving.errors` names every way a request can fail.
The fronts parse their protocol and call the data plane: :mod:`onnxflow.serving.app` is
the REST front (KServe V2 via :mod:`onnxflow.serving.v2`, MLflow scoring via
:mod:`onnxflow.serving.mlflow_format`). Nothing is imported or started at import time.
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

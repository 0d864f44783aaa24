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


class _Blocked:
    """A meta-path finder that refuses the blocked modules. (A None in ``sys.modules``
    blocks ``import`` too, but Cython modules such as pyarrow's then get the None itself
    from their own import of pandas.)"""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"import of {name} halted: the endpoint never loads it")
        return None


def block_heavy_imports(allow: tuple[str, ...] = ()) -> None:
    """Call first thing in an endpoint process's main, never in a library function: it
    changes the imports of the whole process. ``allow``: blocked modules to leave
    importable (``pyarrow`` when the endpoint captures requests as Parquet)."""
    blocked = tuple(n for n in BLOCKED_MODULES if n not in allow and n not in sys.modules)
    sys.meta_path.insert(0, _Blocked(blocked))

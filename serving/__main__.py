"""``python -m onnxflow.serving``: the endpoint process. Settings come from ``ONNXFLOW_SERVE_*``.

Heavy libraries are blocked before anything imports MLflow: MLflow imports pandas and
pyarrow when they are installed (inside ``suppress(ImportError)``), and the endpoint has
no use for either, nor for torch or tensorflow. A blocked module raises ImportError.
"""

import os
import sys

from onnxflow.serving import block_heavy_imports


def main() -> None:
    # --capture writes Parquet with pyarrow (never pandas)
    block_heavy_imports(allow=("pyarrow",) if os.environ.get("ONNXFLOW_SERVE_CAPTURE") else ())

    from onnxflow.serving.launcher import run_server
    from onnxflow.serving.settings import ServingSettings

    try:
        settings = ServingSettings()
    except ValueError as exc:
        sys.exit(f"onnxflow endpoint: bad settings: {exc}")
    from onnxflow.errors import RegistryError
    from onnxflow.serving.registry_reader import check_login

    try:  # a wrong login is a clear error now, not an endpoint that never becomes ready
        check_login(os.environ.get("MLFLOW_TRACKING_URI"))
    except RegistryError as exc:
        sys.exit(f"onnxflow endpoint: {exc}")
    run_server(settings)


if __name__ == "__main__":
    main()

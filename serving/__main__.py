"""``python -m onnxflow.serving``: the endpoint process. Settings come from ``ONNXFLOW_SERVE_*``.

Heavy libraries are blocked before anything imports MLflow: MLflow imports pandas and
pyarrow when they are installed (inside ``suppress(ImportError)``), and the endpoint has
no use for either, nor for torch or tensorflow. A blocked module raises ImportError.
"""

import sys

from onnxflow.serving import block_heavy_imports


def main() -> None:
    from onnxflow.serving.settings import ServingSettings  # pydantic only

    try:
        settings = ServingSettings()
    except ValueError as exc:
        sys.exit(f"onnxflow endpoint: bad settings: {exc}")
    # --capture writes Parquet with pyarrow (never pandas)
    block_heavy_imports(allow=("pyarrow",) if settings.capture else ())

    from onnxflow.errors import RegistryError
    from onnxflow.serving.launcher import run_server
    from onnxflow.serving.registry_reader import check_login

    try:  # a wrong login is a clear error now, not an endpoint that never becomes ready
        check_login(settings.tracking_uri)
    except RegistryError as exc:
        sys.exit(f"onnxflow endpoint: {exc}")
    run_server(settings)


if __name__ == "__main__":
    main()

"""The onnxflow endpoint: serves the registry's champion with onnxruntime.

``python -m serving`` runs it; :mod:`serving.app` is the ASGI app, :mod:`serving.manager`
follows the alias, :mod:`serving.v2` and :mod:`serving.mlflow_format` are the two wire
protocols. Nothing is imported or started at import time.
"""

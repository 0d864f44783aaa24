"""The local service stack: MLflow and Prefect servers, a process worker, the
``retrain-and-deploy`` deployments and serving replicas (``onnxflow stack up|status|down``)."""

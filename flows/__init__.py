"""The flows: Prefect wiring of the tasks, no step logic (``onnxflow.flows``).

Light on purpose: the stack reads :data:`FLOW_NAME` without importing Prefect.
"""

#: The flow the stack's deployments run (:func:`onnxflow.flows.retrain.retrain_and_deploy`).
FLOW_NAME = "retrain-and-deploy"

"""A gRPC server that does nothing: grpcio's own cost per call on this machine.

It serves Triton's ``ModelInfer`` with grpcio's synchronous server, as the endpoint does
(the same thread count), and answers every call with one fixed 10-float output without
reading the request: no tensors decoded, no model run. ``team_bench.py`` drives it with
the same client as the endpoint's two fronts, so the table shows how much of the gRPC
front's cost is grpcio's (HTTP/2, protobuf, its threads) and how much is the endpoint's.

    python bench/grpc_floor.py PORT     # serves until killed
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from onnxflow.serving.grpc_front import GRPC_THREADS

    raw = np.zeros((1, 10), np.float32).tobytes()

    class NoOp(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ModelInfer(self, request, context):  # noqa: N802  (the protocol's name)
            response = service_pb2.ModelInferResponse(model_name=request.model_name)
            response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
            response.raw_output_contents.append(raw)
            return response

    server = grpc.server(ThreadPoolExecutor(GRPC_THREADS))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(NoOp(), server)
    if server.add_insecure_port(f"127.0.0.1:{int(sys.argv[1])}") == 0:
        raise SystemExit(f"cannot bind 127.0.0.1:{sys.argv[1]}")
    server.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

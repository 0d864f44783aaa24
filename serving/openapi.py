"""The OpenAPI 3.1 description of every route, written by hand (served at /openapi.json).

Hand-written because the routes speak two external protocols whose shapes are fixed by
their specifications (KServe V2, MLflow scoring), not by our code; tools such as
schemathesis can drive the endpoint from it.
"""

from __future__ import annotations

_ERROR = {"$ref": "#/components/responses/Error"}
_BEARER = [{"bearer": []}]

_TENSOR_DATA = {
    "description": "Row-major tensor data, flat or nested; strings for BYTES.",
    "type": "array",
    "items": {},
}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _version_headers() -> dict:
    return {
        "X-Model-Name": {"schema": {"type": "string"}, "description": "Model that answered."},
        "X-Model-Version": {
            "schema": {"type": "string"},
            "description": "Registry version that answered.",
        },
    }


def _invocations(summary: str, params: list) -> dict:
    return {
        "summary": summary,
        "security": _BEARER,
        "parameters": params,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _ref("InvocationsRequest")},
                "text/csv": {
                    "schema": {"type": "string"},
                    "description": (
                        "One row per line. Content-Type: text/csv; header=present|absent "
                        "declares the header row; without it the header is detected against "
                        "the model's inputs, and a first row that could be either is a 400."
                    ),
                },
            },
        },
        "responses": {
            "200": {
                "description": "Predictions by output name.",
                "headers": _version_headers(),
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["predictions"],
                            "properties": {"predictions": {"type": "object"}},
                        }
                    }
                },
            },
            "400": _ERROR,
            "401": _ERROR,
            "404": _ERROR,
            "413": _ERROR,
            "415": _ERROR,
            "422": _ERROR,
            "503": _ERROR,
        },
    }


def _stats(summary: str, params: list) -> dict:
    return {
        "summary": summary,
        "security": _BEARER,
        "parameters": params,
        "responses": {
            "200": _json(
                {
                    "type": "object",
                    "required": ["model_stats"],
                    "properties": {"model_stats": {"type": "array"}},
                }
            ),
            "401": _ERROR,
            "404": _ERROR,
        },
    }


def _shared_memory_paths() -> dict:
    """Triton's shared-memory extensions: system (with --shared-memory) and CUDA (refused)."""
    region = {"name": "region", "in": "path", "required": True, "schema": {"type": "string"}}
    status = _json(
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "key": {"type": "string"},
                    "offset": {"type": "integer"},
                    "byte_size": {"type": "integer"},
                },
            },
        }
    )
    done = {"200": _json({"type": "object"}), "400": _ERROR, "401": _ERROR}
    register_body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["key", "byte_size"],
                    "properties": {
                        "key": {"type": "string", "example": "/input_simple"},
                        "offset": {"type": "integer", "minimum": 0},
                        "byte_size": {"type": "integer", "minimum": 1},
                    },
                }
            }
        },
    }
    paths = {}
    for kind, what in (("systemsharedmemory", "system"), ("cudasharedmemory", "CUDA")):
        note = "" if what == "system" else " (not supported: no region can be registered)"
        base, named = f"/v2/{kind}", f"/v2/{kind}/region/{{region}}"

        def op(summary: str, params: list, responses: dict, note=note, **extra) -> dict:
            return {
                "summary": summary + note,
                "security": _BEARER,
                "parameters": params,
                "responses": responses,
                **extra,
            }

        with_404 = {**status, "400": _ERROR, "401": _ERROR, "404": _ERROR}
        paths[base + "/status"] = {"get": op(f"Every registered {what} region.", [], with_404)}
        paths[named + "/status"] = {"get": op(f"One registered {what} region.", [region], with_404)}
        paths[named + "/register"] = {
            "post": op(
                f"Register a {what} shared-memory region.",
                [region],
                done,
                requestBody=register_body,
            )
        }
        paths[base + "/unregister"] = {"post": op(f"Unregister every {what} region.", [], done)}
        paths[named + "/unregister"] = {
            "post": op(f"Unregister one {what} region (none such: no error).", [region], done)
        }
    return paths


def openapi_document(model_name: str) -> dict:
    name_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "example": model_name},
    }
    version_param = {
        "name": "version",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }

    def model_routes(with_version: bool) -> dict:
        params = [name_param, version_param] if with_version else [name_param]
        base = "/v2/models/{name}" + ("/versions/{version}" if with_version else "")
        infer = {
            "post": {
                "summary": "Run the model (KServe V2 inference; binary tensor data extension).",
                "security": _BEARER,
                "parameters": [
                    *params,
                    {
                        "name": "Inference-Header-Content-Length",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1},
                        "description": "Bytes of JSON at the start of the body; the binary "
                        "tensor data of inputs with binary_data_size follows.",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("InferenceRequest")},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                "responses": {
                    "200": {
                        "description": "Outputs; binary ones follow the JSON header.",
                        "headers": _version_headers(),
                        "content": {
                            "application/json": {"schema": _ref("InferenceResponse")},
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            },
                        },
                    },
                    "400": _ERROR,
                    "401": _ERROR,
                    "404": _ERROR,
                    "413": _ERROR,
                    "415": _ERROR,
                    "422": _ERROR,
                    "503": _ERROR,
                },
            }
        }
        return {
            base: {
                "get": {
                    "summary": "Model metadata: inputs, outputs, versions.",
                    "security": _BEARER,
                    "parameters": params,
                    "responses": {
                        "200": _json(_ref("ModelMetadata")),
                        "401": _ERROR,
                        "404": _ERROR,
                        "503": _ERROR,
                    },
                }
            },
            base + "/config": {
                "get": {
                    "summary": "Triton's model config (JSON): platform, max_batch_size (as "
                    "set by a load's config override; 0: no limit), inputs and outputs.",
                    "security": _BEARER,
                    "parameters": params,
                    "responses": {
                        "200": _json(_ref("ModelConfig")),
                        "401": _ERROR,
                        "404": _ERROR,
                        "503": _ERROR,
                    },
                }
            },
            base + "/ready": {
                "get": {
                    "summary": "Whether this model (version) is ready.",
                    "parameters": params,
                    "responses": {"200": _json(_ref("ModelReady")), "404": _ERROR, "503": _ERROR},
                }
            },
            base + "/infer": infer,
        }

    paths = {
        "/v2": {
            "get": {
                "summary": "Server metadata.",
                "responses": {"200": _json(_ref("ServerMetadata"))},
            }
        },
        "/v2/health/live": {
            "get": {
                "summary": "Liveness: the process answers.",
                "responses": {"200": _json({"type": "object"})},
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Readiness: a model version is serving.",
                "responses": {
                    "200": _json({"type": "object"}),
                    "503": _json({"type": "object"}, "Not ready"),
                },
            }
        },
        **model_routes(False),
        **model_routes(True),
        "/v2/models/{name}/example": {
            "get": {
                "summary": "The registered input example as an /invocations request.",
                "security": _BEARER,
                "parameters": [name_param],
                "responses": {
                    "200": _json(_ref("InvocationsRequest")),
                    "401": _ERROR,
                    "404": _ERROR,
                    "503": _ERROR,
                },
            }
        },
        "/v2/models/{name}/feedback": {
            "post": {
                "summary": "Ground truth for captured requests (needs --capture): "
                '{"request_id", "label"[, "row"]} or {"labels": [...]}; all stored or none.',
                "security": _BEARER,
                "parameters": [name_param],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _json({"type": "object"}, "How many labels were stored"),
                    "400": _ERROR,
                    "401": _ERROR,
                    "404": _ERROR,
                    "409": _ERROR,
                },
            }
        },
        "/invocations": {
            "post": _invocations(
                "MLflow scoring format, as `mlflow models serve` accepts it; answered by the "
                "first model the endpoint serves.",
                [],
            )
        },
        "/v2/models/{name}/invocations": {
            "post": _invocations(
                "MLflow scoring format for any model the endpoint serves, by name.", [name_param]
            )
        },
        "/v2/models/stats": {"get": _stats("Triton statistics of every model served.", [])},
        "/v2/models/{name}/stats": {
            "get": _stats("Triton statistics of one model, every version it served.", [name_param])
        },
        "/v2/models/{name}/versions/{version}/stats": {
            "get": _stats("Triton statistics of one model version.", [name_param, version_param])
        },
        "/v2/repository/index": {
            "post": {
                "summary": "Triton model repository: every model with its state.",
                "security": _BEARER,
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"ready": {"type": "boolean"}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}),
                    "400": _ERROR,
                    "401": _ERROR,
                },
            }
        },
        "/v2/repository/models/{name}/load": {
            "post": {
                "summary": "Load (or reload) a registered model: NAME@champion, or the "
                "all-models alias. parameters.config, a Triton JSON model config, may set "
                "max_batch_size (kept until the model is unloaded); other fields and model "
                "files (file:PATH) are refused.",
                "security": _BEARER,
                "parameters": [name_param],
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "parameters": {
                                        "type": "object",
                                        "properties": {
                                            "config": {
                                                "type": "string",
                                                "example": '{"max_batch_size": 16}',
                                            }
                                        },
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("ReloadOutcome")),
                    "400": _ERROR,
                    "401": _ERROR,
                    "404": _ERROR,
                    "409": _ERROR,
                },
            }
        },
        "/v2/repository/models/{name}/unload": {
            "post": {
                "summary": "Stop serving a model until it is loaded again.",
                "security": _BEARER,
                "parameters": [name_param],
                "responses": {"200": _json({"type": "object"}), "401": _ERROR, "404": _ERROR},
            }
        },
        **_shared_memory_paths(),
        "/ping": {
            "get": {
                "summary": "MLflow-style health check (200 when ready).",
                "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}},
            }
        },
        "/health": {
            "get": {
                "summary": "Same as /ping.",
                "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}},
            }
        },
        "/version": {
            "get": {
                "summary": "As `mlflow models serve`: the MLflow version whose "
                "scoring protocol this endpoint speaks.",
                "responses": {
                    "200": {
                        "description": "Version string",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics.",
                "responses": {
                    "200": {
                        "description": "Text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document.", "responses": {"200": _json({"type": "object"})}}
        },
        "/admin/reload": {
            "post": {
                "summary": "Check the alias now; load, verify and swap to a new version. "
                "Off (403) unless the endpoint has a token.",
                "security": _BEARER,
                "parameters": [
                    {
                        "name": "model",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Which served model (default: the first).",
                    }
                ],
                "responses": {
                    "200": _json(_ref("ReloadOutcome"), "Swapped or unchanged"),
                    "409": _json(_ref("ReloadOutcome"), "Version refused"),
                    "502": _json(_ref("ReloadOutcome"), "Registry unreachable"),
                    "401": _ERROR,
                    "403": _ERROR,
                },
            }
        },
        "/admin/shadow/flush": {
            "post": {
                "summary": "Write the shadow's figures (shadow_* tags, shadow/report.md) onto "
                "each shadow version in the registry now. Needs the token and --shadow.",
                "security": _BEARER,
                "responses": {
                    "200": _json({"type": "object"}, "What was written, per shadow version"),
                    "409": _ERROR,
                    "502": _json({"type": "object"}, "A registry write failed"),
                    "401": _ERROR,
                    "403": _ERROR,
                },
            }
        },
        "/admin/status": {
            "get": {
                "summary": "What is served, refused versions, process facts. Needs the token.",
                "security": _BEARER,
                "responses": {"200": _json({"type": "object"}), "401": _ERROR, "403": _ERROR},
            }
        },
    }
    tensor_meta = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": _ref("Datatype"),
            "shape": {
                "type": "array",
                "items": {"type": "integer"},
                "description": "-1 marks a dynamic dimension.",
            },
        },
    }
    schemas = {
        "Datatype": {
            "type": "string",
            "enum": [
                "BOOL",
                "UINT8",
                "UINT16",
                "UINT32",
                "UINT64",
                "INT8",
                "INT16",
                "INT32",
                "INT64",
                "FP16",
                "FP32",
                "FP64",
                "BYTES",
            ],
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "ModelConfig": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "platform": {"type": "string", "example": "onnxruntime_onnx"},
                "backend": {"type": "string", "example": "onnxruntime"},
                "max_batch_size": {"type": "integer", "minimum": 0},
                "input": {"type": "array", "items": _ref("ModelConfigTensor")},
                "output": {"type": "array", "items": _ref("ModelConfigTensor")},
            },
        },
        "ModelConfigTensor": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "data_type": {"type": "string", "example": "TYPE_FP32"},
                "dims": {"type": "array", "items": {"type": "integer"}},
            },
        },
        "ModelMetadata": {
            "type": "object",
            "required": ["name", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": tensor_meta},
                "outputs": {"type": "array", "items": tensor_meta},
                "parameters": {"type": "object"},
            },
        },
        "ModelReady": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
        },
        "InferenceRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {
                    "type": "object",
                    "properties": {"binary_data_output": {"type": "boolean"}},
                },
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "datatype", "shape"],
                        "properties": {
                            "name": {"type": "string"},
                            "datatype": _ref("Datatype"),
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "parameters": {
                                "type": "object",
                                "properties": {
                                    "binary_data_size": {"type": "integer", "minimum": 0}
                                },
                            },
                            "data": _TENSOR_DATA,
                        },
                    },
                },
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "parameters": {
                                "type": "object",
                                "properties": {"binary_data": {"type": "boolean"}},
                            },
                        },
                    },
                },
            },
        },
        "InferenceResponse": {
            "type": "object",
            "required": ["model_name", "model_version", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "datatype", "shape"],
                        "properties": {
                            "name": {"type": "string"},
                            "datatype": _ref("Datatype"),
                            "shape": {"type": "array", "items": {"type": "integer"}},
                            "parameters": {"type": "object"},
                            "data": _TENSOR_DATA,
                        },
                    },
                },
            },
        },
        "InvocationsRequest": {
            "type": "object",
            "description": "Exactly one of inputs, instances, dataframe_split, "
            "dataframe_records; params is accepted and ignored.",
            "properties": {
                "inputs": {"oneOf": [{"type": "array"}, {"type": "object"}]},
                "instances": {"type": "array"},
                "dataframe_split": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "columns": {"type": "array", "items": {"type": "string"}},
                        "data": {"type": "array"},
                        "index": {"type": "array"},
                    },
                },
                "dataframe_records": {"type": "array", "items": {"type": "object"}},
                "params": {"type": "object"},
            },
        },
        "ReloadOutcome": {
            "type": "object",
            "properties": {
                "outcome": {
                    "type": "string",
                    "enum": ["swapped", "unchanged", "refused", "registry_error"],
                },
                "version": {"type": ["string", "null"]},
                "serving": {"type": ["string", "null"]},
                "detail": {"type": "string"},
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "onnxflow endpoint",
            "version": "0.1.0",
            "description": f"Serves the registry's {model_name!r} model with "
            "onnxruntime: KServe V2 and MLflow scoring protocols.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {"Error": _json(_ref("Error"), "Error naming the problem")},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }

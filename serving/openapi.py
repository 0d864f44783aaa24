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


_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
_OBJECT = {"type": "object"}


def _object(required: list[str] | None = None, **properties: dict) -> dict:
    """A JSON object schema: its ``properties`` by name, ``required`` the ones it must have."""
    schema: dict = {"type": "object"}
    if required:
        schema["required"] = required
    return {**schema, "properties": properties} if properties else schema


def _array(items: dict) -> dict:
    return {"type": "array", "items": items}


#: What an inference request can end in besides 200 (serving/errors.py).
_INFERENCE_ERRORS = (400, 401, 404, 413, 415, 422, 503)


def _errors(*statuses: int) -> dict:
    """The error responses of an operation: each status answers the Error schema."""
    return {str(status): _ERROR for status in statuses}


def _optional_body(schema: dict) -> dict:
    """A JSON request body the operation also takes without."""
    return {"required": False, "content": {"application/json": {"schema": schema}}}


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


def _secured(summary: str, params: list, responses: dict, **extra) -> dict:
    """An operation that needs the bearer token (``extra``: requestBody, say)."""
    return {
        "summary": summary,
        "security": _BEARER,
        "parameters": params,
        "responses": responses,
        **extra,
    }


def _invocations(summary: str, params: list) -> dict:
    predictions = {
        "description": "Predictions by output name.",
        "headers": _version_headers(),
        "content": {"application/json": {"schema": _object(["predictions"], predictions=_OBJECT)}},
    }
    return _secured(
        summary,
        params,
        {"200": predictions, **_errors(*_INFERENCE_ERRORS)},
        requestBody={
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
    )


def _stats(summary: str, params: list) -> dict:
    stats = _json(_object(["model_stats"], model_stats={"type": "array"}))
    return _secured(summary, params, {"200": stats, **_errors(401, 404)})


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
            return _secured(summary + note, params, responses, **extra)

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
                    **_errors(*_INFERENCE_ERRORS),
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
                        **_errors(401, 404, 503),
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
                        **_errors(401, 404, 503),
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
                    **_errors(401, 404, 503),
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
                    **_errors(400, 401, 404, 409),
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
                "requestBody": _optional_body(_object(ready={"type": "boolean"})),
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}),
                    **_errors(400, 401),
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
                "requestBody": _optional_body(
                    _object(
                        parameters=_object(
                            config={"type": "string", "example": '{"max_batch_size": 16}'}
                        )
                    )
                ),
                "responses": {
                    "200": _json(_ref("ReloadOutcome")),
                    **_errors(400, 401, 404, 409),
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
                    **_errors(401, 403),
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
                    **_errors(401, 403),
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
    tensor_meta = _object(
        required=["name", "datatype", "shape"],
        name=_STRING,
        datatype=_ref("Datatype"),
        shape={**_array(_INTEGER), "description": "-1 marks a dynamic dimension."},
    )
    flag = {"type": "boolean"}
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
        "Error": _object(required=["error"], error=_STRING),
        "ServerMetadata": _object(
            required=["name", "version", "extensions"],
            name=_STRING,
            version=_STRING,
            extensions=_array(_STRING),
        ),
        "ModelConfig": _object(
            name=_STRING,
            platform={"type": "string", "example": "onnxruntime_onnx"},
            backend={"type": "string", "example": "onnxruntime"},
            max_batch_size={"type": "integer", "minimum": 0},
            input=_array(_ref("ModelConfigTensor")),
            output=_array(_ref("ModelConfigTensor")),
        ),
        "ModelConfigTensor": _object(
            name=_STRING,
            data_type={"type": "string", "example": "TYPE_FP32"},
            dims=_array(_INTEGER),
        ),
        "ModelMetadata": _object(
            required=["name", "platform", "inputs", "outputs"],
            name=_STRING,
            versions=_array(_STRING),
            platform=_STRING,
            inputs=_array(tensor_meta),
            outputs=_array(tensor_meta),
            parameters=_OBJECT,
        ),
        "ModelReady": _object(name=_STRING, ready=flag),
        "InferenceRequest": _object(
            required=["inputs"],
            id=_STRING,
            parameters=_object(binary_data_output=flag),
            inputs={
                **_array(
                    _object(
                        required=["name", "datatype", "shape"],
                        name=_STRING,
                        datatype=_ref("Datatype"),
                        shape=_array({"type": "integer", "minimum": 0}),
                        parameters=_object(binary_data_size={"type": "integer", "minimum": 0}),
                        data=_TENSOR_DATA,
                    )
                ),
                "minItems": 1,
            },
            outputs=_array(
                _object(required=["name"], name=_STRING, parameters=_object(binary_data=flag))
            ),
        ),
        "InferenceResponse": _object(
            required=["model_name", "model_version", "outputs"],
            model_name=_STRING,
            model_version=_STRING,
            id=_STRING,
            outputs=_array(
                _object(
                    required=["name", "datatype", "shape"],
                    name=_STRING,
                    datatype=_ref("Datatype"),
                    shape=_array(_INTEGER),
                    parameters=_OBJECT,
                    data=_TENSOR_DATA,
                )
            ),
        ),
        "InvocationsRequest": {
            **_object(
                inputs={"oneOf": [{"type": "array"}, _OBJECT]},
                instances={"type": "array"},
                dataframe_split=_object(
                    required=["data"],
                    columns=_array(_STRING),
                    data={"type": "array"},
                    index={"type": "array"},
                ),
                dataframe_records=_array(_OBJECT),
                params=_OBJECT,
            ),
            "description": "Exactly one of inputs, instances, dataframe_split, "
            "dataframe_records; params is accepted and ignored.",
        },
        "ReloadOutcome": _object(
            outcome={
                "type": "string",
                "enum": ["swapped", "unchanged", "refused", "registry_error"],
            },
            version={"type": ["string", "null"]},
            serving={"type": ["string", "null"]},
            detail=_STRING,
        ),
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

"""Triton's model configuration, as far as this endpoint has one.

A model's Triton config is derived from the ONNX model (:func:`triton_config`, used by the
REST ``GET /v2/models/NAME/config`` and gRPC ``ModelConfig`` alike). A load through the
model repository extension may carry an override in Triton's JSON model-config format
(parameter ``config``); exactly one field is supported, ``max_batch_size``: the most rows
(first dimension) one request may carry, and the most the dynamic batcher merges for that
model. 0, the default, is no limit. Anything else in the override is refused, never
ignored. Model files (``file:PATH`` parameters) are refused too: models come from the
registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from onnxflow.serving.errors import BadInput
from onnxflow.serving.model import LoadedModel

SUPPORTED_FIELDS = ("max_batch_size",)
NAME_MAX = 255  # bytes in one path component, as the file systems Triton runs on allow


@dataclass(frozen=True)
class ConfigOverride:
    """What a load's ``config`` parameter changed. Lives until the model is unloaded."""

    max_batch_size: int = 0  # 0: no limit


def check_file_path(path: str) -> None:
    """Refuse a model file path no file system would take, or one leaving the model folder."""
    for part in path.split("/"):
        problem = None
        if len(part.encode()) > NAME_MAX:
            problem = f"a path component is longer than {NAME_MAX} bytes"
        elif part == "..":
            problem = "it contains '..'"
        if problem:
            shown = path if len(path) <= 60 else path[:60] + "..."
            raise BadInput(f"Invalid file path: {shown!r}: {problem}")


def parse_load_parameters(name: str, parameters: dict) -> ConfigOverride | None:
    """The config override a load carries (None: it carries none), after refusing model
    files and parameters this endpoint does not take."""
    files = [key.removeprefix("file:") for key in parameters if key.startswith("file:")]
    for path in files:
        check_file_path(path)
    if files:
        raise BadInput(
            f"failed to load {name!r}: model files cannot be uploaded: "
            "models come from the registry"
        )
    unknown = sorted(set(parameters) - {"config"})
    if unknown:
        raise BadInput(
            f"failed to load {name!r}: load parameters not supported: {unknown} (supported: config)"
        )
    if "config" not in parameters:
        return None
    return parse_config(name, parameters["config"])


def parse_config(name: str, text) -> ConfigOverride:
    """A Triton JSON model config, of which only ``max_batch_size`` is supported."""
    try:
        config = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"failed to load {name!r}: the config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise BadInput(
            f"failed to load {name!r}: the config is not valid JSON: expected an object, "
            f"got {type(config).__name__}"
        )
    unknown = sorted(set(config) - set(SUPPORTED_FIELDS))
    if unknown:
        raise BadInput(
            f"failed to load {name!r}: config fields not supported: {unknown} "
            f"(supported: {', '.join(SUPPORTED_FIELDS)})"
        )
    value = config.get("max_batch_size", 0)
    # protobuf's JSON writes int64 fields as strings: "16" is 16
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadInput(
            f"failed to load {name!r}: max_batch_size must be a whole number >= 0 "
            f"(0: no limit), got {value!r}"
        )
    return ConfigOverride(max_batch_size=value)


def config_type(datatype: str) -> str:
    """A V2 datatype as Triton's model-config data type (BYTES is TYPE_STRING there)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def triton_config(model: LoadedModel, max_batch_size: int = 0) -> dict:
    """The model's Triton config (JSON form): with ``max_batch_size`` > 0 the batch
    dimension is left out of every tensor's dims, as Triton writes them."""
    skip = 1 if max_batch_size > 0 else 0

    def tensors(specs) -> list[dict]:
        return [
            {"name": s.name, "data_type": config_type(s.datatype), "dims": list(s.shape[skip:])}
            for s in specs
        ]

    return {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": max_batch_size,
        "input": tensors(model.inputs),
        "output": tensors(model.outputs),
    }

"""Tensors at the edge: V2 datatypes, ONNX types, and turning JSON or bytes into arrays.

Everything a client sends is checked here before an array is allocated: name, datatype,
rank and fixed dimensions against the model, element count against the data, and the
declared size against the memory limit. Failures raise
:class:`~onnxflow.serving.errors.RequestError` (or :class:`~onnxflow.serving.errors.TooLarge`)
with a message that names the input and what was expected.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from onnxflow.errors import ServingError
from onnxflow.serving.errors import RequestError, TooLarge

# V2 datatype -> numpy dtype (little-endian, as the binary extension requires).
V2_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# onnxruntime's type strings -> V2 datatype.
ONNX_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# The dtype names MLflow writes in signatures, for clients that only know those.
V2_TO_NUMPY_NAME = {k: ("str" if k == "BYTES" else v.name) for k, v in V2_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, V2 datatype, and shape (-1 where dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return V2_DTYPES[self.datatype]

    @classmethod
    def from_ort(cls, node) -> TensorSpec:
        datatype = ONNX_TO_V2.get(node.type)
        if datatype is None:
            raise ServingError(
                f"{node.name!r} has type {node.type}; the endpoint serves tensors of "
                f"{', '.join(sorted(ONNX_TO_V2))}"
            )
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
        return cls(node.name, datatype, shape)

    def as_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def itemsize(datatype: str) -> int:
    """Bytes per element for the memory check; BYTES counts its array slot."""
    return V2_DTYPES[datatype].itemsize


def check_shape(spec: TensorSpec, shape, max_bytes: int) -> tuple[int, ...]:
    """Validate a declared shape against the model and the memory limit; nothing allocated."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise RequestError(f"input {spec.name!r}: shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise RequestError(f"input {spec.name!r}: shape {shape} has a negative dimension")
    if len(shape) != len(spec.shape):
        raise RequestError(
            f"input {spec.name!r}: expected {len(spec.shape)} dimensions "
            f"{list(spec.shape)}, got shape {shape}"
        )
    for i, (want, got) in enumerate(zip(spec.shape, shape)):
        if want != -1 and want != got:
            raise RequestError(
                f"input {spec.name!r}: dimension {i} must be {want} "
                f"(model shape {list(spec.shape)}), got shape {shape}"
            )
    count = math.prod(shape)
    if count == 0:
        raise RequestError(f"input {spec.name!r}: shape {shape} holds no elements")
    needed = count * itemsize(spec.datatype)
    if needed > max_bytes:
        raise TooLarge(
            f"input {spec.name!r}: shape {shape} needs {needed} bytes, more than the "
            f"limit of {max_bytes} bytes"
        )
    return tuple(shape)


def check_array(spec: TensorSpec, arr: np.ndarray) -> None:
    """An array parsed from a request against the model's rank and fixed dimensions."""
    shape = arr.shape
    if len(shape) != len(spec.shape):
        raise RequestError(
            f"input {spec.name!r}: expected {len(spec.shape)} dimensions "
            f"{list(spec.shape)}, got shape {list(shape)}"
        )
    for want, got in zip(spec.shape, shape):
        if want != got and want != -1:
            raise RequestError(
                f"input {spec.name!r}: expected shape {list(spec.shape)}, got {list(shape)}"
            )
    if arr.size == 0:
        raise RequestError(f"input {spec.name!r}: shape {list(shape)} holds no elements")


def array_from_json(spec: TensorSpec, values, shape: tuple[int, ...] | None) -> np.ndarray:
    """JSON values (flat or nested, row-major) -> array of the model's dtype and ``shape``.

    With ``shape`` None (MLflow formats) the nesting gives the shape. Values must be of
    the datatype's kind: numbers for numeric types (integers for integer types), true or
    false for BOOL, strings for BYTES; numbers out of an integer type's range are refused.
    """
    name = spec.name
    if not isinstance(values, list):
        values = [values]
    try:
        raw = np.array(values)
    except (ValueError, OverflowError):
        raise RequestError(
            f"input {name!r}: data is not a regular (rectangular) array of {spec.datatype} values"
        ) from None
    kind = raw.dtype.kind
    dtype = spec.dtype
    if spec.datatype == "BYTES":
        if kind != "U" and raw.size:
            raise RequestError(
                f"input {name!r}: BYTES data must be strings, got {_kind_name(kind)}"
            )
        arr = raw.astype(object)
    elif spec.datatype == "BOOL":
        if kind != "b" and raw.size:
            raise RequestError(
                f"input {name!r}: BOOL data must be true or false, got {_kind_name(kind)}"
            )
        arr = raw.astype(np.bool_)
    elif dtype.kind == "f":
        if kind not in "iufb" and raw.size:
            raise RequestError(
                f"input {name!r}: {spec.datatype} data must be numbers, got {_kind_name(kind)}"
            )
        arr = raw.astype(dtype)
    else:
        if kind == "f" and spec.datatype == "UINT64":
            raw = _exact_uint64(values, raw)
            kind = raw.dtype.kind
        if kind not in "iub" and raw.size:
            raise RequestError(
                f"input {name!r}: {spec.datatype} data must be integers, got {_kind_name(kind)}"
            )
        if raw.size and kind in "iu":
            info = np.iinfo(dtype)
            lo, hi = raw.min(), raw.max()
            if lo < info.min or hi > info.max:
                raise RequestError(
                    f"input {name!r}: values from {lo} to {hi} do not fit {spec.datatype} "
                    f"({info.min}..{info.max})"
                )
        arr = raw.astype(dtype)
    if shape is None:
        return arr
    if arr.size != math.prod(shape):
        raise RequestError(
            f"input {name!r}: shape {list(shape)} needs {math.prod(shape)} values, "
            f"data has {arr.size}"
        )
    return arr.reshape(shape)


def _exact_uint64(values, raw: np.ndarray) -> np.ndarray:
    """numpy reads integers above the int64 range mixed with smaller ones as float64; when
    every value is an integer in 0..2**64-1, read them exactly as uint64 instead."""
    exact = np.array(values, dtype=object)
    flat = exact.reshape(-1)
    if exact.shape == raw.shape and all(type(v) is int and 0 <= v < 2**64 for v in flat):
        return exact.astype(np.uint64)
    return raw


def _kind_name(kind: str) -> str:
    return {
        "U": "strings",
        "S": "strings",
        "O": "nulls, mixed types or integers beyond 64 bits",
        "b": "booleans",
        "f": "non-integer numbers",
        "i": "integers",
        "u": "integers",
    }.get(kind, f"values of kind {kind!r}")


def array_from_binary(spec: TensorSpec, buf: memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """Binary tensor data (little-endian, row-major; BYTES length-prefixed) -> array."""
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        items = []
        pos, end = 0, len(buf)
        while pos < end:
            if pos + 4 > end:
                raise RequestError(f"input {spec.name!r}: BYTES data ends inside a length prefix")
            (length,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if pos + length > end:
                raise RequestError(f"input {spec.name!r}: BYTES element runs past its binary data")
            items.append(bytes(buf[pos : pos + length]))
            pos += length
        if len(items) != count:
            raise RequestError(
                f"input {spec.name!r}: shape {list(shape)} needs {count} BYTES elements, "
                f"binary data has {len(items)}"
            )
        arr = np.empty(count, dtype=object)
        arr[:] = [_as_text(b) for b in items]
        return arr.reshape(shape)
    expected = count * spec.dtype.itemsize
    if len(buf) != expected:
        raise RequestError(
            f"input {spec.name!r}: shape {list(shape)} of {spec.datatype} needs {expected} "
            f"bytes, binary_data_size is {len(buf)}"
        )
    if spec.datatype == "BOOL":
        raw = np.frombuffer(buf, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise RequestError(f"input {spec.name!r}: BOOL binary data must be bytes 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    return np.frombuffer(buf, dtype=spec.dtype).reshape(shape)


def _as_text(value: bytes):
    # onnxruntime string tensors hold str; undecodable bytes go through unchanged.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def array_to_binary(datatype: str, arr: np.ndarray) -> bytes:
    """An output as binary tensor data (see :func:`array_from_binary`)."""
    if datatype == "BYTES":
        parts = []
        for item in arr.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=V2_DTYPES[datatype]).tobytes()


def array_to_json(datatype: str, arr: np.ndarray):
    """An output as flat row-major JSON data: an array orjson serialises, or a list."""
    flat = arr.reshape(-1)
    if datatype == "BYTES":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in flat]
    return np.ascontiguousarray(flat)

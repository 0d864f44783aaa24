"""MLflow's scoring format (``POST /invocations``), parsed without pandas.

Accepted, as ``mlflow models serve`` accepts them for a model with a tensor signature:

* ``{"inputs": [[...], ...]}`` (one input) or ``{"inputs": {"name": [...], ...}}``;
* ``{"instances": [row, ...]}`` with rows that are values or ``{"name": value}`` objects;
* ``{"dataframe_split": {"columns": [...], "data": [[...], ...]}}`` and
  ``{"dataframe_records": [{"column": value}, ...]}``: a column named after an input holds
  one flattened tensor per row; for a one-input model with shape ``[-1, n]`` the ``n``
  columns are the features;
* ``text/csv`` with a header row, read like ``dataframe_split``.

The answer is ``{"predictions": {"output name": [...], ...}}``, as MLflow's ONNX flavor
answers these requests.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from onnxflow.serving.tensors import RequestError, TensorSpec, array_from_json, check_array

FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")


def parse_payload(payload, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """A decoded JSON request -> feeds for the model, every input checked against ``specs``.

    Memory is bounded by the body size limit: every value is in the JSON already.
    """
    if not isinstance(payload, dict):
        raise RequestError(
            f"expected a JSON object with one of the keys {', '.join(FORMATS)}; "
            f"got a JSON {type(payload).__name__}"
        )
    if len(payload) == 1 and "inputs" in payload and len(specs) == 1:
        values = payload["inputs"]
        if isinstance(values, list):  # the common case: one unnamed tensor
            spec = specs[0]
            arr = array_from_json(spec, values, None)
            check_array(spec, arr)
            return {spec.name: arr}
    if len(payload) == 1 and "inputs" in payload:
        found, unknown = ["inputs"], []
    else:
        found = [k for k in payload if k in FORMATS]
        unknown = [k for k in payload if k not in FORMATS and k != "params"]
    if len(found) != 1 or unknown:
        raise RequestError(
            f"expected exactly one of the keys {', '.join(FORMATS)} (and optionally params); "
            f"got {', '.join(map(repr, payload)) or 'an empty object'}"
        )
    key = found[0]
    value = payload[key]
    if key == "inputs":
        feeds = _from_inputs(value, specs)
    elif key == "instances":
        feeds = _from_instances(value, specs)
    elif key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("data"), list):
            raise RequestError('dataframe_split must be an object with "columns" and "data" lists')
        columns = value.get("columns")
        rows = value["data"]
        if columns is None:
            columns = [specs[0].name] if len(specs) == 1 and _is_single_column(rows) else []
        feeds = _from_columns(columns, rows, specs)
    else:
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value) or not value:
            raise RequestError("dataframe_records must be a non-empty list of objects")
        columns = list(value[0])
        rows = []
        for i, record in enumerate(value):
            if list(record) != columns and set(record) != set(columns):
                raise RequestError(f"dataframe_records: record {i} has columns {list(record)}, "
                               f"record 0 has {columns}")
            rows.append([record[c] for c in columns])
        feeds = _from_columns(columns, rows, specs)
    for spec in specs:
        check_array(spec, feeds[spec.name])
    return feeds


def predictions(names: list[str], results: list[np.ndarray]) -> dict:
    """The response body: ``{"predictions": {name: nested list}}``, as MLflow answers."""
    return {"predictions": {name: _jsonable(arr) for name, arr in zip(names, results)}}


def _jsonable(arr: np.ndarray):
    if arr.dtype != object:
        return arr  # orjson writes numeric and bool arrays natively
    return np.vectorize(_text, otypes=[object])(arr).tolist()


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_csv(text: str, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """``text/csv`` with a header row, as a ``dataframe_split``."""
    # newline="": the csv module reads line endings itself (a bare \r is one, not an error)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        rows = [[_csv_value(cell) for cell in row] for row in reader if row]
    except StopIteration:
        raise RequestError("CSV body is empty; expected a header row and data rows") from None
    except csv.Error as exc:  # NUL bytes, fields over the size limit, bad quoting
        raise RequestError(f"malformed CSV: {exc}") from None
    return parse_payload({"dataframe_split": {"columns": header, "data": rows}}, specs)


def _csv_value(cell: str):
    for convert in (int, float):
        try:
            return convert(cell)
        except ValueError:
            pass
    return cell


def _names(specs) -> list[str]:
    return [s.name for s in specs]


def _check_names(given, specs, what: str) -> None:
    names = _names(specs)
    missing = [n for n in names if n not in given]
    extra = [n for n in given if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unknown {', '.join(map(repr, extra))}")
        raise RequestError(f"{what}: {'; '.join(parts)} (model inputs: {', '.join(names)})")


def _single(specs, what: str) -> TensorSpec:
    if len(specs) != 1:
        raise RequestError(
            f"{what}: an unnamed array only fits a model with one input; this model has "
            f"{len(specs)} ({', '.join(_names(specs))}); send an object keyed by input name"
        )
    return specs[0]


def _from_inputs(value, specs) -> dict[str, np.ndarray]:
    if isinstance(value, dict):
        _check_names(value, specs, "inputs")
        return {s.name: array_from_json(s, value[s.name], None) for s in specs}
    if isinstance(value, list):
        spec = _single(specs, "inputs")
        return {spec.name: array_from_json(spec, value, None)}
    raise RequestError("inputs must be an array or an object keyed by input name")


def _from_instances(value, specs) -> dict[str, np.ndarray]:
    if not isinstance(value, list) or not value:
        raise RequestError("instances must be a non-empty array")
    if all(isinstance(row, dict) for row in value):
        for i, row in enumerate(value):
            _check_names(row, specs, f"instances[{i}]")
        return {s.name: array_from_json(s, [row[s.name] for row in value], None) for s in specs}
    if any(isinstance(row, dict) for row in value):
        raise RequestError("instances must be all objects or all values, not a mix")
    spec = _single(specs, "instances")
    return {spec.name: array_from_json(spec, value, None)}


def _is_single_column(rows) -> bool:
    return all(isinstance(r, list) and len(r) == 1 for r in rows)


def _from_columns(columns, rows, specs) -> dict[str, np.ndarray]:
    if not isinstance(columns, list) or not all(isinstance(c, (str, int)) for c in columns):
        raise RequestError("dataframe columns must be a list of names")
    if not rows:
        raise RequestError("the dataframe has no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            raise RequestError(f"dataframe row {i} has {len(row) if isinstance(row, list) else 'no'} "
                           f"values for {len(columns)} columns")
    names = _names(specs)
    columns = [str(c) for c in columns]
    if any(c in names for c in columns) or len(specs) > 1:
        # One column per input, each cell one row's (flattened) tensor.
        _check_names(columns, specs, "dataframe columns")
        feeds = {}
        for spec in specs:
            j = columns.index(spec.name)
            arr = array_from_json(spec, [row[j] for row in rows], None)
            row_shape = spec.shape[1:]
            if arr.ndim != len(spec.shape) and -1 not in row_shape:
                size = int(np.prod(row_shape)) if row_shape else 1
                if arr.size != len(rows) * size:
                    raise RequestError(
                        f"column {spec.name!r}: each row must hold {size} values for shape "
                        f"{list(spec.shape)}"
                    )
                arr = arr.reshape((len(rows), *row_shape))
            feeds[spec.name] = arr
        return feeds
    # Unnamed input: the columns are its features, as MLflow maps a DataFrame on [-1, n].
    spec = specs[0]
    if len(spec.shape) != 2 or spec.shape[1] not in (-1, len(columns)):
        raise RequestError(
            f"{len(columns)} dataframe columns fit an input of shape [-1, {len(columns)}]; "
            f"input {spec.name!r} has shape {list(spec.shape)}. Name the column "
            f"{spec.name!r} to send whole tensors per row"
        )
    return {spec.name: array_from_json(spec, rows, None)}

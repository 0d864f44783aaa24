"""MLflow's scoring format (``POST /invocations``), parsed without pandas.

Accepted, with the meaning ``mlflow models serve`` gives them for a model with a tensor
signature (the differences that remain are listed in the README):

* ``{"inputs": [[...], ...]}`` (one input) or ``{"inputs": {"name": [...], ...}}``;
* ``{"instances": [row, ...]}`` with rows that are values or ``{"name": value}`` objects;
* ``{"dataframe_split": {"columns": [...], "data": [[...], ...], "index": [...]}}``
  (``columns`` optional: the columns are then 0, 1, ...) and
  ``{"dataframe_records": [{"column": value}, ...]}`` (a later record may leave a column out:
  a missing value). A column named after an input holds one flattened tensor per row; for a
  one-input model with shape ``[-1, n]`` the ``n`` columns are the features;
* ``text/csv`` (see :func:`parse_csv` for how the header row is told from data).

Values convert as MLflow converts them: ``null`` and ``NaN`` (the bare literal Python's
``json.dumps`` writes) are missing values of float inputs; numeric strings ("1.5", "NaN")
are numbers for numeric inputs; an integral float (3.0) fits an integer input. What would
lose or invent information is refused with a 400 that names it: a fraction for an integer
input (MLflow truncates), a string for a BOOL input (MLflow takes "false" as true), a CSV
whose first row could be a header or data.

The answer is ``{"predictions": {"output name": [...], ...}}``, as MLflow's ONNX flavor
answers these requests.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import re

import numpy as np
import orjson

from onnxflow.serving.errors import RequestError, UnsupportedMedia
from onnxflow.serving.tensors import TensorSpec, array_from_json, check_array

FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")
JSON = "application/json"
CSV = "text/csv"
#: What pandas.read_csv (so ``mlflow models serve``) reads as a missing value by default.
CSV_MISSING = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


@functools.cache
def mlflow_version() -> str:
    """The installed MLflow's version, read from its metadata (MLflow is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlflow")
    except PackageNotFoundError:
        return "unknown"


def parse_body(
    body: bytes, content_type: str, specs: tuple[TensorSpec, ...]
) -> dict[str, np.ndarray]:
    """A request body of ``content_type`` (JSON or CSV, parameters checked) -> feeds."""
    mime, params = content_type_parameters(content_type)
    if mime == CSV:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("CSV body is not UTF-8") from None
        return parse_csv(text, specs, header=params.get("header"))
    return parse_payload(decode_json(body), specs)


def content_type_parameters(content_type: str) -> tuple[str, dict[str, str]]:
    """``text/csv; charset=utf-8; header=absent`` -> ("text/csv", {"header": "absent"}).

    As MLflow: UTF-8 only, and no parameter the route does not read (415). CSV also takes
    RFC 4180's ``header=present|absent``.
    """
    mime, *parts = [p.strip() for p in content_type.split(";")]
    mime = mime.lower()
    params: dict[str, str] = {}
    for part in parts:
        if part:
            key, _, value = part.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
    charset = params.pop("charset", "utf-8").lower()
    if charset != "utf-8":
        raise UnsupportedMedia(f"charset {charset!r}: the endpoint reads UTF-8 only")
    allowed = {"header"} if mime == CSV else set()
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise UnsupportedMedia(
            f"unrecognized Content-Type parameter {', '.join(unknown)} for {mime}; "
            + (
                "text/csv takes charset=utf-8 and header=present|absent"
                if mime == CSV
                else f"{mime} takes charset=utf-8 only"
            )
        )
    if "header" in params:
        params["header"] = params["header"].lower()
        if params["header"] not in ("present", "absent"):
            raise UnsupportedMedia(
                f"Content-Type parameter header={params['header']}: "
                "expected header=present or header=absent"
            )
    return mime, params


def decode_json(body: bytes):
    """JSON -> Python; also the bare ``NaN``/``Infinity`` that Python's ``json.dumps`` (and
    MLflow's own client) write for missing and infinite values."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        error = exc
    try:  # the slow path: only bodies orjson refuses
        payload = json.loads(body)
        orjson.dumps(payload)  # refuses what orjson would: lone surrogates in strings
    except (ValueError, TypeError, RecursionError):
        raise RequestError(f"malformed JSON: {error}") from None
    return payload


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
            arr = _array(spec, values)
            check_array(spec, arr)
            return {spec.name: arr}
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
        columns, rows = _split(value)
        feeds = _from_columns(columns, rows, specs)
    else:
        columns, rows = _records(value)
        feeds = _from_columns(columns, rows, specs)
    for spec in specs:
        check_array(spec, feeds[spec.name])
    return feeds


def _split(value) -> tuple[list, list]:
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        raise RequestError(
            'dataframe_split must be an object with a "data" list (and '
            'optionally "columns" and "index")'
        )
    extra = sorted(set(value) - {"columns", "data", "index"})
    if extra:
        raise RequestError(
            f"dataframe_split: unknown key {', '.join(map(repr, extra))}; "
            'expected "data" and optionally "columns" and "index"'
        )
    rows = value["data"]
    index = value.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(rows)):
        given = f"{len(index)} labels" if isinstance(index, list) else "not a list"
        raise RequestError(f"dataframe_split: index is {given} for {len(rows)} rows of data")
    columns = value.get("columns")
    if columns is None:  # as pandas: columns 0, 1, ... (rows must agree on their width)
        width = len(rows[0]) if rows and isinstance(rows[0], list) else 0
        columns = list(range(width))
    return columns, rows


def _records(value) -> tuple[list, list]:
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value) or not value:
        raise RequestError("dataframe_records must be a non-empty list of objects")
    columns = list(value[0])
    known = set(columns)
    rows = []
    for i, record in enumerate(value):
        extra = [c for c in record if c not in known]
        if extra:  # pandas would append the column last, shifting the features after it
            raise RequestError(
                f"dataframe_records: record {i} has column {extra[0]!r} that record 0 lacks; "
                "give record 0 every column (null for a missing value)"
            )
        rows.append([record.get(c) for c in columns])  # left out: a missing value, as pandas
    return columns, rows


def predictions(names: list[str], results: list[np.ndarray]) -> dict:
    """The response body: ``{"predictions": {name: nested list}}``, as MLflow answers."""
    return {"predictions": {name: _jsonable(arr) for name, arr in zip(names, results)}}


def _jsonable(arr: np.ndarray):
    if arr.dtype != object:
        return arr  # orjson writes numeric and bool arrays natively (NaN as null)
    return np.vectorize(_text, otypes=[object])(arr).tolist()


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --- values as MLflow converts them ---------------------------------------------------


def _array(spec: TensorSpec, values) -> np.ndarray:
    """JSON values -> array, strictly first; on failure, with MLflow's conversions."""
    try:
        return array_from_json(spec, values, None)
    except RequestError:
        converted = _converted(spec, values)
        if converted is None:
            raise
    return array_from_json(spec, converted, None)


def _converted(spec: TensorSpec, values):
    """``values`` with null/numeric strings/integral floats converted for a numeric input;
    None if there is nothing to convert (the strict error stands)."""
    kind = spec.dtype.kind
    if kind not in "fiu":
        return None
    try:
        raw = np.array(values, dtype=object)
    except (ValueError, TypeError):
        return None
    flat = raw.reshape(-1)
    if any(isinstance(v, (list, dict)) for v in flat):
        return None  # ragged: the strict message says so
    convert = _to_float if kind == "f" else _to_int
    out = [convert(spec, v) for v in flat]
    if all(a is b for a, b in zip(out, flat)):
        return None
    return np.array(out, dtype=object).reshape(raw.shape).tolist()


def _to_float(spec: TensorSpec, value):
    if value is None:
        return math.nan
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise RequestError(
                f"input {spec.name!r}: {_short(value)} is not a number ({spec.datatype})"
            ) from None
    return value


def _to_int(spec: TensorSpec, value):
    if value is None:
        raise RequestError(
            f"input {spec.name!r}: null (a missing value) only fits float "
            f"inputs; this one is {spec.datatype}"
        )
    if isinstance(value, str):
        if not _INTEGER.fullmatch(value):
            raise RequestError(
                f"input {spec.name!r}: {_short(value)} is not an integer ({spec.datatype})"
            )
        return int(value)
    if isinstance(value, float):
        if not value.is_integer():  # MLflow would truncate it
            raise RequestError(
                f"input {spec.name!r}: {value!r} is not an integer "
                f"({spec.datatype}); send whole numbers"
            )
        return int(value)
    return value


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


# --- CSV ------------------------------------------------------------------------------


def parse_csv(
    text: str, specs: tuple[TensorSpec, ...], header: str | None = None
) -> dict[str, np.ndarray]:
    """``text/csv`` -> feeds: one row per line, every line answered.

    ``header`` is RFC 4180's ``present`` or ``absent`` (from the Content-Type); without it
    the first row is a header when it names the model's inputs, or (one numeric input)
    when none of its cells is a value; it is data when every cell is a value. A first
    row that could be either (pandas' default names ``0,1,...``, strings for a string
    input, a mix) is refused: declare the header. Missing values (empty, ``NaN``, ``NA``...
    as pandas reads them) fit float inputs. Blank lines between rows are refused.
    """
    text = text.removeprefix("\ufeff")  # the byte-order mark Excel writes, as pandas drops it
    # newline="": the csv module reads line endings itself (a bare \r is one, not an error)
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, lines, blank = [], [], None
    try:
        for row in reader:
            if not row:
                blank = blank or reader.line_num
                continue
            if blank is not None:
                raise RequestError(
                    f"CSV line {blank} is blank; every line between the first "
                    "and the last must be a row"
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:  # NUL bytes, fields over the size limit, bad quoting
        raise RequestError(f"malformed CSV: {exc}") from None
    if not rows:
        raise RequestError(
            "CSV body is empty; expected rows of values (and optionally a header row)"
        )
    columns = _csv_columns(rows[0], specs, header)
    if columns is None:
        columns = list(range(len(rows[0])))
    else:
        rows, lines = rows[1:], lines[1:]
        if not rows:
            raise RequestError("CSV has a header row but no data rows")
    for row, line in zip(rows, lines):
        if len(row) != len(columns):
            raise RequestError(f"CSV line {line} has {len(row)} values for {len(columns)} columns")
    if len(specs) == 1:
        return {specs[0].name: _csv_array(specs[0], rows, lines, columns)}
    _check_names(columns, specs, "CSV header")
    feeds = {}
    for spec in specs:
        j = columns.index(spec.name)
        feeds[spec.name] = _csv_array(spec, [[r[j]] for r in rows], lines, [spec.name])
    return feeds


def _width(spec: TensorSpec) -> int | None:
    """Values per row of ``spec`` (None: dynamic)."""
    rest = spec.shape[1:]
    return None if -1 in rest else math.prod(rest)


def _csv_columns(first: list[str], specs, header: str | None) -> list[str] | None:
    """The header row's names, or None when the first row is data."""
    names = [s.name for s in specs]
    if header == "present":
        return first
    if len(specs) > 1:
        if header is None and sorted(first) == sorted(names):
            return first
        raise RequestError(
            f"a CSV for a model with {len(specs)} inputs needs a header row naming them "
            f"({', '.join(names)}); the first row is {_row(first)}"
        )
    if header == "absent":
        return None
    spec = specs[0]
    if first == [spec.name] and _width(spec) == 1:
        return first
    if spec.datatype == "BYTES":
        raise RequestError(
            f"cannot tell whether the first CSV row {_row(first)} is a header or data for the "
            f"string input {spec.name!r}: declare it with Content-Type: text/csv; "
            "header=present (or header=absent)"
        )
    filled = [cell for cell in first if cell.strip()]  # an empty cell: a gap or no name
    values = [_is_value(spec, cell) for cell in filled]
    if all(values):
        if first == [str(i) for i in range(len(first))]:
            raise RequestError(
                f"the first CSV row {_row(first)} could be pandas' default column names or "
                "data: declare it with Content-Type: text/csv; header=present (or "
                "header=absent)"
            )
        return None
    if not any(values):
        return first
    names = [c for c, v in zip(filled, values) if not v][:3]
    raise RequestError(
        f"the first CSV row mixes values and names (not {spec.datatype} values: "
        f"{', '.join(map(repr, names))}): send a header of names only, or declare it with "
        "Content-Type: text/csv; header=present|absent"
    )


def _row(cells: list[str]) -> str:
    text = ",".join(cells)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _is_value(spec: TensorSpec, cell: str) -> bool:
    try:
        _csv_cell(spec, cell)
    except ValueError:
        return False
    return True


def _csv_cell(spec: TensorSpec, cell: str):
    """One CSV cell as a value of ``spec``'s datatype; ValueError if it is not one."""
    kind = spec.dtype.kind
    if kind == "f":
        return math.nan if cell.strip() in CSV_MISSING else float(cell)
    if kind in "iu":
        if not _INTEGER.fullmatch(cell):
            raise ValueError(cell)
        return int(cell)
    if kind == "b":
        lowered = cell.strip().lower()
        if lowered not in ("true", "false"):
            raise ValueError(cell)
        return lowered == "true"
    return cell


def _csv_array(spec: TensorSpec, rows, lines, columns) -> np.ndarray:
    """Rows of cells -> the input's array, shape [rows, columns] (or [rows] for [-1])."""
    width = _width(spec)
    if len(spec.shape) == 1:
        fits = len(columns) == 1
    else:
        fits = len(spec.shape) == 2 and width in (None, len(columns))
    if not fits:
        hint = "a CSV row holds one value per column; send JSON for tensors of other shapes"
        if columns and columns[0] == "" and width == len(columns) - 1:
            hint = (
                "the first column has no name: a DataFrame's index? Write the CSV with "
                "to_csv(index=False)"
            )
        raise RequestError(
            f"{len(columns)} CSV columns do not fit input {spec.name!r} of "
            f"shape {list(spec.shape)}: {hint}"
        )
    out = []
    for row, line in zip(rows, lines):
        for j, cell in enumerate(row):
            try:
                out.append(_csv_cell(spec, cell))
            except ValueError:
                column = columns[j] if isinstance(columns[j], str) else j + 1
                raise RequestError(
                    f"CSV line {line}, column {column!r}: {_short(cell)} is not a "
                    f"{spec.datatype} value"
                    + (
                        " (missing values only fit float inputs)"
                        if cell.strip() in CSV_MISSING
                        else ""
                    )
                ) from None
    shape = (len(rows),) if len(spec.shape) == 1 else (len(rows), len(columns))
    arr = array_from_json(spec, out, shape)
    check_array(spec, arr)
    return arr


# --- JSON formats -----------------------------------------------------------------------


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
        return {s.name: _array(s, value[s.name]) for s in specs}
    if isinstance(value, list):
        spec = _single(specs, "inputs")
        return {spec.name: _array(spec, value)}
    raise RequestError("inputs must be an array or an object keyed by input name")


def _from_instances(value, specs) -> dict[str, np.ndarray]:
    if not isinstance(value, list) or not value:
        raise RequestError("instances must be a non-empty array")
    if all(isinstance(row, dict) for row in value):
        for i, row in enumerate(value):
            _check_names(row, specs, f"instances[{i}]")
        return {s.name: _array(s, [row[s.name] for row in value]) for s in specs}
    if any(isinstance(row, dict) for row in value):
        raise RequestError("instances must be all objects or all values, not a mix")
    spec = _single(specs, "instances")
    return {spec.name: _array(spec, value)}


def _is_single_column(rows) -> bool:
    return all(isinstance(r, list) and len(r) == 1 for r in rows)


def _from_columns(columns, rows, specs) -> dict[str, np.ndarray]:
    if not isinstance(columns, list) or not all(isinstance(c, (str, int)) for c in columns):
        raise RequestError("dataframe columns must be a list of names")
    if not rows:
        raise RequestError("the dataframe has no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            count = len(row) if isinstance(row, list) else "no"
            raise RequestError(f"dataframe row {i} has {count} values for {len(columns)} columns")
    names = _names(specs)
    if len(specs) == 1 and columns == [0] and _is_single_column(rows):
        columns = [specs[0].name]  # unnamed single column: whole tensors of the one input
    columns = [str(c) for c in columns]
    if any(c in names for c in columns) or len(specs) > 1:
        # One column per input, each cell one row's (flattened) tensor.
        _check_names(columns, specs, "dataframe columns")
        feeds = {}
        for spec in specs:
            j = columns.index(spec.name)
            arr = _array(spec, [row[j] for row in rows])
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
    return {spec.name: _array(spec, rows)}

"""``/invocations`` payloads from MLflow's docs and its scoring-server tests, for two models.

Each case is sent as-is (bytes and content type) to ``mlflow models serve`` and to the
endpoint; :func:`compare` says whether the two answers mean the same: both a 2xx with the
same predictions (NaN and null count as the same missing value), or both a 4xx. Where
they differ on purpose, :data:`DIFFERENCES` says why (the README lists the same).

* ``digits``: one float32 input ``features`` of shape [-1, 64] (MLflow: an unnamed tensor
  signature), output ``logits`` [-1, 10];
* ``multi``: seven named inputs of seven datatypes (see ``models.multi_io``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from tests.serving import models

JSON = "application/json"
CSV = "text/csv"

ROWS = np.random.default_rng(7).normal(size=(3, 64)).astype(np.float32)
R = ROWS.tolist()
F = [f"f{i}" for i in range(64)]
MULTI = models.multi_example(rows=2, seed=9)


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # digits | multi
    body: bytes
    content_type: str = JSON
    rows: int | None = None  # the rows sent, when the request is answerable


def _json(value) -> bytes:
    return json.dumps(value).encode()  # NaN as the bare literal, as json.dumps writes it


def _csv(lines) -> bytes:
    return "\n".join(lines).encode()


def _with(row, index, value):
    row = list(row)
    row[index] = value
    return row


def _multi_inputs(**changes):
    values = {k: v.tolist() for k, v in MULTI.items()}
    values.update(changes)
    return values


def _multi_records(**changes):
    values = _multi_inputs(**changes)
    return [{k: v[i] for k, v in values.items()} for i in range(2)]


CSV_ROWS = [",".join(repr(float(v)) for v in row) for row in ROWS]

CASES = [
    # --- digits: the documented formats ---------------------------------------------
    Case("inputs", "digits", _json({"inputs": R}), rows=3),
    Case("inputs-named", "digits", _json({"inputs": {"features": R}}), rows=3),
    Case("instances", "digits", _json({"instances": R}), rows=3),
    Case("instances-named", "digits", _json({"instances": [{"features": r} for r in R]}), rows=3),
    Case("split-columns", "digits", _json({"dataframe_split": {"columns": F, "data": R}}), rows=3),
    Case(
        "split-int-columns",
        "digits",  # pandas.DataFrame(array).to_dict(orient="split")
        _json({"dataframe_split": {"index": [0, 1, 2], "columns": list(range(64)), "data": R}}),
        rows=3,
    ),
    Case(
        "split-index",
        "digits",
        _json({"dataframe_split": {"columns": F, "data": R, "index": [5, 6, 7]}}),
        rows=3,
    ),
    Case("split-no-columns", "digits", _json({"dataframe_split": {"data": R}}), rows=3),
    Case(
        "split-no-columns-index",
        "digits",
        _json({"dataframe_split": {"index": [0, 1, 2], "data": R}}),
        rows=3,
    ),
    Case(
        "split-named-column",
        "digits",
        _json({"dataframe_split": {"columns": ["features"], "data": [[r] for r in R]}}),
        rows=3,
    ),
    Case(
        "records-columns",
        "digits",
        _json({"dataframe_records": [dict(zip(F, r)) for r in R]}),
        rows=3,
    ),
    Case(
        "records-named",
        "digits",
        _json({"dataframe_records": [{"features": r} for r in R]}),
        rows=3,
    ),
    Case("params", "digits", _json({"inputs": R, "params": {"ignored": True}}), rows=3),
    Case("one-row", "digits", _json({"inputs": [R[0]]}), rows=1),
    Case("integers", "digits", _json({"inputs": [[int(v * 10) for v in R[0]]]}), rows=1),
    Case("charset", "digits", _json({"inputs": R}), f"{JSON}; charset=UTF-8", rows=3),
    # --- digits: missing values and numeric strings ---------------------------------
    Case("nan-literal", "digits", _json({"inputs": [_with(R[0], 3, math.nan), R[1]]}), rows=2),
    Case(
        "nan-split",
        "digits",  # MLflow's client writes a DataFrame with a gap like this
        _json({"dataframe_split": {"columns": F, "data": [_with(R[0], 0, math.nan)]}}),
        rows=1,
    ),
    Case("infinity-literal", "digits", _json({"inputs": [_with(R[0], 1, math.inf)]}), rows=1),
    Case("null-inputs", "digits", _json({"inputs": [_with(R[0], 3, None), R[1]]}), rows=2),
    Case(
        "null-split",
        "digits",
        _json({"dataframe_split": {"columns": F, "data": [_with(R[0], 0, None)]}}),
        rows=1,
    ),
    Case(
        "null-records",
        "digits",
        _json({"dataframe_records": [dict(zip(F, _with(R[0], 5, None)))]}),
        rows=1,
    ),
    Case("numeric-strings-inputs", "digits", _json({"inputs": [[str(v) for v in R[0]]]}), rows=1),
    Case(
        "numeric-strings-instances",
        "digits",
        _json({"instances": [[str(v) for v in r] for r in R]}),
        rows=3,
    ),
    Case(
        "numeric-strings-split",
        "digits",
        _json({"dataframe_split": {"columns": F, "data": [[str(v) for v in R[0]]]}}),
        rows=1,
    ),
    Case(
        "numeric-strings-records",
        "digits",
        _json({"dataframe_records": [{c: str(v) for c, v in zip(F, R[0])}]}),
        rows=1,
    ),
    Case("nan-string", "digits", _json({"inputs": [_with(R[0], 2, "NaN")]}), rows=1),
    # --- digits: CSV ------------------------------------------------------------------
    Case("csv-header", "digits", _csv([",".join(F), *CSV_ROWS]), CSV, rows=3),
    Case("csv-no-header", "digits", _csv(CSV_ROWS), CSV, rows=3),
    Case(
        "csv-pandas-header",
        "digits",  # pandas.DataFrame(array).to_csv(index=False)
        _csv([",".join(map(str, range(64))), *CSV_ROWS]),
        CSV,
        rows=3,
    ),
    Case(
        "csv-header-declared",
        "digits",
        _csv([",".join(F), *CSV_ROWS]),
        f"{CSV}; header=present",
        rows=3,
    ),
    Case("csv-no-header-declared", "digits", _csv(CSV_ROWS), f"{CSV}; header=absent", rows=3),
    # --- digits: what both refuse -----------------------------------------------------
    Case("malformed-json", "digits", b"this is,,,, not valid json"),
    Case("json-list", "digits", b"[1]"),
    Case("json-number", "digits", b"1"),
    Case("empty-body", "digits", b""),
    Case("no-format-key", "digits", _json({"not": "a serialized dataframe"})),
    Case(
        "two-format-keys",
        "digits",
        _json({"dataframe_records": [], "dataframe_split": {"data": []}}),
    ),
    Case("split-as-records", "digits", _json({"dataframe_split": [dict(zip(F, R[0]))]})),
    Case("records-as-split", "digits", _json({"dataframe_records": {"columns": F, "data": R}})),
    Case(
        "split-index-mismatch",
        "digits",
        _json({"dataframe_split": {"index": [1, 2], "data": [[1], [2], [3]]}}),
    ),
    Case("wrong-width", "digits", _json({"inputs": [R[0][:63]]})),
    Case("ragged", "digits", _json({"inputs": [R[0], R[1][:10]]})),
    Case("flat-row", "digits", _json({"inputs": R[0]})),
    Case("text-value", "digits", _json({"inputs": [_with(R[0], 0, "abc")]})),
    Case("csv-empty", "digits", b"", CSV),
    Case("csv-text-value", "digits", _csv([",".join(F), ",".join(["abc"] * 64)]), CSV),
    Case(
        "split-unknown-key",
        "digits",  # "column" for "columns": refused, not ignored
        _json({"dataframe_split": {"column": F, "data": R}}),
    ),
    Case(
        "records-later-gap",
        "digits",  # a later record leaves a column out: missing value
        _json({"dataframe_records": [dict(zip(F, R[0])), dict(list(zip(F, R[1]))[1:])]}),
        rows=2,
    ),
    Case(
        "records-later-new-column",
        "digits",
        _json({"dataframe_records": [dict(list(zip(F, R[0]))[1:]), dict(zip(F, R[1]))]}),
    ),
    Case(
        "csv-missing-values",
        "digits",
        _csv([",".join(F), ",".join(["", "NaN", *CSV_ROWS[0].split(",")[2:]]), CSV_ROWS[1]]),
        CSV,
        rows=2,
    ),
    Case("csv-blank-line", "digits", _csv([",".join(F), CSV_ROWS[0], "", CSV_ROWS[1]]), CSV),
    Case(
        "csv-index-column",
        "digits",  # pandas.DataFrame.to_csv() with its index
        _csv(["," + ",".join(F), *[f"{i},{r}" for i, r in enumerate(CSV_ROWS)]]),
        CSV,
    ),
    Case(
        "csv-mixed-first-row",
        "digits",
        _csv([",".join(["a", *CSV_ROWS[0].split(",")[1:]]), CSV_ROWS[1]]),
        CSV,
    ),
    Case("csv-short-row", "digits", _csv([",".join(F), CSV_ROWS[0], CSV_ROWS[1][:40]]), CSV),
    Case("unknown-content-param", "digits", _json({"inputs": R}), f"{JSON}; something=x"),
    Case("unsupported-content-type", "digits", _json({"inputs": R}), "text/plain"),
    # --- multi: seven named inputs ----------------------------------------------------
    Case("multi-inputs", "multi", _json({"inputs": _multi_inputs()}), rows=2),
    Case("multi-records", "multi", _json({"dataframe_records": _multi_records()}), rows=2),
    Case("multi-instances", "multi", _json({"instances": _multi_records()}), rows=2),
    Case(
        "multi-split",
        "multi",
        _json(
            {
                "dataframe_split": {
                    "columns": list(MULTI),
                    "data": [list(r.values()) for r in _multi_records()],
                }
            }
        ),
        rows=2,
    ),
    Case(
        "multi-int-strings",
        "multi",
        _json({"inputs": _multi_inputs(ids=[[str(v) for v in r] for r in MULTI["ids"].tolist()])}),
        rows=2,
    ),
    Case(
        "multi-int-as-float",
        "multi",
        _json(
            {"inputs": _multi_inputs(ids=[[float(v) for v in r] for r in MULTI["ids"].tolist()])}
        ),
        rows=2,
    ),
    Case(
        "multi-float-null",
        "multi",
        _json({"inputs": _multi_inputs(x=[[None, 1.0, 2.0], [3.0, 4.0, 5.0]])}),
        rows=2,
    ),
    Case(
        "multi-missing-input",
        "multi",
        _json({"inputs": {k: v for k, v in _multi_inputs().items() if k != "wide"}}),
    ),
    Case("multi-int-fraction", "multi", _json({"inputs": _multi_inputs(ids=[[1.5, 2], [3, 4]])})),
    Case("multi-int-null", "multi", _json({"inputs": _multi_inputs(ids=[[None, 2], [3, 4]])})),
    Case(
        "multi-uint8-overflow", "multi", _json({"inputs": _multi_inputs(small=[[300, 1], [2, 3]])})
    ),
    Case(
        "multi-bool-strings",
        "multi",
        _json(
            {"inputs": _multi_inputs(mask=[["false", "true", "true"], ["false", "false", "true"]])}
        ),
    ),
    Case("multi-names-numbers", "multi", _json({"inputs": _multi_inputs(names=[1, 2])})),
    Case("multi-csv", "multi", _csv([",".join(MULTI), "1,2"]), CSV),
    Case(
        "multi-split-no-columns",
        "multi",
        _json({"dataframe_split": {"data": [list(r.values()) for r in _multi_records()]}}),
    ),
]

#: Cases where the endpoint answers differently from ``mlflow models serve`` on purpose.
DIFFERENCES = {
    "inputs-named": "MLflow's signature of a one-input ONNX model has no input name, so it "
    "refuses a named input; the endpoint also takes the ONNX input's name",
    "instances-named": "as inputs-named",
    "csv-header": "MLflow refuses every CSV body for a tensor-signature model (it reads CSV "
    "with the signature's pandas types, which a TensorSpec does not have); "
    "the endpoint reads it",
    "csv-no-header": "as csv-header; the endpoint detects that the first row is data",
    "csv-missing-values": "as csv-header; empty and NaN cells are missing values, as pandas "
    "reads them",
    "csv-header-declared": "MLflow refuses content-type parameters other than charset (415); "
    "the endpoint reads RFC 4180's header=present|absent",
    "csv-no-header-declared": "as csv-header-declared",
    "records-later-new-column": "pandas appends a column that record 0 lacks after the "
    "others, so MLflow shifts every feature after it and answers "
    "200 with wrong predictions; the endpoint refuses",
    "multi-names-numbers": "MLflow hands numbers for a string input to onnxruntime as they "
    "are; the endpoint refuses non-strings for a BYTES input (1 and 1.0 "
    "would be different strings)",
    "multi-int-fraction": "MLflow truncates 1.5 to 1 for an int32 input; the endpoint refuses "
    "a number that is not an integer",
    "multi-bool-strings": 'MLflow casts any non-empty string to true ("false" is true); the '
    "endpoint refuses strings for a BOOL input",
}


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def _same(a, b) -> bool:
    """Nested predictions equal up to float32 noise; NaN, None and null are one value."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    missing = (None,)
    a_missing = a in missing or (isinstance(a, float) and math.isnan(a))
    b_missing = b in missing or (isinstance(b, float) and math.isnan(b))
    if a_missing or b_missing:
        return a_missing and b_missing
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
    return a == b


def compare(
    case: Case, mlflow_status: int, mlflow_body: str, our_status: int, our_body: str
) -> str | None:
    """None if both answers mean the same; else what differs."""
    theirs, ours = status_class(mlflow_status), status_class(our_status)
    if theirs != ours:
        return f"status {mlflow_status} from MLflow, {our_status} from the endpoint"
    if theirs != "2xx":
        return None
    got, want = json.loads(our_body), json.loads(mlflow_body)  # json reads MLflow's NaN
    if not _same(got, want):
        return "different predictions"
    return None


def row_count(body: str) -> int:
    """Rows answered: the first dimension of every output (all must agree)."""
    predictions = json.loads(body)["predictions"]
    counts = {len(v) for v in predictions.values()}
    assert len(counts) == 1, counts
    return counts.pop()

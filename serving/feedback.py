"""Ground truth for captured requests: ``POST /v2/models/{name}/feedback``.

A label refers to a captured request by its id (and its row, for requests of several rows).
A batch of labels is checked as a whole before anything is stored: a label of the wrong type
for the model (a class index for a classifier, a string for string labels, a number for a
regressor) is a 400, an id that was never captured a 404, a row already labelled (or given
twice) a 409; nothing of a refused batch is stored, and nothing stored is ever overwritten.

Stored next to the capture, one Parquet file per accepted batch::

    DIR/_feedback/model=NAME/date=YYYY-MM-DD/part-<time>-<pid>-<random>-<n>.parquet
    (request_id, row, label, time)

``label`` is a string column (the class index, string label or number as text): readers
cast it to the model's type.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import secrets
import threading
import time
from dataclasses import dataclass

from onnxflow.serving.errors import BadInput, Conflict, NotFound

FEEDBACK_DIR = "_feedback"  # "_": readers of the capture folder skip it


@dataclass(frozen=True)
class Label:
    request_id: str
    row: int
    label: str


def label_kind(output) -> tuple[str, int | None]:
    """What a label of this model is, from its first output's spec: ``("class", n)`` for
    class scores ``[batch, n]``, ``("int", None)``, ``("string", None)``, ``("number", None)``."""
    datatype, shape = output.datatype, list(output.shape)
    if datatype.startswith("FP") and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 1:
        return "class", shape[1]
    if datatype.startswith(("INT", "UINT")) or datatype == "BOOL":
        return "int", None
    if datatype == "BYTES":
        return "string", None
    return "number", None


def parse_labels(payload, kind: tuple[str, int | None]) -> list[Label]:
    """The labels of a feedback body (``{"request_id", "label"[, "row"]}`` or
    ``{"labels": [...]}``), each checked against ``kind``; every problem named at once."""
    items = payload.get("labels", [payload]) if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        raise BadInput(
            'feedback must be a JSON object {"request_id": ID, "label": LABEL} or '
            '{"labels": [{"request_id": ID, "label": LABEL, "row": 0}, ...]}'
        )
    labels, problems = [], []
    name, classes = kind
    for i, item in enumerate(items):
        where = f"label {i}"
        if not isinstance(item, dict):
            problems.append(f"{where}: not an object")
            continue
        rid, value, row = item.get("request_id"), item.get("label"), item.get("row", 0)
        if not isinstance(rid, str) or not rid:
            problems.append(f"{where}: request_id must be a non-empty string")
            continue
        if not isinstance(row, int) or isinstance(row, bool) or row < 0:
            problems.append(f"{where} ({rid}): row must be an integer >= 0, got {row!r}")
            continue
        problem = _label_problem(value, name, classes)
        if problem:
            problems.append(f"{where} ({rid}): {problem}")
            continue
        labels.append(Label(rid, row, str(value)))
    if problems:
        raise BadInput(f"{len(problems)} bad label(s), nothing stored: " + "; ".join(problems[:10]))
    return labels


def _label_problem(value, kind: str, classes: int | None) -> str | None:
    if kind == "class":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"a class index (integer 0..{classes - 1}) expected, got {value!r}"
        if not 0 <= value < classes:
            return f"class {value} is out of range 0..{classes - 1}"
    elif kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"an integer label expected, got {value!r}"
    elif kind == "string" and not isinstance(value, str):
        return f"a string label expected, got {value!r}"
    elif kind == "number" and (not isinstance(value, int | float) or isinstance(value, bool)):
        return f"a number expected, got {value!r}"
    return None


class FeedbackStore:
    """Checks labels against the capture and stores them beside it (one writer at a time)."""

    def __init__(self, capture) -> None:
        self.capture = capture
        self.fs, self.root = capture.fs, f"{capture.root}/{FEEDBACK_DIR}"
        self._labelled: dict[str, set[tuple[str, int]]] = {}  # model -> (id, row)
        self._read_files: dict[str, set[str]] = {}  # model -> label files read into it
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        # random per store: replicas (one pid per container) never write the same name
        self._writer_id = f"{os.getpid()}-{secrets.token_hex(4)}"

    def submit(self, model: str, labels: list[Label]) -> int:
        """Store ``labels`` of ``model`` all together, or refuse them all (blocking: run it
        in a thread)."""
        with self._lock:
            keys = [(label.request_id, label.row) for label in labels]
            repeated = sorted({k for k in keys if keys.count(k) > 1})
            labelled = self._labelled_of(model)
            already = [k for k in keys if k in labelled]
            if repeated or already:
                named = ", ".join(f"{r}#{row}" for r, row in (repeated + already)[:10])
                raise Conflict(
                    f"{len(repeated)} label(s) given twice and {len(already)} already stored "
                    f"(labels are never overwritten; nothing stored): {named}"
                )
            rows = self._captured_rows(model, {label.request_id for label in labels})
            unknown = sorted({r for r in (label.request_id for label in labels) if r not in rows})
            if unknown:
                raise NotFound(
                    f"{len(unknown)} request id(s) not captured for model {model!r} "
                    f"(nothing stored): {', '.join(unknown[:10])}"
                )
            out_of_range = [
                f"{label.request_id}#{label.row} (the request had {rows[label.request_id]})"
                for label in labels
                if label.row >= rows[label.request_id]
            ]
            if out_of_range:
                raise BadInput("row out of range (nothing stored): " + ", ".join(out_of_range[:10]))
            self._write(model, labels)
            labelled.update(keys)
            return len(labels)

    def _labelled_of(self, model: str) -> set[tuple[str, int]]:
        """(request id, row) labelled for ``model`` by any replica: the label files, each
        read once (a replica writes a file per accepted batch and never changes it)."""
        import pyarrow.dataset as ds

        labelled = self._labelled.setdefault(model, set())
        done = self._read_files.setdefault(model, set())
        new = [p for p in self.fs.glob(f"{self.root}/model={model}/date=*/part-*") if p not in done]
        if new:
            table = ds.dataset(new, filesystem=self.fs, format="parquet").to_table(
                columns=["request_id", "row"]
            )
            labelled.update(zip(table["request_id"].to_pylist(), table["row"].to_pylist()))
            done.update(new)
        return labelled

    def _captured_rows(self, model: str, ids: set[str]) -> dict[str, int]:
        """Rows of each captured request of ``ids``: this replica's recent ones from memory
        (those not yet written too), any replica's in open segments from their id files,
        then the closed segments (id files first: a segment closes before its id files go)."""
        rows = self.capture.rows_of_ids(model, ids)
        folder = f"{self.capture.root}/model={model}"
        for read in (_open_segment_ids, _read):
            missing = ids - rows.keys()
            if not missing:
                break
            import pyarrow.compute as pc

            where = pc.field("request_id").isin(sorted(missing))
            table = read(self.fs, folder, ["request_id"], where)
            if table is not None:
                found: dict[str, int] = {}
                for rid in table["request_id"].to_pylist():
                    found[rid] = found.get(rid, 0) + 1
                rows.update(found)
        return rows

    def _write(self, model: str, labels: list[Label]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        now = time.time()
        table = pa.table(
            {
                "request_id": pa.array([label.request_id for label in labels], pa.string()),
                "row": pa.array([label.row for label in labels], pa.int32()),
                "label": pa.array([label.label for label in labels], pa.string()),
                "time": pa.array([int(now * 1e6)] * len(labels), pa.timestamp("us", tz="UTC")),
            }
        )
        day = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")
        folder = f"{self.root}/model={model}/date={day}"
        self.fs.makedirs(folder, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        name = f"part-{stamp}-{self._writer_id}-{next(self._numbers):05d}.parquet"
        hidden = f"{folder}/.{name}.inprogress"
        with self.fs.open(hidden, "wb") as sink:
            pq.write_table(table, sink)
        self.fs.mv(hidden, f"{folder}/{name}")
        self._read_files.setdefault(model, set()).add(f"{folder}/{name}")


def _open_segment_ids(fs, folder: str, columns: list[str], where=None):
    """The ids of every replica's open segments under ``folder`` (their id files; None
    when there is none). A file deleted meanwhile (its segment closed) is read again from
    the closed segment."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from onnxflow.serving.capture import IDS_PREFIX

    tables = []
    for path in fs.glob(f"{folder}/version=*/date=*/{IDS_PREFIX}*"):
        try:
            tables.append(
                ds.dataset(path, filesystem=fs, format="parquet").to_table(
                    columns=columns, filter=where
                )
            )
        except (FileNotFoundError, OSError):
            continue
    return pa.concat_tables(tables) if tables else None


def _read(fs, folder: str, columns: list[str], where=None):
    """The ``columns`` of every Parquet file under ``folder`` (None when there is none)."""
    import pyarrow.dataset as ds

    if not fs.exists(folder):
        return None
    dataset = ds.dataset(folder, filesystem=fs, format="parquet", partitioning="hive")
    if not set(columns) <= set(dataset.schema.names):  # no closed file yet
        return None
    return dataset.to_table(columns=columns, filter=where)

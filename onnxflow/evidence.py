"""Retrain on evidence: the training table of a retrain the monitor asked for.

The original data of the served version (its pipeline config's table, or scikit-learn's
digits) plus the captured rows of the monitor's window that have a label fed back
(capture joined with feedback by request id and row, :func:`onnxflow.monitor.read_window`),
written as one Parquet table that the pipeline's own data loader reads
(:func:`onnxflow.data.prepare_data`). Its lineage to the capture window goes onto the new
version and its run as ``retrain_*`` tags (:meth:`RetrainData.tags`).
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from onnxflow.config import DataConfig
from onnxflow.monitor import MonitorError, Window, read_window

log = logging.getLogger(__name__)


class RetrainData(BaseModel):
    """The table a retrain trains on, and where its rows came from."""

    model_config = ConfigDict(frozen=True)

    path: Path
    target: str
    task: str
    model: str
    version: str  # the served version whose window was captured
    capture: str
    window: str
    rows_original: int
    rows_captured: int

    def tags(self) -> dict[str, str]:
        return {
            "retrain_capture_window": self.window,
            "retrain_capture": self.capture,
            "retrain_rows_captured": str(self.rows_captured),
            "retrain_rows_original": str(self.rows_original),
            "retrain_of_version": self.version,
        }


def captured_table(window: Window, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """The labelled rows of the window: features [rows, n_features] and their labels (as
    fed back: text). A table model has one input of ``n_features`` columns."""
    if len(window.inputs) != 1:
        raise MonitorError(
            f"retrain on evidence needs a table model (one input); {window.model} has "
            f"{len(window.inputs)}: {', '.join(window.inputs)}"
        )
    ((name, values),) = window.inputs.items()
    values = np.asarray(values, dtype=np.float64).reshape(window.rows, -1)
    if values.shape[1] != n_features:
        raise MonitorError(
            f"captured input {name!r} has {values.shape[1]} columns, the original data "
            f"{n_features} features: not the same table"
        )
    labelled = window.labels != ""
    return values[labelled], window.labels[labelled]


def build_retrain_data(
    data: DataConfig,
    capture: str,
    model: str,
    version: str,
    since: dt.datetime,
    out_dir: Path,
) -> RetrainData:
    """Original data of ``data`` + the labelled rows ``model`` version ``version`` captured
    since ``since``, as ``out_dir/<model>-retrain.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from onnxflow.data import infer_task, load_table

    features, labels, names, _ = load_table(data)
    target = data.target or "target"
    window = read_window(capture, model, version, since)
    X_new, fed_back = captured_table(window, len(names))
    if not len(X_new):
        raise MonitorError(
            f"no labelled captured rows of {model} version {version} {window.since}: "
            "feed labels back (onnxflow feedback) before a retrain on evidence"
        )
    task = infer_task(labels, data)
    if task == "classification":  # feedback gives the class index; the table its value
        classes = np.unique(labels.astype(str) if labels.dtype.kind in "OUS" else labels)
        index = fed_back.astype(np.int64)
        if index.min() < 0 or index.max() >= len(classes):
            raise MonitorError(f"a label fed back is not a class index 0..{len(classes) - 1}")
        y_new = classes[index]
    else:
        y_new = fed_back.astype(np.float64)
    X = np.concatenate([np.asarray(features, np.float64), X_new])
    y = np.concatenate([np.asarray(labels), y_new.astype(np.asarray(labels).dtype)])
    columns = {name: X[:, j] for j, name in enumerate(names)}
    columns[target] = y
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (out_dir / f"{model}-retrain.parquet").resolve()
    pq.write_table(pa.table(columns), path)
    log.info(
        "retrain data for %s: %d original + %d labelled captured rows (version %s, %s) -> %s",
        model,
        len(labels),
        len(y_new),
        version,
        window.since,
        path,
    )
    return RetrainData(
        path=path,
        target=target,
        task=task,
        model=model,
        version=version,
        capture=capture,
        window=f"since {window.since}",
        rows_original=len(labels),
        rows_captured=len(y_new),
    )


def served_source(name: str, version: str, data: DataConfig) -> tuple[str, DataConfig]:
    """The framework the served version was trained with, and its original data: ``data``
    when it names a table, else the table its run was trained on (run params
    ``data.path``/``data.target``), else digits."""
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = client.get_model_version(name, version)
    framework = (mv.tags or {}).get("source_framework")
    if framework not in ("torch", "keras", "sklearn"):
        raise MonitorError(
            f"{name} version {version} was not trained by a built-in table model "
            f"(source_framework {framework!r}): retrain on evidence retrains those"
        )
    if data.path is None and mv.run_id:
        params = client.get_run(mv.run_id).data.params
        path = params.get("data.path")
        if path not in (None, "", "None"):
            data = data.model_copy(
                update={"path": Path(path), "target": params.get("data.target") or data.target}
            )
    return framework, data


def retrain_config(config, data: RetrainData):
    """``config`` training on ``data``'s table, registering under the monitored model,
    in review mode: the new version lands as ``challenger`` and a reviewer (or the
    shadow's evidence and the promotion policy) decides."""
    return config.model_copy(
        update={
            "data": config.data.model_copy(update={"path": data.path, "target": data.target}),
            "register_": config.register_.model_copy(update={"model_name": data.model}),
            "promote": config.promote.model_copy(update={"mode": "review"}),
        }
    )


def tag_retrained(name: str, versions: list[str], data: RetrainData, reason: str) -> None:
    """The lineage to the capture window on each new version and its run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    tags = {**data.tags(), "retrain_reason": reason}
    for version in versions:
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        run_id = client.get_model_version(name, version).run_id
        for key, value in tags.items() if run_id else ():
            client.set_tag(run_id, key, value)

"""The monitor: a window of captured traffic and its feedback against the served version's
reference profile; the figures, a report on the version's run, and the retrain decision.

Plain functions: :func:`read_window` (Parquet written by the endpoint's capture, labels
joined by request id and row), :func:`evaluate` (drift per feature and of the predictions,
:mod:`onnxflow.profile`; live accuracy where labels exist), :func:`decide` (the
:class:`RetrainPolicy`), :func:`evidently_report` (Evidently's data drift of the window
against the version's reference sample, and its classification quality on the labelled
rows), :func:`report_html` (onnxflow's own page); :func:`monitor_model` wires them to the
registry: the ``champion`` version's profile and reference sample in,
``monitor/report.html`` and ``monitor/report.json`` (Evidently's, with onnxflow's
figures), ``monitor/classification.html`` (labels), ``monitor/summary.html`` on its run and
``monitor_*`` tags on the version out. pandas and Evidently are imported only here, inside
the functions (never by the endpoint).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from onnxflow.errors import OnnxflowError
from onnxflow.profile import drift, predictions_of

log = logging.getLogger(__name__)

REPORT_HTML = "monitor/report.html"
REPORT_JSON = "monitor/report.json"
CLASSIFICATION_HTML = "monitor/classification.html"
SUMMARY_HTML = "monitor/summary.html"
#: Evidently's drift test per column: the Jensen-Shannon distance past 0.1, the figure and
#: threshold onnxflow's own drift uses (Evidently bins both samples itself, so the two
#: distances are close, not equal).
EVIDENTLY_METHOD = "jensenshannon"
EVIDENTLY_THRESHOLD = 0.1
#: Columns past this are left out of Evidently's report (onnxflow's figures keep them all).
EVIDENTLY_MAX_COLUMNS = 256
FEEDBACK_DIR = "_feedback"
#: A window with no row: the version has answered nothing yet, or no segment is closed.
NO_DATA = "no_data"


class MonitorError(OnnxflowError):
    """The monitor could not read its window or the version's profile."""


class RetrainPolicy(BaseModel):
    """When the monitor asks for a retrain (per model, in the pipeline config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_drift_share: float = Field(
        0.3, ge=0, le=1, description="Retrain when more than this share of features drift."
    )
    min_live_accuracy: float = Field(
        0.8, ge=0, le=1, description="Retrain when live accuracy falls below this ..."
    )
    min_labels: int = Field(50, ge=1, description="... measured on at least this many labels.")
    min_rows: int = Field(100, ge=1, description="No decision on a window with fewer rows.")
    min_shadow_requests: int = Field(
        100,
        ge=0,
        description="A retrained challenger meets the promotion gate once it has answered "
        "this many live requests in shadow.",
    )


@dataclass
class Window:
    """The captured rows of one model version since a time, with their labels."""

    model: str
    version: str
    since: str
    rows: int
    inputs: dict[str, np.ndarray]
    predictions: np.ndarray
    labels: np.ndarray  # per row: the label (as text), "" where none
    request_ids: list[str] = field(default_factory=list)
    row_numbers: list[int] = field(default_factory=list)
    #: why the window is empty, when nothing was captured for the version yet
    note: str = ""


@dataclass(frozen=True)
class Figures:
    model: str
    version: str
    window: str
    rows: int
    labelled: int
    drift_share: float
    prediction_drift: float | None
    live_accuracy: float | None
    drifted: list[str]
    features: dict[str, float]
    retrain: bool
    reason: str
    #: the versions a retrain on evidence registered (``monitor --retrain``), as challenger
    retrained: list[str] = field(default_factory=list)
    #: Evidently's share of drifted columns (None: no reference sample, or no rows)
    evidently_drift_share: float | None = None
    #: what the promotion gate did with a retrained challenger (``monitor --retrain``)
    promotion: str = ""
    #: ``ok``, or ``no_data``: no row in the window (no traffic yet, or no closed segment)
    status: str = "ok"

    def tags(self) -> dict[str, str]:
        no_data = self.status == NO_DATA
        return {
            "monitor_status": self.status,
            "monitor_drift_share": "n/a" if no_data else f"{self.drift_share:.4f}",
            "monitor_live_accuracy": "n/a"
            if self.live_accuracy is None
            else f"{self.live_accuracy:.4f}",
            "monitor_prediction_drift": "n/a"
            if self.prediction_drift is None
            else f"{self.prediction_drift:.4f}",
            "monitor_window": self.window,
            "monitor_rows": str(self.rows),
            "monitor_labelled_rows": str(self.labelled),
            "monitor_retrain": "yes" if self.retrain else "no",
            "monitor_evidently_drift_share": "n/a"
            if self.evidently_drift_share is None
            else f"{self.evidently_drift_share:.4f}",
        }


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``30m``, ``6h``, ``2d`` ago, or an ISO time (UTC when it names no zone)."""
    now = now or dt.datetime.now(dt.UTC)
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - dt.timedelta(**{units[text[-1]]: float(text[:-1])})
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise MonitorError(
            f"--since {text!r}: expected a duration (30m, 6h, 2d) or an ISO time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def read_window(capture: str, model: str, version: str, since: dt.datetime) -> Window:
    """The rows ``model`` version ``version`` answered since ``since`` (capture folder or
    fsspec URL ``capture``), with the labels fed back for them."""
    import fsspec
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    fs, root = fsspec.core.url_to_fs(capture)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise MonitorError(
            f"capture location {capture} does not exist (where the endpoints capture: "
            "serve --capture, the stack's capture setting)"
        )
    folder = f"{root}/model={model}/version={version}"
    window = since.strftime("%Y-%m-%dT%H:%M:%SZ")
    if not fs.exists(folder):
        return _empty(
            model,
            version,
            window,
            f"nothing captured for {model} version {version} under {capture} yet",
        )
    dataset = ds.dataset(folder, filesystem=fs, format="parquet", partitioning="hive")
    if not dataset.files:
        return _empty(
            model,
            version,
            window,
            f"no closed capture segment for {model} version {version} under {capture} yet "
            "(a segment is readable once the endpoint closes it: capture_segment_s, or on stop)",
        )
    table = dataset.to_table(filter=pc.field("time") >= pc.scalar(since))
    shapes = json.loads((dataset.schema.metadata or {}).get(b"onnxflow.shapes", b"{}"))
    inputs, outputs = {}, []
    for name in table.column_names:
        if name.startswith(("input.", "output.")):
            values = _stack(table.column(name), shapes.get(name))
            if name.startswith("input."):
                inputs[name.removeprefix("input.")] = values
            else:
                outputs.append(values)
    ids, rows = table.column("request_id").to_pylist(), table.column("row").to_pylist()
    labels = _labels(fs, f"{root}/{FEEDBACK_DIR}/model={model}", ids, rows)
    return Window(
        model,
        version,
        window,
        table.num_rows,
        inputs,
        predictions_of(outputs[0]) if outputs and table.num_rows else np.array([]),
        labels,
        ids,
        rows,
    )


def _empty(model: str, version: str, since: str, note: str) -> Window:
    return Window(model, version, since, 0, {}, np.array([]), np.array([], dtype=object), note=note)


def _stack(column, shape: list | None) -> np.ndarray:
    rows = column.to_pylist()
    if not rows:
        return np.zeros((0,))
    array = np.array(rows)
    return array.reshape(len(rows), *shape) if shape is not None else array


def _labels(fs, folder: str, ids: list[str], rows: list[int]) -> np.ndarray:
    import pyarrow.dataset as ds

    labels = np.full(len(ids), "", dtype=object)
    if not fs.exists(folder):
        return labels
    table = ds.dataset(folder, filesystem=fs, format="parquet", partitioning="hive").to_table(
        columns=["request_id", "row", "label"]
    )
    known = {
        (r, n): label
        for r, n, label in zip(
            table["request_id"].to_pylist(), table["row"].to_pylist(), table["label"].to_pylist()
        )
    }
    for i, key in enumerate(zip(ids, rows)):
        labels[i] = known.get(key, "")
    return labels


def evaluate(profile: dict, window: Window, policy: RetrainPolicy) -> Figures:
    """The window's figures against the profile, and the policy's decision."""
    figures = drift(profile, window.inputs, window.predictions) if window.rows else None
    labelled = window.labels != ""
    accuracy = None
    if labelled.any():
        predicted = np.asarray(window.predictions).astype(str)[labelled]
        accuracy = float((predicted == window.labels[labelled].astype(str)).mean())
    drift_share = figures["drift_share"] if figures else 0.0
    retrain, reason = decide(policy, window.rows, drift_share, accuracy, int(labelled.sum()))
    if not window.rows:
        reason = window.note or f"no row captured since {window.since}"
    return Figures(
        model=window.model,
        version=window.version,
        window=f"since {window.since}",
        rows=window.rows,
        labelled=int(labelled.sum()),
        drift_share=drift_share,
        prediction_drift=figures.get("prediction") if figures else None,
        live_accuracy=accuracy,
        drifted=figures["drifted"] if figures else [],
        features=figures["features"] if figures else {},
        retrain=retrain,
        reason=reason,
        status="ok" if window.rows else NO_DATA,
    )


def decide(
    policy: RetrainPolicy, rows: int, drift_share: float, accuracy: float | None, labels: int
) -> tuple[bool, str]:
    """Retrain or not, and why (the policy's rule that decided)."""
    if rows < policy.min_rows:
        return False, f"{rows} rows in the window, fewer than min_rows {policy.min_rows}"
    if drift_share > policy.max_drift_share:
        return True, f"drift share {drift_share:.2f} > max_drift_share {policy.max_drift_share}"
    if accuracy is not None and labels >= policy.min_labels:
        if accuracy < policy.min_live_accuracy:
            return True, (
                f"live accuracy {accuracy:.3f} < min_live_accuracy {policy.min_live_accuracy} "
                f"on {labels} labels"
            )
    return False, "within the policy"


@dataclass(frozen=True)
class EvidentlyReport:
    html: str
    json: dict
    drift_share: float
    classification_html: str | None


def evidently_report(reference: dict[str, np.ndarray], window: Window) -> EvidentlyReport:
    """Evidently's data drift of ``window`` against the version's ``reference`` sample
    (:func:`onnxflow.profile.profile_and_sample`: row features and ``prediction``), per
    feature and of the predictions; and, when rows are labelled, Evidently's
    classification quality on them."""
    import pandas as pd
    from evidently import (
        BinaryClassification,
        DataDefinition,
        Dataset,
        MulticlassClassification,
        Report,
    )
    from evidently.presets import ClassificationPreset, DataDriftPreset

    from onnxflow.profile import PREDICTION, row_features

    live = row_features(window.inputs)
    live[PREDICTION] = np.asarray(window.predictions)
    columns = [c for c in reference if c in live][:EVIDENTLY_MAX_COLUMNS]
    if PREDICTION in reference and PREDICTION not in columns:
        columns.append(PREDICTION)
    frames = [
        pd.DataFrame({c: _column(values[c]) for c in columns}) for values in (reference, live)
    ]
    numeric = [c for c in columns if frames[0][c].dtype.kind in "iuf" and c != PREDICTION]
    categorical = [c for c in columns if c not in numeric]
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    drift = Report([DataDriftPreset(method=EVIDENTLY_METHOD, threshold=EVIDENTLY_THRESHOLD)]).run(
        current_data=Dataset.from_pandas(frames[1], data_definition=definition),
        reference_data=Dataset.from_pandas(frames[0], data_definition=definition),
    )
    found = {"data_drift": drift.dict()}
    share = next(
        float(m["value"]["share"])
        for m in found["data_drift"]["metrics"]
        if m["metric_name"].startswith("DriftedColumnsCount")
    )
    classification_html = None
    labelled = window.labels != ""
    if labelled.any():
        table = pd.DataFrame(
            {
                "target": window.labels[labelled].astype(str),
                "prediction": np.asarray(window.predictions).astype(str)[labelled],
            }
        )
        classes = sorted(set(table["target"]) | set(table["prediction"]))
        # two classes: Evidently takes the task as binary and looks for pos_label 1 (an
        # int) among these text labels (KeyError) unless it is named
        kind = (
            BinaryClassification(
                target="target", prediction_labels="prediction", pos_label=classes[-1]
            )
            if len(classes) <= 2
            else MulticlassClassification(target="target", prediction_labels="prediction")
        )
        quality = Report([ClassificationPreset()]).run(
            current_data=Dataset.from_pandas(
                table,
                data_definition=DataDefinition(
                    categorical_columns=["target", "prediction"], classification=[kind]
                ),
            )
        )
        found["classification"] = quality.dict()
        classification_html = quality.get_html_str(as_iframe=False)
    return EvidentlyReport(
        drift.get_html_str(as_iframe=False),
        json.loads(json.dumps(found, default=str)),
        share,
        classification_html,
    )


def _column(values) -> np.ndarray:
    values = np.asarray(values)
    return values.astype(str) if values.dtype.kind in "OSUb" else values


def report_html(figures: Figures) -> str:
    """The reviewer's page: the figures, the decision, every feature's distance."""
    if figures.status == NO_DATA:
        return (
            f"<html><head><title>{html.escape(figures.model)} v{figures.version} monitor</title>"
            f"</head><body><h1>{html.escape(figures.model)} version {figures.version}: monitor"
            f"</h1><p>Window {html.escape(figures.window)}: no data "
            f"({html.escape(figures.reason)}). No drift or accuracy figures; no retrain.</p>"
            "</body></html>"
        )
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{value:.4f}</td>"
        f"<td>{'drift' if name in figures.drifted else ''}</td></tr>"
        for name, value in sorted(figures.features.items(), key=lambda kv: -kv[1])
    )
    accuracy = "n/a" if figures.live_accuracy is None else f"{figures.live_accuracy:.4f}"
    return (
        f"<html><head><title>{html.escape(figures.model)} v{figures.version} monitor</title>"
        "</head><body>"
        f"<h1>{html.escape(figures.model)} version {figures.version}: monitor</h1>"
        f"<p>Window {html.escape(figures.window)}: {figures.rows} rows, {figures.labelled} "
        f"labelled. Drift share {figures.drift_share:.4f} ({len(figures.drifted)} of "
        f"{len(figures.features)} features past the Jensen-Shannon distance threshold). "
        f"Live accuracy {accuracy}. Retrain: <b>{'yes' if figures.retrain else 'no'}</b> "
        f"({html.escape(figures.reason)}).</p>"
        "<table><tr><th>feature</th><th>JS distance</th><th></th></tr>"
        f"{rows}</table></body></html>"
    )


def _reference_sample(run_id: str) -> dict[str, np.ndarray] | None:
    """The version's reference sample (:data:`REFERENCE_SAMPLE_PATH` in its run), if any."""
    import tempfile

    import mlflow
    import pyarrow.parquet as pq

    from onnxflow.registration import REFERENCE_SAMPLE_PATH

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=REFERENCE_SAMPLE_PATH, dst_path=folder
            )
        except Exception:  # noqa: BLE001  (MLflow raises several kinds for a missing file)
            return None
        table = pq.read_table(path)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def monitor_model(
    name: str,
    capture: str,
    since: dt.datetime,
    policy: RetrainPolicy,
    alias: str = "champion",
    write: bool = True,
) -> Figures:
    """Monitor the version ``name@alias`` serves: figures logged on its run, tags on it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from onnxflow.registration import PROFILE_PATH, REFERENCE_SAMPLE_PATH

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise MonitorError(f"{name}@{alias}: {exc.message}") from None
    try:
        profile = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/{PROFILE_PATH}")
    except Exception as exc:  # noqa: BLE001  (MLflow raises several kinds for a missing file)
        raise MonitorError(
            f"{name} version {version.version} has no reference profile ({PROFILE_PATH} in "
            f"run {version.run_id}); versions registered before profiles existed have none: "
            f"{exc}"
        ) from None
    window = read_window(capture, name, str(version.version), since)
    figures = evaluate(profile, window, policy)
    reference = _reference_sample(version.run_id)
    evidently = None
    if reference is None:
        log.warning(
            "%s version %s has no reference sample (%s; versions registered before it "
            "existed): onnxflow's figures only, no Evidently report",
            name,
            version.version,
            REFERENCE_SAMPLE_PATH,
        )
    elif window.rows:
        evidently = evidently_report(reference, window)
        figures = replace(figures, evidently_drift_share=evidently.drift_share)
    if write:
        summary = report_html(figures)
        document = {**asdict(figures), "evidently": evidently.json if evidently else None}
        client.log_text(version.run_id, evidently.html if evidently else summary, REPORT_HTML)
        client.log_text(version.run_id, json.dumps(document, indent=2), REPORT_JSON)
        client.log_text(version.run_id, summary, SUMMARY_HTML)
        if evidently is not None and evidently.classification_html:
            client.log_text(version.run_id, evidently.classification_html, CLASSIFICATION_HTML)
        for key, value in figures.tags().items():
            client.set_model_version_tag(name, version.version, key, value)
    log.info(
        "%s version %s: %d rows, drift share %.3f, live accuracy %s: retrain %s (%s)",
        name,
        version.version,
        figures.rows,
        figures.drift_share,
        figures.live_accuracy,
        figures.retrain,
        figures.reason,
    )
    return figures

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

#: Column of the common evaluation set naming where a row came from (original, captured).
SOURCE_COLUMN = "_source"


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
    #: the common evaluation set (:func:`evaluate_common`): rows neither version trained on
    eval_path: Path
    eval_rows_original: int
    eval_rows_captured: int

    def tags(self) -> dict[str, str]:
        return {
            "retrain_capture_window": self.window,
            "retrain_capture": self.capture,
            "retrain_rows_captured": str(self.rows_captured),
            "retrain_rows_original": str(self.rows_original),
            "retrain_of_version": self.version,
            "retrain_eval_rows_original": str(self.eval_rows_original),
            "retrain_eval_rows_captured": str(self.eval_rows_captured),
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
    holdout: float = 0.3,
) -> RetrainData:
    """Original data of ``data`` + the labelled rows ``model`` version ``version`` captured
    since ``since``, as ``out_dir/<model>-retrain.parquet``; and the common evaluation set
    ``out_dir/<model>-eval.parquet`` neither the served version nor the retrained one
    trains on: the original table's test split (the pipeline's own seeded split) and a
    seeded ``holdout`` share of the labelled captured rows."""
    from onnxflow.data import infer_task, load_table, test_split_rows

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
    labels = np.asarray(labels)
    if task == "classification":  # feedback gives the class index; the table its value
        classes = np.unique(labels.astype(str) if labels.dtype.kind in "OUS" else labels)
        index = fed_back.astype(np.int64)
        if index.min() < 0 or index.max() >= len(classes):
            raise MonitorError(f"a label fed back is not a class index 0..{len(classes) - 1}")
        y_new = classes[index].astype(labels.dtype)
    else:
        y_new = fed_back.astype(np.float64)
    features = np.asarray(features, np.float64)
    tested = test_split_rows(labels, data)
    held = np.zeros(len(y_new), dtype=bool)
    held[np.random.default_rng(data.seed).permutation(len(y_new))[: int(len(y_new) * holdout)]] = (
        True
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = _write_table(
        out_dir / f"{model}-retrain.parquet",
        names,
        target,
        np.concatenate([features[~tested], X_new[~held]]),
        np.concatenate([labels[~tested], y_new[~held]]),
    )
    eval_path = _write_table(
        out_dir / f"{model}-eval.parquet",
        names,
        target,
        np.concatenate([features[tested], X_new[held]]),
        np.concatenate([labels[tested], y_new[held]]),
        source=np.array(["original"] * int(tested.sum()) + ["captured"] * int(held.sum())),
    )
    log.info(
        "retrain data for %s: %d original + %d labelled captured rows (version %s, %s) -> %s; "
        "common evaluation set: %d original test + %d held-out captured rows -> %s",
        model,
        int((~tested).sum()),
        int((~held).sum()),
        version,
        window.since,
        path,
        int(tested.sum()),
        int(held.sum()),
        eval_path,
    )
    return RetrainData(
        path=path,
        target=target,
        task=task,
        model=model,
        version=version,
        capture=capture,
        window=f"since {window.since}",
        rows_original=int((~tested).sum()),
        rows_captured=int((~held).sum()),
        eval_path=eval_path,
        eval_rows_original=int(tested.sum()),
        eval_rows_captured=int(held.sum()),
    )


def _write_table(
    path: Path, names: list[str], target: str, X: np.ndarray, y: np.ndarray, source=None
) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {name: X[:, j] for j, name in enumerate(names)}
    columns[target] = y
    if source is not None:
        columns[SOURCE_COLUMN] = source
    pq.write_table(pa.table(columns), path)
    return path.resolve()


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


# --- the gate of a retrained challenger: a common evaluation set, then the shadow

#: On a retrained version: the gate's verdict once it ran (promoted, kept_champion,
#: awaiting_review, stale); absent while the version waits for its shadow evidence.
GATE_TAG = "retrain_gate"


class CommonEvaluation(BaseModel):
    """Versions measured on one evaluation set (the rows neither trained on), by the
    pipeline: what the gate compares, since each version's own ``accuracy`` tag is
    measured on its own test split."""

    model_config = ConfigDict(frozen=True)

    metric: str  # accuracy (classification) or rmse
    rows_original: int
    rows_captured: int
    #: version -> the metric on every row, and on the held-out captured rows alone
    values: dict[str, float]
    captured: dict[str, float | None]

    def tags(self, candidate: str, champion: str) -> dict[str, str]:
        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        return {
            "common_eval_metric": self.metric,
            "common_eval_rows": f"{self.rows_original} original test + "
            f"{self.rows_captured} held-out captured",
            "common_eval_value": fmt(self.values[candidate]),
            "common_eval_captured_value": fmt(self.captured[candidate]),
            "common_eval_champion_version": champion,
            "common_eval_champion_value": fmt(self.values[champion]),
            "common_eval_champion_captured_value": fmt(self.captured[champion]),
        }


def score(task: str, outputs: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of class scores ``[rows, classes]`` against class indices, or the RMSE."""
    outputs = np.asarray(outputs)
    if task == "classification":
        return float((outputs.reshape(len(y), -1).argmax(axis=1) == y).mean())
    return float(np.sqrt(np.mean((outputs.reshape(len(y)) - y.astype(np.float64)) ** 2)))


def evaluate_common(name: str, versions: list[str], data: RetrainData) -> CommonEvaluation:
    """Every version of ``versions`` (its registered ONNX file, onnxruntime) on
    ``data``'s common evaluation set."""
    import mlflow
    import onnxruntime as ort
    import pyarrow.parquet as pq

    table = pq.read_table(data.eval_path).to_pandas()
    source = table.pop(SOURCE_COLUMN).to_numpy()
    labels = table.pop(data.target).to_numpy()
    X = table.to_numpy(np.float32)
    if data.task == "classification":  # the class order prepare_data gives the model
        trained = pq.read_table(data.path, columns=[data.target])[data.target].to_numpy()
        classes = np.unique(trained.astype(str) if trained.dtype.kind in "OUS" else trained)
        y = np.searchsorted(classes, labels.astype(classes.dtype))
    else:
        y = labels.astype(np.float64)
    captured = source == "captured"
    values, on_captured = {}, {}
    for version in versions:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
        session = ort.InferenceSession(
            str(next(local.rglob("*.onnx"))), providers=["CPUExecutionProvider"]
        )
        outputs = session.run(None, {session.get_inputs()[0].name: X})[0]
        values[version] = score(data.task, outputs, y)
        on_captured[version] = (
            score(data.task, np.asarray(outputs)[captured], y[captured]) if captured.any() else None
        )
    metric = "accuracy" if data.task == "classification" else "rmse"
    log.info("%s on the common evaluation set (%d rows): %s", metric, len(y), values)
    return CommonEvaluation(
        metric=metric,
        rows_original=int((~captured).sum()),
        rows_captured=int(captured.sum()),
        values=values,
        captured=on_captured,
    )


def tag_common(name: str, candidates: list[str], champion: str, result: CommonEvaluation) -> None:
    """The common evaluation on each new version (tags the pipeline alone may write, so
    the promotion policy can rest on them) and as ``evidence/common_eval.json`` on its run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for version in candidates:
        for key, value in result.tags(version, champion).items():
            client.set_model_version_tag(name, version, key, value)
        run_id = client.get_model_version(name, version).run_id
        if run_id:
            client.log_dict(run_id, result.model_dump(), "evidence/common_eval.json")


def pending_retrain(name: str) -> str | None:
    """The ``challenger`` a retrain on evidence registered whose gate has not decided (or
    that waits for a reviewer): while one is pending, the monitor does not retrain again."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        challenger = client.get_model_version_by_alias(name, "challenger")
    except MlflowException:
        return None
    tags = challenger.tags or {}
    try:
        champion = client.get_model_version_by_alias(name, "champion").version
    except MlflowException:
        champion = None
    if str(challenger.version) == str(champion) or "common_eval_value" not in tags:
        return None
    return (
        str(challenger.version)
        if tags.get(GATE_TAG, "awaiting_review") == "awaiting_review"
        else None
    )


def gate_retrained(name: str, version: str, config, min_shadow_requests: int) -> str:
    """The promotion gate of a retrained challenger, once it has answered
    ``min_shadow_requests`` live requests in shadow: the common evaluation's figures of it
    and of the champion they were measured against, in ``config.mode`` (PromoteConfig)."""
    from mlflow import MlflowClient

    from onnxflow.promote import decide_and_apply

    client = MlflowClient()
    tags = client.get_model_version(name, version).tags or {}
    if GATE_TAG in tags:
        return f"version {version}: {tags[GATE_TAG]} ({tags.get('promotion_reason', '')})"
    shadow = int(tags.get("shadow_requests") or 0)
    if shadow < min_shadow_requests:
        return (
            f"version {version} waits for its shadow evidence: {shadow} of "
            f"{min_shadow_requests} requests mirrored"
        )
    champion = client.get_model_version_by_alias(name, config.alias).version
    if str(champion) != tags["common_eval_champion_version"]:
        client.set_model_version_tag(name, version, GATE_TAG, "stale")
        return (
            f"version {version} was evaluated against v{tags['common_eval_champion_version']}, "
            f"{config.alias} is v{champion} now: not promoted (stale)"
        )
    errors = int(tags.get("shadow_errors") or 0)
    if errors:  # a challenger that failed live requests is a reviewer's call
        config = config.model_copy(update={"mode": "review"})
    decision = decide_and_apply(
        name,
        version,
        tags["common_eval_metric"],
        float(tags["common_eval_value"]),
        str(champion),
        float(tags["common_eval_champion_value"]),
        config,
    )
    client.set_model_version_tag(name, version, GATE_TAG, decision.decision)
    return (
        f"version {version} after {shadow} shadow requests (agreement "
        f"{tags.get('shadow_agreement', 'n/a')}, {errors} errors), on the common evaluation "
        f"set ({tags.get('common_eval_rows')}): {decision.decision}: {decision.reason}"
    )

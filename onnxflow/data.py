"""data: load a table (the bundled digits by default), check it, split it.

Every problem with the input is found here, before any training, and raised as one
:class:`DataError` that names it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from onnxflow.config import DataConfig, Task
from onnxflow.errors import DataError
from onnxflow.results import DatasetArtifact, DatasetInfo

log = logging.getLogger(__name__)

#: Integer labels with at most this many distinct values are treated as classes.
MAX_AUTO_CLASSES = 20
#: Each class must have this many rows so that train, validation and test all see it.
MIN_ROWS_PER_CLASS = 3


def prepare_data(config: DataConfig, out_dir: Path) -> DatasetArtifact:
    """Load, check and split the table; write ``splits.npz`` and ``dataset.json``."""
    features, labels, feature_names, name = _load(config)
    task = _infer_task(labels, config)
    X = _numeric_features(features, feature_names)
    if task == "classification":
        class_names, y = _encode_classes(labels, config.target or "target")
    else:
        class_names, y = (), _numeric_target(labels, config.target or "target")
    splits = _split(X, y, task, class_names, config)

    X_train = splits["X_train"]
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std[std == 0] = 1.0  # constant columns (digits has some) pass through unscaled
    target_mean, target_std = 0.0, 1.0
    if task == "regression":
        target_mean = float(splits["y_train"].mean())
        target_std = float(splits["y_train"].std()) or 1.0

    info = DatasetInfo(
        name=name,
        source=str(config.path) if config.path else "sklearn.datasets.load_digits",
        task=task,
        feature_names=tuple(feature_names),
        class_names=class_names,
        n_train=len(splits["y_train"]),
        n_val=len(splits["y_val"]),
        n_test=len(splits["y_test"]),
        digest=dataset_digest(X, y),
        feature_mean=tuple(float(v) for v in mean),
        feature_std=tuple(float(v) for v in std),
        target_mean=target_mean,
        target_std=target_std,
        seed=config.seed,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "splits.npz"
    np.savez(path, **splits)
    (out_dir / "dataset.json").write_text(info.model_dump_json(indent=2))
    log.info(
        "data %s: %s, %d features, %d/%d/%d train/val/test rows, digest %s",
        name,
        task,
        info.n_features,
        info.n_train,
        info.n_val,
        info.n_test,
        info.digest,
    )
    return DatasetArtifact(path=path, info=info)


def load_splits(dataset: DatasetArtifact) -> dict[str, np.ndarray]:
    """The six arrays written by :func:`prepare_data`."""
    with np.load(dataset.path) as npz:
        return {key: npz[key] for key in npz.files}


def dataset_digest(X: np.ndarray, y: np.ndarray) -> str:
    """MLflow's own digest of the table, so the version tag matches the run's dataset."""
    import mlflow.data

    return mlflow.data.from_numpy(X, targets=y).digest


# -- loading ---------------------------------------------------------------------------


def _load(config: DataConfig):
    if config.path is None:
        if config.target is not None:
            raise DataError(f"--target {config.target!r} was given without --data PATH.")
        from sklearn.datasets import load_digits

        digits = load_digits()
        names = [f"pixel_{i}" for i in range(digits.data.shape[1])]
        return digits.data, digits.target, names, "digits"

    path = Path(config.path)
    if config.target is None:
        raise DataError(f"--data {path} needs --target COLUMN: the column to predict.")
    if not path.exists():
        raise DataError(f"Data file not found: {path}")
    if path.is_dir():
        raise DataError(f"Data path is a folder, expected a .csv or .parquet file: {path}")
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in {".csv", ".txt"}:
            frame = pd.read_csv(path)
        elif suffix in {".parquet", ".pq"}:
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"Unsupported data file {path}: expected .csv or .parquet.")
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"Data file {path} is empty: no header and no rows.") from None
    except Exception as exc:  # pandas and pyarrow raise many types for unreadable files
        raise DataError(f"Cannot read {path}: {exc}") from exc

    if frame.shape[0] == 0:
        raise DataError(f"Data file {path} has a header but no rows.")
    if config.target not in frame.columns:
        columns = ", ".join(map(str, frame.columns[:20]))
        raise DataError(f"Target column {config.target!r} is not in {path}; columns: {columns}")
    labels = frame[config.target]
    features = frame.drop(columns=[config.target])
    if features.shape[1] == 0:
        raise DataError(f"{path} has no feature columns besides the target {config.target!r}.")
    missing = int(labels.isna().sum())
    if missing:
        raise DataError(
            f"Target column {config.target!r} has {missing} missing (NaN) label(s), "
            f"first at row {int(np.flatnonzero(labels.isna().to_numpy())[0])}."
        )
    non_numeric = [
        str(c)
        for c in features.columns
        if not (
            pd.api.types.is_numeric_dtype(features[c]) or pd.api.types.is_bool_dtype(features[c])
        )
    ]
    if non_numeric:
        raise DataError(
            f"Feature column(s) are not numeric: {', '.join(non_numeric)}. "
            "Encode them as numbers or drop them before training."
        )
    return features.to_numpy(), labels.to_numpy(), [str(c) for c in features.columns], path.stem


def load_table(config: DataConfig):
    """The table of ``config`` as loaded, before the split: features, labels, feature
    names, dataset name (what a retrain on evidence extends)."""
    return _load(config)


def test_split_rows(labels: np.ndarray, config: DataConfig) -> np.ndarray:
    """Which rows of a loaded table :func:`prepare_data` puts in its test split (a boolean
    mask; the same seed and sizes give the same rows): rows a version trained on this
    table never saw."""
    task = _infer_task(labels, config)
    if task == "classification":
        class_names, y = _encode_classes(labels, config.target or "target")
    else:
        class_names, y = (), _numeric_target(labels, config.target or "target")
    rows = np.arange(len(y))[:, None]
    mask = np.zeros(len(y), dtype=bool)
    mask[_split(rows, y, task, class_names, config)["X_test"][:, 0]] = True
    return mask


def infer_task(labels: np.ndarray, config: DataConfig):
    """classification or regression, as :func:`prepare_data` decides it."""
    return _infer_task(labels, config)


def _numeric_features(features: np.ndarray, names: list[str]) -> np.ndarray:
    X = np.asarray(features, dtype=np.float64)
    bad = ~np.isfinite(X)
    if bad.any():
        columns = sorted({names[j] for j in np.flatnonzero(bad.any(axis=0))})
        raise DataError(f"Feature column(s) contain NaN or infinite values: {', '.join(columns)}")
    return X.astype(np.float32)


def _infer_task(labels: np.ndarray, config: DataConfig) -> Task:
    if config.task != "auto":
        return config.task
    kind = np.asarray(labels).dtype.kind
    if kind in "OUSb":
        return "classification"
    if kind in "iu" and len(np.unique(labels)) <= MAX_AUTO_CLASSES:
        return "classification"
    return "regression"


def _encode_classes(labels: np.ndarray, target: str) -> tuple[tuple[str, ...], np.ndarray]:
    values, indices = np.unique(
        np.asarray(labels).astype(str)
        if np.asarray(labels).dtype.kind in "OUS"
        else np.asarray(labels),
        return_inverse=True,
    )
    if len(values) < 2:
        raise DataError(f"Target column {target!r} has a single class ({values[0]!r}); need two.")
    counts = np.bincount(indices)
    small = [(str(values[i]), int(c)) for i, c in enumerate(counts) if c < MIN_ROWS_PER_CLASS]
    if small:
        listed = ", ".join(f"{v!r} ({c} row{'s' if c != 1 else ''})" for v, c in small)
        raise DataError(
            f"Class(es) with too few rows to split into train/validation/test "
            f"(need at least {MIN_ROWS_PER_CLASS}): {listed}"
        )
    return tuple(str(v) for v in values), indices.astype(np.int64)


def _numeric_target(labels: np.ndarray, target: str) -> np.ndarray:
    try:
        y = np.asarray(labels, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(
            f"Target column {target!r} is not numeric; regression needs numbers."
        ) from None
    if not np.isfinite(y).all():
        raise DataError(f"Target column {target!r} contains infinite values.")
    return y.astype(np.float32)


def _split(X, y, task: Task, class_names, config: DataConfig) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    stratify = y if task == "classification" else None
    n = len(y)
    n_test = max(int(round(n * config.test_size)), len(class_names) or 1)
    n_val = max(int(round(n * config.val_size)), len(class_names) or 1)
    if n - n_test - n_val < max(len(class_names), 1):
        raise DataError(
            f"Table has {n} rows: too few for a {config.test_size:.0%} test and "
            f"{config.val_size:.0%} validation split."
        )
    try:
        X_rest, X_test, y_rest, y_test = train_test_split(
            X, y, test_size=n_test, random_state=config.seed, stratify=stratify
        )
        X_train, X_val, y_train, y_val = train_test_split(
            X_rest,
            y_rest,
            test_size=n_val,
            random_state=config.seed,
            stratify=y_rest if stratify is not None else None,
        )
    except ValueError as exc:
        raise DataError(f"Cannot split the table: {exc}") from exc
    return dict(
        X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val, X_test=X_test, y_test=y_test
    )

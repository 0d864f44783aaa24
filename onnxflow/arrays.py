"""Datasets of named arrays, for recipes: any number of inputs, any shapes and dtypes.

A recipe's model takes one or more named inputs (an image tensor, token ids and a mask,
features and a category id...). The data step gives it :class:`NamedArrays`: for each of
the train, validation and test splits a dict of arrays by input name, plus the integer
class labels under :data:`LABEL`. Built-in loaders, chosen by ``data.path``:

* a **folder of images** in class subfolders (PNG/JPEG): input ``image``
  ``[3, size, size]`` float32 (RGB, NCHW, scaled to 0..1, resized to ``data.image_size``);
* an **.npz** of named arrays: every array but the label one is an input, as it is
  (int64 token ids, bool masks...; float64 becomes float32);
* a **CSV/Parquet** table: the numeric scalar columns form the input ``features``
  ``[n]`` float32; each column of lists (Parquet) becomes an input of its own name with a
  fixed length (every row must have the same length);
* no path: scikit-learn's bundled digits as ``features`` ``[64]``.

A recipe's own ``load_data(config)`` may return :class:`NamedArrays` or a plain dict
``{"train": {...}, "validation": {...}, "test": {...}, "classes": [...]}``. The splits of
the built-in loaders are seeded and stratified. Every problem is one :class:`DataError`
naming it, found before any training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from onnxflow.config import DataConfig, Task
from onnxflow.errors import DataError
from onnxflow.results import StepResult

log = logging.getLogger(__name__)

LABEL = "label"
"""Name of the class-label array in every split (int64 class indices)."""
SPLITS = ("train", "validation", "test")
IMAGE_INPUT = "image"
TABLE_INPUT = "features"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
#: Each class needs this many rows so that train, validation and test all see it.
MIN_ROWS_PER_CLASS = 3


class InputSpec(StepResult):
    """One model input: its name, its shape without the batch axis, and its numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class ArrayDatasetInfo(StepResult):
    """What ``build_model(info)`` is given, and what ``dataset.json`` holds."""

    name: str
    source: str
    task: Task = "classification"
    inputs: tuple[InputSpec, ...]
    class_names: tuple[str, ...]
    n_train: int
    n_val: int
    n_test: int
    digest: str
    seed: int
    preprocessing: dict[str, str] = {}
    """What a client must do to raw data before the model sees it (image size, scaling...);
    registered as version tags ``preprocessing.*``."""

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_outputs(self) -> int:
        """Width of the model's output: one score per class, or 1 (regression)."""
        return self.n_classes if self.task == "classification" else 1

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)


class ArrayDataset(StepResult):
    path: Path
    """``splits.npz``: ``{split}.{input}`` and ``{split}.label`` for each split; or, for a
    streamed dataset, ``manifest.npz`` (:mod:`onnxflow.stream_plan`)."""
    info: ArrayDatasetInfo
    stream: str | None = None
    """None: the splits are in ``splits.npz``; else how they are read lazily (``images``,
    ``parquet``, ``recipe``: :func:`onnxflow.streaming.open_split`)."""
    sample_rows: int = 0
    """Streamed: the rows of a split that :func:`read_split` reads (``data.sample_rows``)."""


@dataclass(frozen=True)
class NamedArrays:
    """Named arrays per split, as loaders and a recipe's ``load_data`` return them."""

    train: dict[str, np.ndarray]
    validation: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    classes: tuple[str, ...] = ()
    name: str = "data"
    source: str = ""
    preprocessing: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> dict[str, np.ndarray]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


# -- the data step -----------------------------------------------------------------------


def prepare_arrays(
    data: NamedArrays, config: DataConfig, out_dir: Path, where: str = ""
) -> ArrayDataset:
    """Check the splits, write ``splits.npz`` and ``dataset.json``; DataError on problems,
    naming ``where`` the data came from (``recipe.py: load_data(config)``)."""
    inputs, classes, task = check_named_arrays(data, config.task, where)
    if task == "regression":
        data = replace(
            data,
            **{
                s: {**data.split(s), LABEL: data.split(s)[LABEL].astype(np.float32)} for s in SPLITS
            },
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "splits.npz"
    np.savez(
        path,
        **{
            f"{split}.{name}": array
            for split in SPLITS
            for name, array in data.split(split).items()
        },
    )
    info = ArrayDatasetInfo(
        name=data.name,
        source=data.source,
        task=task,
        inputs=inputs,
        class_names=classes,
        n_train=len(data.train[LABEL]),
        n_val=len(data.validation[LABEL]),
        n_test=len(data.test[LABEL]),
        digest=arrays_digest(data),
        seed=config.seed,
        preprocessing=dict(data.preprocessing),
    )
    (out_dir / "dataset.json").write_text(info.model_dump_json(indent=2))
    log.info(
        "data %s: inputs %s, %s, %d/%d/%d train/val/test rows, digest %s",
        info.name,
        ", ".join(f"{s.name} {s.dtype} {list(s.shape)}" for s in inputs),
        f"{info.n_classes} classes" if task == "classification" else "regression",
        info.n_train,
        info.n_val,
        info.n_test,
        info.digest,
    )
    return ArrayDataset(path=path, info=info)


def read_split(dataset: ArrayDataset, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The inputs (by name, in the dataset's input order) and labels of one split; of a
    streamed dataset, its first ``sample_rows`` rows (:func:`onnxflow.streaming.read_rows`)."""
    if dataset.stream is not None:
        from onnxflow.streaming import read_rows

        return read_rows(dataset, split)
    with np.load(dataset.path, allow_pickle=False) as npz:
        inputs = {name: npz[f"{split}.{name}"] for name in dataset.info.input_names}
        return inputs, npz[f"{split}.{LABEL}"]


def read_dataset_info(out_dir: Path) -> ArrayDatasetInfo:
    return ArrayDatasetInfo.model_validate(json.loads((out_dir / "dataset.json").read_text()))


def arrays_digest(data: NamedArrays) -> str:
    """MLflow's digest of every split's inputs and labels (the version's dataset_digest)."""
    import mlflow.data

    features = {
        name: np.concatenate([data.split(s)[name] for s in SPLITS])
        for name in data.train
        if name != LABEL
    }
    labels = np.concatenate([data.split(s)[LABEL] for s in SPLITS])
    return mlflow.data.from_numpy(features, targets=labels).digest


def as_named_arrays(value: Any, where: str) -> NamedArrays:
    """A recipe's ``load_data`` result as NamedArrays; DataError naming ``where`` if it is
    neither NamedArrays nor a dict with train/validation/test dicts of arrays."""
    if isinstance(value, NamedArrays):
        return value
    if not isinstance(value, Mapping) or any(s not in value for s in SPLITS):
        raise DataError(
            f"{where} returned {type(value).__name__}, expected NamedArrays or a "
            f"dict with keys {', '.join(SPLITS)} (each a dict of named arrays, "
            f"labels under {LABEL!r}) and optionally 'classes'"
        )
    splits = {}
    for split in SPLITS:
        arrays = value[split]
        if not isinstance(arrays, Mapping):
            raise DataError(
                f"{where}: {split!r} is {type(arrays).__name__}, expected a dict of named arrays"
            )
        splits[split] = {str(k): np.asarray(v) for k, v in arrays.items()}
    return NamedArrays(
        **splits,
        classes=tuple(str(c) for c in value.get("classes", ())),
        name=str(value.get("name", "data")),
        source=str(value.get("source", "")),
        preprocessing={str(k): str(v) for k, v in dict(value.get("preprocessing", {})).items()},
    )


def check_named_arrays(
    data: NamedArrays, task: str = "auto", where: str = ""
) -> tuple[tuple[InputSpec, ...], tuple[str, ...], Task]:
    """The input specs, class names and task; DataError naming ``where`` and listing every
    problem found. ``task`` auto: regression when the train labels are floats."""
    problems = []
    train_labels = data.train.get(LABEL)
    if task == "auto":
        floats = train_labels is not None and np.asarray(train_labels).dtype.kind == "f"
        task = "regression" if floats else "classification"
    names = [n for n in data.train if n != LABEL]
    if not names:
        problems.append(f"the train split has no inputs besides {LABEL!r}")
    specs = tuple(
        InputSpec(
            name=n,
            shape=tuple(int(d) for d in data.train[n].shape[1:]),
            dtype=str(data.train[n].dtype),
        )
        for n in names
    )
    n_classes = 0
    for split in SPLITS:
        arrays = data.split(split)
        if LABEL not in arrays:
            problems.append(f"split {split!r} has no {LABEL!r} array")
            continue
        labels = arrays[LABEL]
        if task == "regression":
            if labels.ndim != 1 or labels.dtype.kind not in "iuf":
                problems.append(
                    f"{split}.{LABEL} is {labels.dtype} {list(labels.shape)}, expected 1-d "
                    "numeric targets (data.task is regression)"
                )
                continue
            if labels.dtype.kind == "f" and not np.isfinite(labels).all():
                problems.append(f"{split}.{LABEL} contains NaN or infinite targets")
        elif labels.ndim != 1 or labels.dtype.kind not in "iu":
            problems.append(
                f"{split}.{LABEL} is {labels.dtype} {list(labels.shape)}, expected "
                "1-d integer class indices (float targets are a regression: data.task "
                "regression, or auto with float train labels)"
            )
            continue
        if len(labels) == 0:
            problems.append(f"split {split!r} is empty")
            continue
        if task == "classification":
            if labels.min() < 0:
                problems.append(f"{split}.{LABEL} has negative class indices")
            n_classes = max(n_classes, int(labels.max()) + 1)
        extra = sorted(set(arrays) - set(names) - {LABEL})
        missing = [n for n in names if n not in arrays]
        if missing or extra:
            problems.append(
                f"split {split!r} has inputs {sorted(set(arrays) - {LABEL})}, "
                f"the train split {names}"
            )
        for spec in specs:
            array = arrays.get(spec.name)
            if array is None:
                continue
            if array.shape[1:] != spec.shape or str(array.dtype) != spec.dtype:
                problems.append(
                    f"{split}.{spec.name} is {array.dtype} {list(array.shape[1:])}"
                    f" per row, train has {spec.dtype} {list(spec.shape)}"
                )
            if len(array) != len(labels):
                problems.append(
                    f"{split}.{spec.name} has {len(array)} rows, {split}.{LABEL} {len(labels)}"
                )
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                problems.append(f"{split}.{spec.name} contains NaN or infinite values")
            if array.dtype.kind in "OUSV":
                problems.append(
                    f"{split}.{spec.name} holds {array.dtype} values; models take numeric tensors"
                )
    classes: tuple[str, ...] = ()
    if task == "classification":
        classes = tuple(data.classes) or tuple(str(i) for i in range(n_classes))
        if n_classes > len(classes):
            problems.append(
                f"labels go up to {n_classes - 1} but only {len(classes)} class names are given"
            )
        if len(classes) < 2:
            problems.append(f"need at least two classes, found {len(classes)}")
    if problems:
        raise DataError(
            f"{where + ': ' if where else ''}the data for {data.name!r} cannot be used: "
            + "; ".join(problems)
        )
    return specs, classes, task  # type: ignore[return-value]


# -- loaders ----------------------------------------------------------------------------


def load_arrays(config: DataConfig) -> NamedArrays:
    """The built-in loader for ``config.path``: image folder, .npz, CSV/Parquet, or digits."""
    if config.path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return split_arrays(
            {TABLE_INPUT: digits.data.astype(np.float32)},
            digits.target.astype(np.int64),
            config,
            name="digits",
            source="sklearn.datasets.load_digits",
            classes=tuple(str(c) for c in digits.target_names),
        )
    path = Path(config.path)
    if not path.exists():
        raise DataError(f"Data path not found: {path}")
    if path.is_dir():
        return load_image_folder(path, config)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_npz(path, config)
    if suffix in {".csv", ".txt", ".parquet", ".pq"}:
        return load_table(path, config)
    raise DataError(
        f"Unsupported data path {path}: expected a folder of images in class "
        "subfolders, an .npz, a .csv or a .parquet file"
    )


def load_image_folder(path: Path, config: DataConfig) -> NamedArrays:
    """``path/<class>/*.png|jpg`` as input ``image`` [3, size, size] float32 in 0..1."""

    path = Path(path)
    size = config.image_size
    classes, files, labels = image_folder_files(path)
    images = np.empty((len(files), 3, size, size), dtype=np.float32)
    log.info(
        "reading %d images from %s (%d classes) at %dx%d",
        len(files),
        path,
        len(classes),
        size,
        size,
    )
    for i, file in enumerate(files):
        images[i] = decode_image(file, size)
    return split_arrays(
        {IMAGE_INPUT: images},
        np.asarray(labels, dtype=np.int64),
        config,
        name=path.name,
        source=str(path),
        classes=classes,
        preprocessing=image_preprocessing(size),
    )


def image_folder_files(path: Path) -> tuple[tuple[str, ...], list[Path], list[int]]:
    """The class names (subfolders, sorted), the PNG/JPEG files and their class indices."""
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise DataError(
            f"{path} needs one subfolder per class (at least two); found "
            f"{[p.name for p in folders]}"
        )
    files: list[Path] = []
    labels: list[int] = []
    for index, folder in enumerate(folders):
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(found) < MIN_ROWS_PER_CLASS:
            raise DataError(
                f"class folder {folder} has {len(found)} PNG/JPEG image(s); need at "
                f"least {MIN_ROWS_PER_CLASS} to split into train/validation/test"
            )
        files += found
        labels += [index] * len(found)
    return tuple(p.name for p in folders), files, labels


def decode_image(file: Path, size: int) -> np.ndarray:
    """One image file as float32 ``[3, size, size]``: RGB, resized (bilinear), pixel / 255
    (the in-memory loader and the streamed one decode alike)."""
    return pixels_as_input(decode_pixels(file, size)[None])[0]


def decode_pixels(file: Path, size: int) -> np.ndarray:
    """One image file as uint8 ``[size, size, 3]`` (RGB, resized bilinear). An image that
    is RGB and of the size already is neither converted nor resized: both copy it
    (a quarter of the time a 32x32 PNG takes)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            if image.mode != "RGB":
                image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"Cannot read image {file}: {exc}") from None


def pixels_as_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[n, size, size, 3]`` as the model's input: float32 ``[n, 3, size, size]``
    in 0..1, in one pass over the batch."""
    return pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)


def image_preprocessing(size: int) -> dict[str, str]:
    """What a client must do to an image before the model sees it (version tags)."""
    return {
        "image_size": f"{size}x{size}",
        "resize": "bilinear",
        "layout": "NCHW",
        "channels": "RGB",
        "scale": "pixel / 255",
    }


def load_npz(path: Path, config: DataConfig) -> NamedArrays:
    """Every array of the .npz is an input, except the label one (``data.target``, default
    ``label``); all share the first axis. Labels may be integers or strings."""
    target = config.target or LABEL
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # zipfile, pickle refusal, truncated files
        raise DataError(f"Cannot read {path}: {exc}") from None
    if target not in arrays:
        raise DataError(
            f"{path} has no label array {target!r} (arrays: {sorted(arrays)}); "
            "name it with data.target"
        )
    labels = arrays.pop(target)
    if not arrays:
        raise DataError(f"{path} holds only the label array {target!r}: no inputs")
    rows = {name: len(a) if a.ndim else 0 for name, a in arrays.items()}
    if any(n != len(labels) for n in rows.values()):
        raise DataError(
            f"{path}: every array needs {len(labels)} rows like {target!r}; found {rows}"
        )
    arrays = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays.items()}
    y, classes = encode_labels(labels, f"{path}:{target}")
    return split_arrays(arrays, y, config, name=path.stem, source=str(path), classes=classes)


def load_table(path: Path, config: DataConfig) -> NamedArrays:
    """Numeric scalar columns -> ``features`` [n] float32; each list column -> an input of
    its own name [length] (int64 for integer lists, float32 otherwise)."""
    import pandas as pd

    if config.target is None:
        raise DataError(f"--data {path} needs --target COLUMN: the column to predict.")
    try:
        frame = (
            pd.read_parquet(path)
            if path.suffix.lower() in {".parquet", ".pq"}
            else pd.read_csv(path)
        )
    except Exception as exc:  # pandas and pyarrow raise many types for unreadable files
        raise DataError(f"Cannot read {path}: {exc}") from None
    if config.target not in frame.columns:
        raise DataError(
            f"Target column {config.target!r} is not in {path}; columns: "
            f"{', '.join(map(str, frame.columns[:20]))}"
        )
    if frame.empty:
        raise DataError(f"{path} has no rows")
    labels = frame.pop(config.target)
    if labels.isna().any():
        raise DataError(f"Target column {config.target!r} has missing labels")
    arrays: dict[str, np.ndarray] = {}
    scalars = []
    for column in frame.columns:
        series = frame[column]
        if (
            series.dtype == object
            and len(series)
            and isinstance(series.iloc[0], list | tuple | np.ndarray)
        ):
            arrays[str(column)] = _list_column(series, str(column), path)
        elif pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
            scalars.append(str(column))
        else:
            raise DataError(
                f"Column {column!r} of {path} is neither numeric nor a column of "
                f"lists ({series.dtype})"
            )
    if scalars:
        arrays[TABLE_INPUT] = frame[scalars].to_numpy(dtype=np.float32)
    if not arrays:
        raise DataError(f"{path} has no input columns besides the target {config.target!r}")
    y, classes = encode_labels(labels.to_numpy(), f"{path}:{config.target}")
    return split_arrays(arrays, y, config, name=path.stem, source=str(path), classes=classes)


def _list_column(series, column: str, path: Path) -> np.ndarray:
    lengths = {len(v) if v is not None else -1 for v in series}
    if -1 in lengths:
        raise DataError(f"List column {column!r} of {path} has missing values")
    if len(lengths) != 1:
        raise DataError(
            f"List column {column!r} of {path} has rows of lengths "
            f"{sorted(lengths)[:10]}; a model input needs one fixed length "
            "(pad the lists to the same length)"
        )
    array = np.stack([np.asarray(v) for v in series])
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind in "fb":
        return array.astype(np.float32)
    raise DataError(
        f"List column {column!r} of {path} holds {array.dtype} values; expected numbers"
    )


def encode_labels(labels: np.ndarray, where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices (int64) and class names, from integer or string labels."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(
            f"{where}: labels must be one value per row, found shape {list(labels.shape)}"
        )
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError(f"{where}: labels are non-integer floats; recipes classify")
        labels = labels.astype(np.int64)
    values, indices = np.unique(
        labels.astype(str) if labels.dtype.kind in "OUS" else labels, return_inverse=True
    )
    return indices.astype(np.int64), tuple(str(v) for v in values)


def split_arrays(
    arrays: dict[str, np.ndarray],
    labels: np.ndarray,
    config: DataConfig,
    *,
    name: str,
    source: str,
    classes: tuple[str, ...],
    preprocessing: dict[str, str] | None = None,
) -> NamedArrays:
    """Seeded, stratified train/validation/test split of every array along its first axis."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    counts = np.bincount(labels, minlength=len(classes))
    small = [(classes[i], int(c)) for i, c in enumerate(counts) if c < MIN_ROWS_PER_CLASS]
    if small:
        raise DataError(
            f"{name}: class(es) with too few rows to split into train/validation/"
            f"test (need {MIN_ROWS_PER_CLASS}): " + ", ".join(f"{c!r} ({k})" for c, k in small)
        )
    n_test = max(int(round(n * config.test_size)), len(classes))
    n_val = max(int(round(n * config.val_size)), len(classes))
    if n - n_test - n_val < len(classes):
        raise DataError(
            f"{name} has {n} rows: too few for a {config.test_size:.0%} test and "
            f"{config.val_size:.0%} validation split"
        )
    index = np.arange(n)
    try:
        rest, test = train_test_split(
            index, test_size=n_test, random_state=config.seed, stratify=labels
        )
        train, val = train_test_split(
            rest, test_size=n_val, random_state=config.seed, stratify=labels[rest]
        )
    except ValueError as exc:
        raise DataError(f"Cannot split {name}: {exc}") from exc

    def take(rows: np.ndarray) -> dict[str, np.ndarray]:
        return {**{k: v[rows] for k, v in arrays.items()}, LABEL: labels[rows]}

    return NamedArrays(
        train=take(train),
        validation=take(val),
        test=take(test),
        classes=classes,
        name=name,
        source=source,
        preprocessing=dict(preprocessing or {}),
    )

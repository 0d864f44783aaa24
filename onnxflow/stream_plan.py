"""Streamed datasets, planned: the data step of ``data.stream: true``, which decodes nothing.

It finds the rows (the files of an image folder, or a Parquet table's rows) and their
labels, splits them (seeded and stratified, as the in-memory loaders split), checks a few
decoded rows of each split through the reader training will use
(:func:`onnxflow.streaming.open_folder`), and writes the plan: ``stream.json`` (how to read
a row), ``manifest.npz`` (which file or row is in which split, with its label) and
``dataset.json``, with a digest of the files' bytes. Of a Parquet table only the label
column is read whole, to split and stratify. A recipe's own torch datasets are planned by
:func:`onnxflow.recipes.datasets.stream_recipe`, through :func:`checked_info`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxflow.arrays import (
    SPLITS,
    ArrayDataset,
    ArrayDatasetInfo,
    NamedArrays,
    check_named_arrays,
    encode_labels,
    image_folder_files,
    image_preprocessing,
    split_arrays,
)
from onnxflow.config import DataConfig
from onnxflow.errors import DataError
from onnxflow.streaming import MANIFEST_FILE, STREAM_FILE, open_folder

log = logging.getLogger(__name__)

#: Rows decoded per split to check the data (names, shapes, dtypes) before training.
PROBE_ROWS = 8


def stream_data(path: Path, config: DataConfig, out_dir: Path, where: str) -> ArrayDataset:
    """The streamed dataset of ``data.path`` (an image folder or a Parquet table)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{where}: data path not found: {path}")
    if path.is_dir():
        plan = plan_images(path, config)
    elif path.suffix.lower() in {".parquet", ".pq"}:
        plan = plan_parquet(path, config)
    else:
        raise DataError(
            f"{where}: data.stream reads an image folder or a Parquet table, not {path} "
            "(an .npz or CSV is read into memory: data.stream false)"
        )
    return write_plan(plan, config, out_dir, where)


@dataclass(frozen=True)
class StreamPlan:
    """What the data step found: the rows (files or table rows), their labels, the classes,
    and how to read them."""

    kind: str
    source: str
    name: str
    labels: np.ndarray
    classes: tuple[str, ...]
    settings: dict[str, Any]
    """How :func:`onnxflow.streaming.open_folder` reads a row (image size; the table's columns)."""
    items: np.ndarray
    """One entry per row: the image file, or the table's row number."""
    digest: str
    preprocessing: dict[str, str] = field(default_factory=dict)


def plan_images(path: Path, config: DataConfig) -> StreamPlan:
    """The image files of ``path/<class>/``, checked readable (header only) and hashed."""
    from PIL import Image, UnidentifiedImageError

    classes, files, labels = image_folder_files(path)
    digest = hashlib.sha256()
    for file, label in zip(files, labels, strict=True):
        try:
            with Image.open(file) as image:  # reads the header, decodes nothing
                image.size  # noqa: B018
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"Cannot read image {file}: {exc}") from None
        digest.update(f"{classes[label]}/{file.name}\0".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    log.info("streaming %d images from %s (%d classes)", len(files), path, len(classes))
    return StreamPlan(
        kind="images",
        source=str(path),
        name=path.name,
        labels=np.asarray(labels, dtype=np.int64),
        classes=classes,
        settings={"size": config.image_size},
        items=np.asarray([str(f.resolve()) for f in files]),
        digest=digest.hexdigest(),
        preprocessing=image_preprocessing(config.image_size),
    )


def plan_parquet(path: Path, config: DataConfig) -> StreamPlan:
    """The table's schema and its label column (the only column read whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if config.target is None:
        raise DataError(f"--data {path} needs --target COLUMN: the column to predict.")
    try:
        table_file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"Cannot read {path}: {exc}") from None
    schema = table_file.schema_arrow
    if config.target not in schema.names:
        raise DataError(
            f"Target column {config.target!r} is not in {path}; columns: "
            f"{', '.join(schema.names[:20])}"
        )
    scalars, lists = [], []
    for column in schema:
        if column.name == config.target:
            continue
        kind = column.type
        if (
            pa.types.is_list(kind)
            or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind)
        ):
            lists.append(column.name)
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            scalars.append(column.name)
        else:
            raise DataError(
                f"Column {column.name!r} of {path} is neither numeric nor a column of lists "
                f"({kind})"
            )
    if not scalars and not lists:
        raise DataError(f"{path} has no input columns besides the target {config.target!r}")
    labels = table_file.read(columns=[config.target]).column(0)
    if labels.null_count:
        raise DataError(f"Target column {config.target!r} has missing labels")
    if len(labels) == 0:
        raise DataError(f"{path} has no rows")
    values = labels.to_numpy(zero_copy_only=False)
    if config.task == "regression":
        y, classes = values.astype(np.float32), ()
    else:
        y, classes = encode_labels(values, f"{path}:{config.target}")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return StreamPlan(
        kind="parquet",
        source=str(path),
        name=path.stem,
        labels=y,
        classes=classes,
        settings={"path": str(path.resolve()), "scalars": scalars, "lists": lists},
        items=np.arange(len(y), dtype=np.int64),
        digest=digest.hexdigest(),
    )


def write_plan(plan: StreamPlan, config: DataConfig, out_dir: Path, where: str) -> ArrayDataset:
    """Split the plan's rows (seeded, stratified: the in-memory loaders' split), check a few
    decoded rows of each split, write ``stream.json`` and ``manifest.npz``."""
    if plan.classes:
        split = split_arrays(
            {"item": np.arange(len(plan.labels))},
            plan.labels,
            config,
            name=plan.name,
            source=plan.source,
            classes=plan.classes,
        )
    else:  # a regression: the same fractions, unstratified
        split = _split_unstratified(len(plan.labels), config)
    positions = {s: split.split(s)["item"] for s in SPLITS}
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(
        out_dir / MANIFEST_FILE,
        **{f"{s}.item": plan.items[p] for s, p in positions.items()},
        **{f"{s}.label": plan.labels[p] for s, p in positions.items()},
    )
    description = {"kind": plan.kind, **plan.settings}
    (out_dir / STREAM_FILE).write_text(json.dumps(description, indent=2))
    dataset = ArrayDataset(
        path=out_dir / MANIFEST_FILE,
        info=_probe_info(plan, config, out_dir, {s: len(p) for s, p in positions.items()}, where),
        stream=plan.kind,
        sample_rows=config.sample_rows,
    )
    (out_dir / "dataset.json").write_text(dataset.info.model_dump_json(indent=2))
    return dataset


def _probe_info(
    plan: StreamPlan, config: DataConfig, out_dir: Path, sizes: dict[str, int], where: str
) -> ArrayDatasetInfo:
    """The dataset's info from a few decoded rows of each split (names, shapes, dtypes,
    classes checked the in-memory way)."""
    readers = {s: open_folder(out_dir, s) for s in SPLITS}
    probe = {s: r.rows(np.arange(min(PROBE_ROWS, len(r)))) for s, r in readers.items()}
    task = config.task if plan.classes or config.task != "auto" else "regression"
    info = checked_info(plan, probe, sizes, config.model_copy(update={"task": task}), where)
    log.info(
        "data %s (streamed %s): inputs %s, %d/%d/%d train/val/test rows, digest %s",
        info.name,
        plan.kind,
        ", ".join(f"{s.name} {s.dtype} {list(s.shape)}" for s in info.inputs),
        info.n_train,
        info.n_val,
        info.n_test,
        info.digest,
    )
    return info


def checked_info(
    plan: StreamPlan,
    probe: dict[str, dict[str, np.ndarray]],
    sizes: dict[str, int],
    config: DataConfig,
    where: str,
) -> ArrayDatasetInfo:
    """The info of a streamed dataset, its first rows (``probe``) checked as in-memory
    data is (:func:`onnxflow.arrays.check_named_arrays`)."""
    named = NamedArrays(**probe, classes=plan.classes, name=plan.name, source=plan.source)
    inputs, classes, task = check_named_arrays(named, config.task, where)
    return ArrayDatasetInfo(
        name=plan.name,
        source=plan.source,
        task=task,
        inputs=inputs,
        class_names=classes,
        n_train=sizes["train"],
        n_val=sizes["validation"],
        n_test=sizes["test"],
        digest=plan.digest[:32],
        seed=config.seed,
        preprocessing=plan.preprocessing,
    )


def _split_unstratified(n: int, config: DataConfig) -> NamedArrays:
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n)
    n_test, n_val = max(1, round(n * config.test_size)), max(1, round(n * config.val_size))
    if n - n_test - n_val < 1:
        raise DataError(f"{n} rows: too few to split into train/validation/test")
    parts = {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    return NamedArrays(**{s: {"item": p} for s, p in parts.items()})

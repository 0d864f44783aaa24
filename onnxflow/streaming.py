"""Streamed datasets: a split's rows read from their files when a batch asks for them.

With ``data.stream: true`` the data step of a recipe does not decode the data: it writes a
plan (``stream.json`` and ``manifest.npz``: which file or row is in which split, with its
label) and a digest of the files' bytes. Training then reads batches through a
:class:`SplitRows` reader, so memory is bounded by batch size x loader workers, not by
the dataset:

* an **image folder** (class subfolders of PNG/JPEG): :class:`ImageRows` decodes each
  image (RGB, resized to ``data.image_size``, NCHW, pixel / 255: :func:`decode_image`,
  the same function the in-memory loader uses);
* a **Parquet table**: :class:`ParquetRows` reads the row groups a batch needs (the
  numeric columns as ``features``, each column of lists as an input of its own name);
  only the label column is read whole, to split and stratify;
* a recipe's ``load_data`` returning **torch datasets** (``{"train": Dataset, ...}``):
  :class:`RecipeRows` over the recipe's own objects, asked again in each process.

The validation sample and the reference profile read the first ``data.sample_rows`` rows
of their split (splits are shuffled when made, so these are a random sample) through the
same reader: the same decoding as training. Nothing here imports torch, except for a
recipe's own torch datasets.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from onnxflow.arrays import (
    IMAGE_INPUT,
    LABEL,
    SPLITS,
    TABLE_INPUT,
    ArrayDataset,
    ArrayDatasetInfo,
    NamedArrays,
    check_named_arrays,
    decode_pixels,
    encode_labels,
    image_folder_files,
    image_preprocessing,
    pixels_as_input,
    split_arrays,
)
from onnxflow.config import DataConfig
from onnxflow.errors import DataError

log = logging.getLogger(__name__)

STREAM_FILE = "stream.json"
MANIFEST_FILE = "manifest.npz"
#: Rows decoded per split to check the data (names, shapes, dtypes) before training.
PROBE_ROWS = 8


class SplitRows(Protocol):
    """One split, read lazily: its length and the rows at some indices, as named arrays
    (the inputs and :data:`~onnxflow.arrays.LABEL`) with the batch axis first."""

    def __len__(self) -> int: ...

    def rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]: ...


@dataclass
class ArrayRows:
    """A split held in memory (the in-memory datasets, read the same way)."""

    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.arrays[LABEL])

    def rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        index = np.asarray(indices, dtype=np.int64)
        return {k: v[index] for k, v in self.arrays.items()}


@dataclass
class ImageRows:
    """Image files decoded per batch (:func:`onnxflow.arrays.decode_pixels`, then one
    :func:`~onnxflow.arrays.pixels_as_input` for the batch: as :func:`decode_image` gives)."""

    files: np.ndarray
    labels: np.ndarray
    size: int

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        index = np.asarray(indices, dtype=np.int64)
        pixels = np.empty((len(index), self.size, self.size, 3), dtype=np.uint8)
        for i, row in enumerate(index):
            pixels[i] = decode_pixels(Path(self.files[row]), self.size)
        return {IMAGE_INPUT: pixels_as_input(pixels), LABEL: self.labels[index]}


@dataclass
class ParquetRows:
    """Rows of a Parquet file, read a row group at a time (the last one kept per process:
    a loader worker reading a shuffled block of one row group reads it once)."""

    path: str
    row_ids: np.ndarray
    """Row numbers in the file, in the split's order."""
    labels: np.ndarray
    scalars: tuple[str, ...]
    lists: tuple[str, ...]
    _cached: tuple[int, dict[str, np.ndarray]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(self.path).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        return np.concatenate([[0], np.cumsum(sizes)])

    def blocks(self) -> list[np.ndarray]:
        """Positions in this split grouped by the row group they are in (for a shuffle that
        reads each row group once per epoch)."""
        groups = np.searchsorted(self._offsets, self.row_ids, side="right") - 1
        order = np.argsort(groups, kind="stable")
        cuts = np.flatnonzero(np.diff(groups[order])) + 1
        return np.split(order, cuts)

    def _group(self, group: int) -> dict[str, np.ndarray]:
        if self._cached is not None and self._cached[0] == group:
            return self._cached[1]
        import pyarrow.parquet as pq

        table = pq.ParquetFile(self.path).read_row_group(
            group, columns=[*self.scalars, *self.lists]
        )
        arrays: dict[str, np.ndarray] = {}
        if self.scalars:
            arrays[TABLE_INPUT] = np.stack(
                [table.column(c).to_numpy(zero_copy_only=False) for c in self.scalars], axis=1
            ).astype(np.float32)
        for name in self.lists:
            arrays[name] = _list_values(table.column(name), name, self.path)
        self._cached = (group, arrays)
        return arrays

    def rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        index = np.asarray(indices, dtype=np.int64)
        ids = self.row_ids[index]
        groups = np.searchsorted(self._offsets, ids, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for group in dict.fromkeys(groups.tolist()):  # in order of first use
            where = np.flatnonzero(groups == group)
            arrays = self._group(group)
            local = ids[where] - self._offsets[group]
            for name, values in arrays.items():
                if name not in out:
                    out[name] = np.empty((len(index), *values.shape[1:]), dtype=values.dtype)
                out[name][where] = values[local]
        for name, values in out.items():
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                bad = sorted(
                    int(ids[i])
                    for i in np.flatnonzero(
                        ~np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
                    )
                )[:5]
                raise DataError(f"{self.path}: {name} has NaN or infinite values in rows {bad}")
        out[LABEL] = self.labels[index]
        return out


@dataclass
class RecipeRows:
    """A split the recipe's ``load_data`` gave as a torch ``Dataset`` (indexable) or
    ``IterableDataset`` (read in its own order): each item a dict of named inputs with
    the label under ``"label"``, or a pair ``(inputs, label)``."""

    dataset: Any
    names: tuple[str, ...] | None = None

    @property
    def iterable(self) -> bool:
        import torch

        return isinstance(self.dataset, torch.utils.data.IterableDataset)

    def __len__(self) -> int:
        return len(self.dataset)  # TypeError for an iterable without a length

    def item(self, value: Any) -> dict[str, np.ndarray]:
        return recipe_item(value)

    def first(self, n: int) -> Iterator[dict[str, np.ndarray]]:
        source = (
            iter(self.dataset) if self.iterable else (self.dataset[i] for i in range(len(self)))
        )
        for count, value in enumerate(source):
            if count >= n:
                return
            yield self.item(value)

    def rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        index = list(np.asarray(indices, dtype=np.int64))
        if self.iterable:
            if index != list(range(len(index))):
                raise DataError("an IterableDataset is read in its own order, not by index")
            items = list(self.first(len(index)))
        else:
            items = [self.item(self.dataset[int(i)]) for i in index]
        return stack_items(items)


@dataclass(frozen=True)
class StreamedSplits:
    """What a recipe's ``fit`` gets for streamed data (in place of NamedArrays): each split a
    :class:`SplitRows` reader (``len(data.train)``, ``data.train.rows([0, 5, 9])`` -> named
    arrays with the labels under ``"label"``); :mod:`onnxflow.recipes.torch_data` makes
    DataLoaders of them."""

    train: SplitRows
    validation: SplitRows
    test: SplitRows
    classes: tuple[str, ...] = ()
    name: str = "data"
    source: str = ""
    preprocessing: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> SplitRows:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


TrainingData = NamedArrays | StreamedSplits


def split_reader(data: TrainingData, split: str) -> SplitRows:
    """A split of in-memory or streamed data as a reader."""
    if isinstance(data, StreamedSplits):
        return data.split(split)
    return ArrayRows(data.split(split))


def head(data: TrainingData, split: str, n: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The first ``n`` rows of a split's inputs, by name."""
    reader = split_reader(data, split)
    rows = reader.rows(np.arange(min(n, row_count(reader) or n)))
    return {name: rows[name] for name in names}


def streamed_splits(dataset: ArrayDataset) -> StreamedSplits:
    """The readers of a streamed dataset's three splits."""
    return StreamedSplits(**{s: open_split(dataset, s) for s in SPLITS}, **described(dataset.info))


def described(info: ArrayDatasetInfo) -> dict[str, Any]:
    """What NamedArrays and StreamedSplits carry besides the splits, from the info."""
    return {
        "classes": info.class_names,
        "name": info.name,
        "source": info.source,
        "preprocessing": dict(info.preprocessing),
    }


def row_count(reader: SplitRows) -> int | None:
    """The rows of a split; None for a recipe's IterableDataset without a length."""
    try:
        return len(reader)
    except TypeError:
        return None


def recipe_item(value: Any) -> dict[str, np.ndarray]:
    """One item of a recipe's torch dataset as named numpy values (inputs and label)."""
    if isinstance(value, tuple | list) and len(value) == 2 and isinstance(value[0], Mapping):
        inputs, label = value
        value = {**inputs, LABEL: label}
    if not isinstance(value, Mapping) or LABEL not in value:
        raise DataError(
            f"an item of the recipe's dataset is {type(value).__name__}; expected a dict of "
            f"named inputs with the label under {LABEL!r}, or (dict of inputs, label)"
        )
    return {str(k): np.asarray(_numpy(v)) for k, v in value.items()}


def stack_items(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not items:
        raise DataError("the recipe's dataset gave no items")
    return {k: np.stack([item[k] for item in items]) for k in items[0]}


def _numpy(value: Any) -> Any:
    return value.numpy() if hasattr(value, "numpy") and hasattr(value, "detach") else value


def _list_values(column, name: str, path: str) -> np.ndarray:
    values = column.to_pylist()
    lengths = {len(v) if v is not None else -1 for v in values}
    if len(lengths) != 1 or -1 in lengths:
        raise DataError(
            f"List column {name!r} of {path} has rows of lengths {sorted(lengths)[:10]}; a "
            "model input needs one fixed length (pad the lists to the same length)"
        )
    array = np.asarray(values)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind in "fb":
        return array.astype(np.float32)
    raise DataError(f"List column {name!r} of {path} holds {array.dtype} values; expected numbers")


# -- the data step -----------------------------------------------------------------------


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
    """How :func:`open_split` reads a row (image size; the table's columns)."""
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
    readers = {s: _open(out_dir, s) for s in SPLITS}
    probe = {s: r.rows(np.arange(min(PROBE_ROWS, len(r)))) for s, r in readers.items()}
    task = config.task if plan.classes or config.task != "auto" else "regression"
    info = _checked_info(plan, probe, sizes, config.model_copy(update={"task": task}), where)
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


def _checked_info(
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


def recipe_datasets(value: Any) -> bool:
    """Whether a recipe's ``load_data`` returned torch datasets (not named arrays)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, Mapping):
        return False
    return all(isinstance(value.get(s), torch.utils.data.Dataset) for s in SPLITS)


def stream_recipe(
    recipe_ref: str, value: Mapping[str, Any], config: DataConfig, out_dir: Path, where: str
) -> ArrayDataset:
    """A recipe's torch datasets: checked on their first rows, digested over their first
    ``data.sample_rows`` rows of each split and their lengths (and the recipe's own
    ``digest``, when it gives one); the training step asks ``load_data`` for them again."""
    splits = {s: RecipeRows(value[s]) for s in SPLITS}
    probe = {s: stack_items(list(r.first(PROBE_ROWS))) for s, r in splits.items()}
    labels = probe["train"][LABEL]
    classes = tuple(str(c) for c in value.get("classes", ()))
    if labels.dtype.kind in "iu" and config.task != "regression" and not classes:
        raise DataError(
            f"{where} returned torch datasets with class labels but no 'classes': give "
            "the class names (their number is not read from a whole streamed split)"
        )
    digest = hashlib.sha256(str(value.get("digest", "")).encode())
    for split, reader in splits.items():
        digest.update(f"{split}:{row_count(reader)}".encode())
        for item in reader.first(config.sample_rows):
            for key in sorted(item):
                digest.update(np.ascontiguousarray(item[key]).tobytes())
    plan = StreamPlan(
        kind="recipe",
        source=str(value.get("source", recipe_ref)),
        name=str(value.get("name", "data")),
        labels=np.zeros(0),
        classes=classes,
        settings={"recipe": recipe_ref, "data": config.model_dump(mode="json")},
        items=np.zeros(0),
        digest=digest.hexdigest(),
        preprocessing={str(k): str(v) for k, v in dict(value.get("preprocessing", {})).items()},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STREAM_FILE).write_text(json.dumps({"kind": plan.kind, **plan.settings}))
    np.savez(out_dir / MANIFEST_FILE)
    sizes = {s: _count(r) for s, r in splits.items()}
    info = _checked_info(plan, probe, sizes, config, where)
    (out_dir / "dataset.json").write_text(info.model_dump_json(indent=2))
    return ArrayDataset(
        path=out_dir / MANIFEST_FILE, info=info, stream="recipe", sample_rows=config.sample_rows
    )


def _count(reader: SplitRows) -> int:
    count = row_count(reader)
    return -1 if count is None else count


# -- reading -----------------------------------------------------------------------------


def open_split(dataset: ArrayDataset, split: str) -> SplitRows:
    """The reader of one split of a streamed dataset."""
    return _open(Path(dataset.path).parent, split)


def _open(folder: Path, split: str) -> SplitRows:
    description = json.loads((folder / STREAM_FILE).read_text())
    kind = description["kind"]
    if kind == "recipe":
        splits = _recipe_splits(description["recipe"], json.dumps(description["data"]))
        return RecipeRows(splits[split])
    with np.load(folder / MANIFEST_FILE, allow_pickle=False) as npz:
        items, labels = npz[f"{split}.item"], npz[f"{split}.label"]
    if kind == "images":
        return ImageRows(files=items, labels=labels, size=int(description["size"]))
    if kind == "parquet":
        return ParquetRows(
            path=description["path"],
            row_ids=items,
            labels=labels,
            scalars=tuple(description["scalars"]),
            lists=tuple(description["lists"]),
        )
    raise DataError(f"{folder}: unknown streamed data kind {kind!r}")


@functools.lru_cache(maxsize=4)
def _recipe_splits(recipe_ref: str, data: str) -> Mapping[str, Any]:
    """The recipe's ``load_data`` once per process (the train step opens three splits)."""
    from onnxflow.recipes import load_recipe

    recipe = load_recipe(recipe_ref)
    value = recipe.call("load_data", DataConfig.model_validate(json.loads(data)))
    if not recipe_datasets(value):
        raise DataError(f"{recipe.ref}: load_data(config) no longer returns torch datasets")
    return value


def read_rows(dataset: ArrayDataset, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The first ``sample_rows`` rows of a streamed split (the validation sample and the
    reference profile): inputs by name, in the dataset's input order, and labels."""
    reader = open_split(dataset, split)
    rows = reader.rows(np.arange(min(dataset.sample_rows, row_count(reader) or 1 << 62)))
    return {name: rows[name] for name in dataset.info.input_names}, rows[LABEL]

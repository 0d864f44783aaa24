"""Streamed datasets, read: a split's rows read from their files when a batch asks for them.

With ``data.stream: true`` the data step (:mod:`onnxflow.stream_plan`) decodes nothing: it
writes a plan (``stream.json`` and ``manifest.npz``: which file or row is in which split,
with its label). Training then reads batches through a :class:`SplitRows` reader, so memory
is bounded by batch size x loader workers, not by the dataset:

* an **image folder** (class subfolders of PNG/JPEG): :class:`ImageRows` decodes each
  image (RGB, resized to ``data.image_size``, NCHW, pixel / 255: :func:`decode_image`,
  the same function the in-memory loader uses);
* a **Parquet table**: :class:`ParquetRows` reads the row groups a batch needs (the
  numeric columns as ``features``, each column of lists as an input of its own name);
* a recipe's ``load_data`` returning **torch datasets** (``{"train": Dataset, ...}``):
  :class:`onnxflow.recipes.datasets.RecipeRows` over the recipe's own objects, asked again
  in each process (:func:`open_folder` opens them through that module).

The validation sample and the reference profile read the first ``data.sample_rows`` rows
of their split (splits are shuffled when made, so these are a random sample) through the
same reader: the same decoding as training. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
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
    decode_pixels,
    pixels_as_input,
)
from onnxflow.errors import DataError

STREAM_FILE = "stream.json"
MANIFEST_FILE = "manifest.npz"


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
    a loader worker reading a shuffled block of one row group reads it once; threads
    sharing the reader each read whole the group they use)."""

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
        cached = self._cached  # read once: Keras's loader threads share this reader
        if cached is not None and cached[0] == group:
            return cached[1]
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


def epoch_order(
    n: int, seed: int, epoch: int, blocks: list[np.ndarray] | None = None
) -> np.ndarray:
    """The order a split's ``n`` rows are read in epoch ``epoch``: every row once, in the
    permutation of ``[seed, epoch]`` (the same order for the same seed and epoch). Rows
    given in ``blocks`` (:func:`row_blocks`: a Parquet split's row groups) stay together:
    the blocks' order and the order inside each block are shuffled, so each block is read
    once. torch's ``EpochShuffle`` and Keras's ``SplitBatches`` both read this order."""
    rng = np.random.default_rng([seed, epoch])
    if not blocks:
        return rng.permutation(n)
    return np.concatenate([rng.permutation(blocks[b]) for b in rng.permutation(len(blocks))])


def row_blocks(reader: SplitRows) -> list[np.ndarray] | None:
    """The rows of a split best read together (a Parquet split's row groups), or None."""
    return reader.blocks() if isinstance(reader, ParquetRows) else None


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


# -- opening a streamed dataset's splits -------------------------------------------------


def open_split(dataset: ArrayDataset, split: str) -> SplitRows:
    """The reader of one split of a streamed dataset."""
    return open_folder(Path(dataset.path).parent, split)


def open_folder(folder: Path, split: str) -> SplitRows:
    """The reader of one split of the streamed dataset whose plan is in ``folder``."""
    description = json.loads((folder / STREAM_FILE).read_text())
    kind = description["kind"]
    if kind == "recipe":  # the recipe's own torch datasets: its load_data, asked again
        from onnxflow.recipes.datasets import open_recipe_split

        return open_recipe_split(description, split)
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


def read_rows(dataset: ArrayDataset, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The first ``sample_rows`` rows of a streamed split (the validation sample and the
    reference profile): inputs by name, in the dataset's input order, and labels."""
    reader = open_split(dataset, split)
    rows = reader.rows(np.arange(min(dataset.sample_rows, row_count(reader) or 1 << 62)))
    return {name: rows[name] for name in dataset.info.input_names}, rows[LABEL]

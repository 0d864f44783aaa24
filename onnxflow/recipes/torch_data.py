"""A recipe's data as torch DataLoaders: one batch per fetch, shuffled per epoch by seed.

Every split, in memory or streamed, is a :class:`onnxflow.streaming.SplitRows` reader;
:class:`BatchRows` makes it a map-style torch ``Dataset`` whose item is a whole batch
(``dataset[[i, j, ...]]`` -> ``(inputs by name, labels)`` as tensors), so a loader worker
decodes a batch at a time and in-memory arrays are sliced, not collated row by row.
:func:`make_loader` is the one place loaders are built; its ``sampler`` (one index per
row) is where another order goes in (a ``DistributedSampler`` for data-parallel training).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Sampler

from onnxflow.arrays import LABEL
from onnxflow.recipes.datasets import RecipeRows, stack_items
from onnxflow.streaming import SplitRows, epoch_order, row_blocks


class BatchRows(Dataset):
    """A split as a torch Dataset of batches: ``self[indices]`` -> ``(inputs, labels)``."""

    def __init__(self, reader: SplitRows, names: tuple[str, ...] | None = None) -> None:
        self.reader = reader
        self.names = names  # None: every array of a row but the label

    def __getitem__(self, indices: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows = self.reader.rows(indices)
        return as_tensors(rows, self.names or tuple(k for k in rows if k != LABEL))

    def __len__(self) -> int:
        return len(self.reader)


class IterableRows(IterableDataset):
    """A recipe's IterableDataset in batches of ``batch_size`` (in the recipe's order)."""

    def __init__(self, reader: RecipeRows, names: tuple[str, ...], batch_size: int) -> None:
        self.reader, self.names, self.batch_size = reader, names, batch_size

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        batch: list[dict[str, np.ndarray]] = []
        for value in self.reader.dataset:
            batch.append(self.reader.item(value))
            if len(batch) == self.batch_size:
                yield as_tensors(stack_items(batch), self.names)
                batch = []
        if batch:
            yield as_tensors(stack_items(batch), self.names)


def as_tensors(
    rows: dict[str, np.ndarray], names: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    inputs = {n: torch.from_numpy(np.ascontiguousarray(rows[n])) for n in names}
    return inputs, torch.from_numpy(np.ascontiguousarray(rows[LABEL]))


class EpochShuffle(Sampler[int]):
    """Every row once per epoch, in :func:`onnxflow.streaming.epoch_order` of the seed and
    the epoch (the same order for the same seed and epoch, like ``DistributedSampler``; the
    loop calls ``set_epoch``), a Parquet split's row groups kept together."""

    def __init__(self, n: int, seed: int, blocks: list[np.ndarray] | None = None) -> None:
        self.n, self.seed, self.blocks, self.epoch = n, seed, blocks, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch, self.blocks).tolist())


def make_loader(
    dataset: BatchRows | IterableRows,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    workers: int = 0,
    pin_memory: bool = False,
    sampler: Sampler[int] | None = None,
) -> DataLoader:
    """The DataLoader of one split: batches of ``batch_size`` rows, shuffled per epoch with
    ``seed`` when ``shuffle`` (or in ``sampler``'s order), fetched by ``workers`` processes
    (each holding at most two batches in flight), into pinned memory when ``pin_memory``."""
    common: dict[str, Any] = {
        "batch_size": None,
        "num_workers": workers,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
        **({"prefetch_factor": 2} if workers > 0 else {}),
    }
    if isinstance(dataset, IterableRows):  # read in this process: workers would each
        return DataLoader(dataset, batch_size=None)  # replay the whole iterable
    if sampler is None:
        sampler = (
            EpochShuffle(len(dataset), seed, row_blocks(dataset.reader))
            if shuffle
            else torch.utils.data.SequentialSampler(range(len(dataset)))
        )
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), **common)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's row sampler which epoch begins (its shuffle depends on it)."""
    rows = getattr(loader.sampler, "sampler", None)  # the BatchSampler's index sampler
    if hasattr(rows, "set_epoch"):
        rows.set_epoch(epoch)


def split_dataset(
    reader: SplitRows, names: tuple[str, ...], batch_size: int
) -> BatchRows | IterableRows:
    """The torch dataset of a split's reader (batches of ``batch_size`` for an iterable)."""
    if isinstance(reader, RecipeRows) and reader.iterable:
        return IterableRows(reader, names, batch_size)
    return BatchRows(reader, names)

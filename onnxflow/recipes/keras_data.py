"""A recipe's streamed data as Keras batches: one batch per index, shuffled per epoch by seed.

:class:`SplitBatches` is a ``keras.utils.PyDataset`` over a
:class:`onnxflow.streaming.SplitRows` reader (an image folder or a Parquet table with
``data.stream``): ``batches[i]`` reads the rows of batch ``i`` of this epoch's order
(:func:`onnxflow.streaming.epoch_order`, the order torch's ``EpochShuffle`` reads: every
row once, a Parquet split's row groups together) and returns ``(inputs, labels)``.

Why ``PyDataset`` and not a hand-made ``tf.data.Dataset.from_generator``: it is Keras 3's
own lazy input, batches are asked for by index (so an epoch is exactly the batches of one
order, whatever reads them), ``workers`` threads fetch batches in parallel into a queue of
``max_queue_size`` (here 2 per worker, as torch's ``prefetch_factor``), its
``on_epoch_begin`` hook is where the next order is taken, and on the TensorFlow backend
``model.fit`` already wraps it in ``tf.data.Dataset.from_generator`` with the output
signature read from the first batches; a generator of our own would need the signature
written by hand and would read in one thread. Threads, not processes: the readers decode
with PIL and pyarrow, which release the GIL, and nothing is pickled or forked beside
TensorFlow. With 0 or 1 workers Keras reads in ``tf.data``'s generator thread (prefetching a
few batches). Nothing is cached: memory is a few batches per worker, not the dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from onnxflow.arrays import LABEL
from onnxflow.recipes.keras_recipe import import_keras
from onnxflow.streaming import SplitRows, epoch_order, row_blocks

keras, _ = import_keras()

Feed = Callable[[Mapping[str, np.ndarray]], Any]


class SplitBatches(keras.utils.PyDataset):
    """A split as Keras batches: ``self[i]`` -> ``(feed(rows), labels)`` for the ``i``-th
    ``batch_size`` rows of this epoch's order (shuffled from ``[seed, epoch]`` when
    ``shuffle``, the split's order otherwise). ``feed`` makes the model's inputs of a
    batch's named arrays (default: every array but the label, by name). The epoch counts
    from 1, one more at each ``on_epoch_begin``; ``set_epoch`` sets it."""

    def __init__(
        self,
        reader: SplitRows,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        workers: int = 0,
        feed: Feed | None = None,
    ) -> None:
        super().__init__(
            workers=workers, use_multiprocessing=False, max_queue_size=max(1, 2 * workers)
        )
        self.reader, self.batch_size = reader, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.feed = feed or (lambda rows: {k: v for k, v in rows.items() if k != LABEL})
        self.epoch = 1
        self._begun = False
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.reader) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self) -> None:
        if self._begun:
            self.epoch += 1
        self._begun = True

    def order(self) -> np.ndarray:
        """This epoch's order of the split's rows (made once per epoch, then shared by the
        threads reading its batches)."""
        if not self.shuffle:
            return np.arange(len(self.reader))
        made = self._order  # read once: worker threads share it
        if made is None or made[0] != self.epoch:
            n = len(self.reader)
            made = (self.epoch, epoch_order(n, self.seed, self.epoch, row_blocks(self.reader)))
            self._order = made
        return made[1]

    def __getitem__(self, index: int) -> tuple[Any, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        start = index * self.batch_size
        stop = min(start + self.batch_size, len(self.reader))
        positions = self.order()[start:stop] if self.shuffle else np.arange(start, stop)
        rows = self.reader.rows(positions)
        return self.feed(rows), rows[LABEL]

"""Dynamic batching: concurrent requests share one onnxruntime run.

Requests queue up; one worker takes as many as fit ``max_batch_size`` rows (waiting at
most ``max_batch_delay_ms`` after the oldest arrived), concatenates them along the batch
axis, runs them in a worker thread and hands every caller exactly its own rows. While a
batch runs, the next one fills. Requests are merged only with requests for the same
model version and the same per-row shapes, never more rows than the model's own
``max_batch_size`` where a load set one (:mod:`onnxflow.serving.model_config`); a merged
run that fails is retried request by request, so one bad request cannot fail its
neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from onnxflow.serving.metrics import ServingMetrics
from onnxflow.serving.model import LoadedModel

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    model: LoadedModel
    feeds: dict[str, np.ndarray]
    rows: int
    key: tuple
    future: asyncio.Future
    max_rows: int
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        max_batch_size: int,
        max_delay_ms: float,
        metrics: ServingMetrics,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.max_rows = max_batch_size
        self.max_delay = max_delay_ms / 1000
        self.metrics = metrics
        self.executor = executor
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def run(
        self, model: LoadedModel, feeds: dict[str, np.ndarray], max_rows: int = 0
    ) -> list[np.ndarray]:
        """Run ``feeds`` merged with others; ``max_rows`` > 0: the model's own limit."""
        rows = next(iter(feeds.values())).shape[0]
        key = (id(model), max_rows) + tuple(
            (k, v.shape[1:], v.dtype.str) for k, v in sorted(feeds.items())
        )
        limit = min(self.max_rows, max_rows) if max_rows > 0 else self.max_rows
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(model, feeds, rows, key, future, limit))
        self._wakeup.set()
        return await future

    def _take(self) -> list[_Pending]:
        """The oldest request plus every queued one that can share its run."""
        first = self._queue.popleft()
        batch, rows, keep = [first], first.rows, deque()
        while self._queue:
            item = self._queue.popleft()
            if item.key == first.key and rows + item.rows <= first.max_rows:
                batch.append(item)
                rows += item.rows
            else:
                keep.append(item)
        keep.extend(self._queue)
        self._queue = keep
        return batch

    def _queued_rows(self, key) -> int:
        return sum(p.rows for p in self._queue if p.key == key)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            oldest = self._queue[0]
            deadline = oldest.arrived + self.max_delay
            while self._queued_rows(oldest.key) < oldest.max_rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            try:
                await loop.run_in_executor(self.executor, self._run_batch, batch)
            except Exception:  # delivered per request in _run_batch; never stop the worker
                log.exception("batch worker")

    def _run_batch(self, batch: list[_Pending]) -> None:
        model = batch[0].model
        self.metrics.batch_requests.observe(len(batch))
        if len(batch) == 1:
            self._deliver_one(batch[0])
            return
        feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
        self.metrics.batch_size.observe(sum(p.rows for p in batch))
        try:
            outputs = model.run(feeds)
        except Exception:
            for item in batch:  # isolate the request that broke the merged run
                self._deliver_one(item)
            return
        start = 0
        for item in batch:
            end = start + item.rows
            result = [out[start:end] for out in outputs]
            item.future.get_loop().call_soon_threadsafe(_resolve, item.future, result, None)
            start = end

    def _deliver_one(self, item: _Pending) -> None:
        self.metrics.batch_size.observe(item.rows)
        try:
            result, error = item.model.run(item.feeds), None
        except Exception as exc:
            result, error = None, exc
        item.future.get_loop().call_soon_threadsafe(_resolve, item.future, result, error)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

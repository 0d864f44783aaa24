"""Latency: the median wall time of a call, on batch 1 and a larger batch.

Used by validation (framework vs onnxruntime) and quantize (float vs int8), so their
figures are measured the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

#: The batch sizes latency is measured on (rows beyond the sample repeat its rows).
LATENCY_BATCHES = (1, 32)
_WARMUP_RUNS = 3

Feeds = dict[str, np.ndarray]


def median_ms(fn: Callable, rows, repeats: int) -> float:
    """Median wall time of ``fn(rows)`` in ms, after a few warm-up runs."""
    for _ in range(_WARMUP_RUNS):
        fn(rows)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(rows)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def resized(feeds: Feeds, batch: int) -> Feeds:
    """``batch`` rows of every input: the sample's rows, repeated as often as needed."""
    return {k: np.resize(v, (batch, *v.shape[1:])).astype(v.dtype) for k, v in feeds.items()}


def latencies(
    runners: Mapping[str, Callable[[Feeds], object]],
    feeds: Feeds,
    repeats: int,
    dynamic_batch: bool = True,
) -> dict[str, float]:
    """``{"<runner>_b1": ms, "<runner>_b32": ms, ...}``: the median ms of each runner on each
    of :data:`LATENCY_BATCHES`; without a dynamic batch axis, on the whole sample as it is
    (``"<runner>_sample"``)."""
    figures = {}
    for batch in LATENCY_BATCHES if dynamic_batch else (None,):
        rows, key = (feeds, "sample") if batch is None else (resized(feeds, batch), f"b{batch}")
        for who, run in runners.items():
            figures[f"{who}_{key}"] = median_ms(run, rows, repeats)
    return figures

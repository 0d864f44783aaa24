"""Per model and version inference statistics, as Triton's statistics extension reports them.

Durations are cumulative nanoseconds with a count, per phase: ``success`` (whole request,
for the ones that succeeded), ``fail``, ``queue`` (waiting for a dynamic batch or a worker
thread), ``compute_input`` (parsing and checking the tensors), ``compute_infer`` (the
onnxruntime run), ``compute_output`` (encoding the answer). ``inference_count`` counts
rows (batch elements), ``execution_count`` model runs, as Triton does. Written and read
on the event loop's thread only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

PHASES = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


@dataclass
class ModelStats:
    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    phases: dict[str, list[int]] = field(default_factory=lambda: {p: [0, 0] for p in PHASES})

    def add(self, phase: str, ns: int) -> None:
        entry = self.phases[phase]
        entry[0] += 1
        entry[1] += ns

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {p: {"count": c, "ns": ns} for p, (c, ns) in self.phases.items()},
            "batch_stats": [],
            "memory_usage": [],
        }


class Statistics:
    def __init__(self) -> None:
        self.models: dict[tuple[str, str], ModelStats] = {}

    def of(self, name: str, version: str) -> ModelStats:
        key = (name, version)
        stats = self.models.get(key)
        if stats is None:
            stats = self.models[key] = ModelStats(name, version)
        return stats

    def success(
        self,
        name: str,
        version: str,
        rows: int,
        *,
        total_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None:
        stats = self.of(name, version)
        stats.last_inference_ms = int(time.time() * 1000)
        stats.inference_count += rows
        stats.execution_count += 1
        stats.add("success", total_ns)
        stats.add("compute_input", input_ns)
        stats.add("compute_infer", infer_ns)
        stats.add("compute_output", output_ns)
        stats.add("queue", 0)

    def failure(self, name: str, version: str, total_ns: int) -> None:
        stats = self.of(name, version)
        stats.last_inference_ms = int(time.time() * 1000)
        stats.add("fail", total_ns)

    def report(self, name: str, versions: list[str]) -> list[dict]:
        """Triton's ``model_stats`` entries of ``name`` for each version asked about."""
        return [self.of(name, v).as_json() for v in versions]

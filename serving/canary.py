"""The canary: a share of live requests answered by the challenger, stopped when it does worse.

With ``--canary-percent N`` every served model also follows ``NAME@challenger``
(``canary_alias``) with a :class:`~onnxflow.serving.manager.ModelManager` loading it in this
process, and :meth:`Canary.choose` hands N% of its inference requests to that version (the
answer says so in ``X-Model-Version``). Per trial (served version, canary version) the
requests each answered are judged against each other, on the same traffic: once the canary
has answered ``canary_min_requests``, it stops when its error rate exceeds the served
version's by ``canary_max_error_rate`` or its p99 exceeds ``canary_max_p99_ratio`` times
the served p99. A stopped canary answers nothing more; the reason goes onto its registry
version (``canary_stopped`` and figures, through the registry layer), and a version tagged
so is never tried again. Moving the alias to another version starts a new trial.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field

from onnxflow.serving.manager import ModelManager
from onnxflow.serving.metrics import ServingMetrics
from onnxflow.serving.model import LoadedModel
from onnxflow.serving.registry_reader import Annotation, registry_for
from onnxflow.serving.settings import ServingSettings

log = logging.getLogger(__name__)

STOPPED_TAG = "canary_stopped"
WINDOW = 5_000  # latencies kept per side for the p99
JUDGE_EVERY = 10  # canary answers between two judgements


def p99(values) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)] if ordered else None


@dataclass
class Side:
    """One version's answers within a trial."""

    ok: int = 0
    errors: int = 0
    seconds: deque = field(default_factory=lambda: deque(maxlen=WINDOW))

    @property
    def requests(self) -> int:
        return self.ok + self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def add(self, ok: bool, seconds: float) -> None:
        if ok:
            self.ok += 1
            self.seconds.append(seconds)
        else:
            self.errors += 1


@dataclass
class Trial:
    """The canary version against the served one, on the same traffic."""

    model: str
    served_version: str
    canary_version: str
    served: Side = field(default_factory=Side)
    canary: Side = field(default_factory=Side)

    def verdict(self, max_error_rate: float, max_p99_ratio: float, min_requests: int) -> str | None:
        """Why the canary must stop, or None while it does well enough (or is too young)."""
        if self.canary.requests < min_requests:
            return None
        if self.canary.error_rate > self.served.error_rate + max_error_rate:
            return (
                f"error rate {self.canary.error_rate:.3f} over {self.canary.requests} requests "
                f"against {self.served.error_rate:.3f} for version {self.served_version} "
                f"(limit +{max_error_rate:g})"
            )
        ours, theirs = p99(self.canary.seconds), p99(self.served.seconds)
        if (
            ours is not None
            and theirs
            and len(self.served.seconds) >= min_requests
            and ours > max_p99_ratio * theirs
        ):
            return (
                f"p99 {ours * 1000:.2f} ms against {theirs * 1000:.2f} ms for version "
                f"{self.served_version} (limit {max_p99_ratio:g}x)"
            )
        return None

    def tags(self, reason: str) -> dict[str, str]:
        latency = p99(self.canary.seconds)
        return {
            STOPPED_TAG: reason,
            "canary_champion_version": self.served_version,
            "canary_requests": str(self.canary.requests),
            "canary_error_rate": f"{self.canary.error_rate:.4f}",
            "canary_p99_ms": "n/a" if latency is None else f"{latency * 1000:.3f}",
        }

    def as_json(self) -> dict:
        return {
            "model": self.model,
            "version": self.served_version,
            "canary_version": self.canary_version,
            "served": {"requests": self.served.requests, "errors": self.served.errors},
            "canary": {"requests": self.canary.requests, "errors": self.canary.errors},
        }


class Canary:
    """Every served model's canary: its managers, the share it answers, the trials."""

    def __init__(self, settings: ServingSettings, metrics: ServingMetrics) -> None:
        self.settings = settings
        self.share = settings.canary_percent / 100
        self.alias = settings.canary_alias
        self.metrics = metrics
        self.managers: dict[str, ModelManager] = {}
        self.trials: dict[tuple[str, str, str], Trial] = {}
        self.stopped: dict[tuple[str, str], str] = {}  # (name, canary version) -> why
        self._random = random.Random()
        self._tasks: list[asyncio.Task] = []

    def follow(self, served: ModelManager) -> None:
        if served.name in self.managers:
            return
        manager = ModelManager(
            self.settings, self.metrics, f"{served.name}@{self.alias}", shadow_of=served
        )
        self.managers[served.name] = manager
        self._tasks.append(
            asyncio.get_running_loop().create_task(manager.watch(), name=f"canary-{served.name}")
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _candidate(self, name: str) -> LoadedModel | None:
        manager = self.managers.get(name)
        model = manager.current if manager is not None else None
        if model is None or (name, model.version) in self.stopped:
            return None
        if STOPPED_TAG in model.tags:  # stopped before (by this endpoint or another)
            self.stopped[(name, model.version)] = model.tags[STOPPED_TAG]
            return None
        return model

    def choose(self, served: LoadedModel) -> LoadedModel:
        """The model that answers this request: the canary for its share, else ``served``."""
        canary = self._candidate(served.name)
        if canary is None or canary.version == served.version:
            return served
        return canary if self._random.random() < self.share else served

    def record(self, model: LoadedModel, ok: bool, seconds: float) -> None:
        """One answered (or failed) inference request, by whichever version answered it."""
        manager = self.managers.get(model.name)
        if manager is None or manager.shadow_of is None:
            return
        served, canary = manager.shadow_of.current, manager.current
        if served is None or canary is None or served.version == canary.version:
            return
        key = (model.name, served.version, canary.version)
        trial = self.trials.get(key)
        if trial is None:
            trial = self.trials[key] = Trial(*key)
        if model is canary:
            trial.canary.add(ok, seconds)
            self.metrics.canary_requests.labels(
                model.name, canary.version, "ok" if ok else "error"
            ).inc()
            if trial.canary.requests % JUDGE_EVERY == 0 or not ok:
                self._judge(trial)
        elif model is served:
            trial.served.add(ok, seconds)

    def _judge(self, trial: Trial) -> None:
        settings = self.settings
        reason = trial.verdict(
            settings.canary_max_error_rate,
            settings.canary_max_p99_ratio,
            settings.canary_min_requests,
        )
        if reason is None or (trial.model, trial.canary_version) in self.stopped:
            return
        self.stopped[(trial.model, trial.canary_version)] = reason
        self.metrics.canary_stopped.labels(trial.model, trial.canary_version).set(1)
        log.warning("canary %s version %s stopped: %s", trial.model, trial.canary_version, reason)
        note = Annotation(trial.model, trial.canary_version, trial.tags(reason), {})
        self._tasks.append(asyncio.get_running_loop().create_task(self._tag(note)))

    async def _tag(self, note: Annotation) -> None:
        registry = registry_for(self.settings.tracking_uri, self.settings.registry_access)
        try:
            await asyncio.to_thread(registry.annotate, [note])
        except Exception as exc:  # noqa: BLE001  (the canary stays stopped in this process)
            log.warning("cannot tag %s version %s: %s", note.name, note.version, exc)

    def status(self) -> dict:
        return {
            "alias": self.alias,
            "percent": self.share * 100,
            "models": {
                name: m.current.version if m.current else None for name, m in self.managers.items()
            },
            "stopped": {f"{n}/{v}": why for (n, v), why in self.stopped.items()},
            "trials": [t.as_json() for t in self.trials.values()],
        }

"""The model manager: follows ``NAME@ALIAS`` in the MLflow registry and swaps versions.

A check resolves the alias; a new version is downloaded into the cache (by name and
version, so a restart finds it), verified and warmed beside the serving one, then
swapped in with one assignment. Requests hold the model they started with, so
in-flight requests finish on the old session. A version that fails any check is
refused: it is logged and counted, the old one keeps serving, and the watcher does not
retry it until the alias moves (an explicit reload does retry it).

A manager made with ``shadow_of`` follows a second alias (``--shadow challenger``) beside
a served model: it publishes nothing as served, loads with the shadow's ``loader`` (in its
worker process), and while its alias points at the version being served it holds nothing
(there is nothing to compare).

Registry calls run in a worker thread (see :mod:`onnxflow.serving.registry_reader` for how
they reach MLflow); the event loop keeps serving while a version downloads and warms up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from onnxflow.serving.drift import PROFILE_FILE
from onnxflow.serving.metrics import ServingMetrics
from onnxflow.serving.model import LoadedModel, ModelRefused, load_model
from onnxflow.serving.registry_reader import Registry, registry_for
from onnxflow.serving.settings import ServingSettings, parse_model_reference

log = logging.getLogger(__name__)

COMPLETE = ".onnxflow-complete"


@dataclass(frozen=True)
class CheckOutcome:
    outcome: str  # swapped | unchanged | refused | registry_error
    version: str | None
    serving: str | None
    detail: str = ""

    def as_json(self) -> dict:
        return asdict(self)


def cached_folder(cache_dir: Path, name: str, version: str, digest: str | None = None) -> Path:
    """Keyed by the registered digest too: ``digits/3`` of another registry (a demo store,
    then a tracking server, sharing one working folder) is another model."""
    return Path(cache_dir) / name / (f"{version}-{digest[:16]}" if digest else version)


def fetch_version(
    registry: Registry, cache_dir: Path, name: str, version: str, digest: str | None = None
) -> Path:
    """The version's files in the cache, downloading them once (atomically) if needed."""
    target = cached_folder(cache_dir, name, version, digest)
    if (target / COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        local = registry.download(name, version, staging)
        fetch_profile(registry, name, version, local / PROFILE_FILE)
        (local / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        if target.exists():
            shutil.rmtree(target)
        os.replace(local, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("downloaded %s version %s into %s", name, version, target)
    return target


def fetch_profile(registry: Registry, name: str, version: str, dest: Path) -> None:
    """The version's reference profile into ``dest`` when it has one; a version without
    (or a registry that cannot give it) is served without drift figures."""
    try:
        profile = registry.profile(name, version)
    except Exception as exc:  # noqa: BLE001  (drift figures are never worth a refusal)
        log.warning("no reference profile for %s version %s: %s", name, version, exc)
        return
    if profile:
        dest.write_text(json.dumps(profile))


def release_memory() -> None:
    """Hand memory freed by loading back to the system; exempt what stays from GC scans.

    Freezing the long-lived objects (modules, sessions) keeps the collector's full passes
    short while serving, which shows in tail latency.
    """
    import ctypes
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class ModelManager:
    """One served model: follows ``reference`` (NAME@ALIAS or NAME/VERSION) and swaps."""

    def __init__(
        self,
        settings: ServingSettings,
        metrics: ServingMetrics,
        reference: str,
        *,
        shadow_of: ModelManager | None = None,
        loader=load_model,
    ) -> None:
        self.settings = settings
        self.shadow_of = shadow_of
        self.loader = loader  # (folder, name=, version=, tags=, settings=) -> the loaded model
        self.metrics = metrics
        self.name, self.alias, self.pinned = parse_model_reference(reference)
        self.current: LoadedModel | None = None
        self.refused: dict[str, str] = {}
        self.last_check: CheckOutcome | None = None
        self._registry: Registry | None = None
        self._lock = asyncio.Lock()

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.pinned}"

    def registry_client(self) -> Registry:
        if self._registry is None:
            self._registry = registry_for(self.settings.tracking_uri, self.settings.registry_access)
            log.info(
                "reading the registry at %s via %s",
                self.settings.tracking_uri or "(MLflow default)",
                type(self._registry).__name__,
            )
        return self._registry

    def _resolve(self) -> tuple[str, dict]:
        return self.registry_client().resolve(self.name, self.alias, self.pinned)

    async def check(self, *, force: bool = False) -> CheckOutcome:
        """Resolve the alias and swap to its version if it is new and passes every check."""
        async with self._lock:
            outcome = await self._check(force)
        self.last_check = outcome
        if self.shadow_of is None:
            self.metrics.reloads.labels(outcome.outcome).inc()
        return outcome

    async def _check(self, force: bool) -> CheckOutcome:
        serving = self.current.version if self.current else None
        try:
            version, tags = await asyncio.to_thread(self._resolve)
        except Exception as exc:
            # A shadow alias that is missing (no challenger yet) is said once, not every poll.
            repeated = (
                self.shadow_of is not None
                and self.last_check is not None
                and (self.last_check.detail == str(exc))
            )
            log.log(
                logging.DEBUG if repeated else logging.WARNING,
                "cannot resolve %s in the registry: %s",
                self.reference,
                exc,
            )
            return CheckOutcome("registry_error", None, serving, str(exc))
        if version == serving:
            return CheckOutcome("unchanged", version, serving)
        served = self.shadow_of.current if self.shadow_of is not None else None
        if self.shadow_of is not None and served is None:
            # nothing is served yet, so nothing to compare; and the served manager may be
            # fetching this same version into the same cache folder right now (champion
            # and challenger on one version: a concurrent fetch got it refused for good)
            return CheckOutcome("unchanged", version, serving, "nothing served yet")
        if served is not None and served.version == version:
            # the served version itself: nothing to compare, nothing to load (until one moves)
            if self.current is not None:
                log.info("%s is version %s, the one served: not mirrored", self.reference, version)
            self.current = None
            return CheckOutcome("unchanged", version, None, "the served version: not mirrored")
        if version in self.refused and not force:
            return CheckOutcome("refused", version, serving, self.refused[version])
        log.info(
            "%s points at version %s (serving %s): loading it", self.reference, version, serving
        )
        try:
            folder = await asyncio.to_thread(
                fetch_version,
                self.registry_client(),
                self.settings.cache_dir,
                self.name,
                version,
                tags.get("onnx_sha256"),
            )
        except Exception as exc:  # transient: not a refusal, the next check tries again
            log.warning("cannot download %s version %s: %s", self.name, version, exc)
            return CheckOutcome("registry_error", version, serving, f"download failed: {exc}")
        try:
            model = await asyncio.to_thread(
                self.loader,
                folder,
                name=self.name,
                version=version,
                tags=tags,
                settings=self.settings,
            )
        except ConnectionError as exc:  # the shadow's worker went away: the next check retries
            log.warning("cannot load %s version %s: %s", self.name, version, exc)
            return CheckOutcome("registry_error", version, serving, f"load failed: {exc}")
        except ModelRefused as exc:
            shutil.rmtree(folder, ignore_errors=True)  # a forced retry downloads afresh
            self.refused[version] = str(exc)
            self.metrics.refusals.labels(self.name, version).inc()
            log.error(
                "refused %s version %s; still serving %s: %s", self.name, version, serving, exc
            )
            return CheckOutcome("refused", version, serving, str(exc))
        await asyncio.to_thread(release_memory)
        previous = self.current
        self.current = model  # the swap: new requests see the new session from here on
        self.refused.pop(version, None)
        if self.shadow_of is not None:
            log.info("%s: version %s loaded (was %s)", self.reference, version, serving)
            return CheckOutcome("swapped", version, version)
        self.metrics.serving(
            model.name,
            model.version,
            model.digest,
            (previous.name, previous.version, previous.digest) if previous else None,
        )
        log.info("now serving %s version %s (was %s)", self.name, version, serving)
        return CheckOutcome("swapped", version, version)

    async def watch(self) -> None:
        """Check at start, then every poll interval (until ready, at least every 2 s)."""
        interval = self.settings.poll_interval_s
        while True:
            try:
                await self.check()
            except Exception:  # the watcher must outlive any single failure
                log.exception("alias check failed")
            # A shadow alias may never exist: it is checked at the poll interval, not retried.
            settled = self.current is not None or self.shadow_of is not None
            if settled and interval <= 0:
                return
            delay = interval if settled else min(interval or 2.0, 2.0)
            await asyncio.sleep(delay)

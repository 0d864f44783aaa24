"""The model repository: which models an endpoint serves, and loading them.

One :class:`~onnxflow.serving.manager.ModelManager` per model follows its alias (its own
watcher, swap and refusals): one that fails to load is refused and counted, the others
serve on. With ``all_models`` the registry is asked at every poll for the models with
that alias, and each new one gets a manager. Triton's repository extension (index, load
with a config override, unload) is answered here; the data plane
(:mod:`onnxflow.serving.dataplane`) asks it for the model a request runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from onnxflow.serving.errors import Conflict, NotFound, NotReady, UpstreamError
from onnxflow.serving.manager import CheckOutcome, ModelManager
from onnxflow.serving.metrics import ServingMetrics
from onnxflow.serving.model import LoadedModel
from onnxflow.serving.model_config import ConfigOverride, parse_load_parameters, triton_config
from onnxflow.serving.settings import ServingSettings

log = logging.getLogger(__name__)


class ModelRepository:
    """The served models by name, each following its alias; ``on_follow(manager)`` is
    told of every manager that starts watching (the shadow and the canary follow it)."""

    def __init__(
        self,
        settings: ServingSettings,
        metrics: ServingMetrics,
        on_follow: Callable[[ModelManager], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_follow = on_follow
        self.managers: dict[str, ModelManager] = {}
        for reference in settings.model_references:
            manager = ModelManager(settings, metrics, reference)
            self.managers[manager.name] = manager
        self.default_name: str | None = next(iter(self.managers), None)
        self.discovered = settings.all_models is None  # nothing to discover
        self._watchers: dict[str, asyncio.Task] = {}  # "discover" and one per model
        self.unloaded: set[str] = set()  # models unloaded through the repository API
        self.overrides: dict[str, ConfigOverride] = {}  # config given on load, until unload

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """One alias watcher per model, and the discovery of new ones (on the running loop)."""
        for manager in self.managers.values():
            self._watch(manager)
        if self.settings.all_models:
            self._watchers["discover"] = asyncio.get_running_loop().create_task(
                self._discover(), name="discover"
            )

    def _watch(self, manager: ModelManager) -> None:
        self._watchers[manager.name] = asyncio.get_running_loop().create_task(
            manager.watch(), name=f"watch-{manager.name}"
        )
        if self.on_follow is not None:
            self.on_follow(manager)

    async def _discover(self) -> None:
        """Serve every model that has the alias, as it appears (every poll interval)."""
        from onnxflow.serving.registry_reader import registry_for

        alias = self.settings.all_models
        interval = self.settings.poll_interval_s
        registry = registry_for(self.settings.tracking_uri, self.settings.registry_access)
        while True:
            try:
                names = await asyncio.to_thread(registry.models_with_alias, alias)
            except Exception as exc:  # noqa: BLE001  (the next poll tries again)
                log.warning("cannot list the models with alias %r: %s", alias, exc)
            else:
                for name in names:
                    if name not in self.managers:
                        log.info("%s@%s found in the registry: serving it too", name, alias)
                        manager = ModelManager(self.settings, self.metrics, f"{name}@{alias}")
                        self.managers[name] = manager
                        self.default_name = self.default_name or name
                        self._watch(manager)
                self.discovered = True
            if interval <= 0 and self.discovered:
                return
            await asyncio.sleep(interval if self.managers and interval > 0 else 2.0)

    async def stop(self) -> None:
        for task in self._watchers.values():
            task.cancel()
        for task in self._watchers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watchers.clear()

    # --- lookups ---------------------------------------------------------------------

    def manager(self, name: str | None) -> ModelManager:
        manager = self.managers.get(name)
        if manager is None:
            served = ", ".join(repr(n) for n in self.managers)
            # Triton's clients look for this wording
            raise NotFound(
                f"Request for unknown model: {name!r} is not found; this endpoint "
                f"serves {served or 'no model yet'}"
            )
        return manager

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        """The version of ``name`` serving now (which must be ``version`` if given)."""
        model = self.manager(name).current
        if model is None:
            if name in self.unloaded:
                raise NotReady(
                    f"model {name!r} is unloaded; POST "
                    f"/v2/repository/models/{name}/load loads it again"
                )
            raise NotReady(f"model {name!r} is not loaded yet")
        if version is not None and version != model.version:
            raise NotFound(
                f"version {version} of {name!r} is not loaded; serving version {model.version}"
            )
        return model

    def default_model(self) -> LoadedModel:
        """The model of routes without a model name (``/invocations``): the first served."""
        if self.default_name is None:
            raise NotReady(
                f"no model with alias {self.settings.all_models!r} found in the registry yet"
            )
        return self.model(self.default_name)

    def max_batch_size(self, name: str) -> int:
        """The most rows a request for ``name`` may carry (0: no limit), as loaded."""
        override = self.overrides.get(name)
        return override.max_batch_size if override is not None else 0

    def served_versions(self) -> set[tuple[str, str]]:
        """(name, version) of every model serving now."""
        return {(m.name, m.version) for m in (x.current for x in self.managers.values()) if m}

    def ready(self) -> bool:
        """Every model has been checked once and at least one serves: one that cannot load
        (refused, or not in the registry) does not keep the others from serving."""
        managers = [m for n, m in self.managers.items() if n not in self.unloaded]
        return (
            self.discovered
            and any(m.current is not None for m in managers)
            and all(m.current is not None or m.last_check is not None for m in managers)
        )

    def model_config(self, name: str, version: str | None = None) -> dict:
        """Triton's model config (JSON form), with the override it was loaded with."""
        return triton_config(self.model(name, version), self.max_batch_size(name))

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        """Every model this endpoint serves or was told to: name, version, state, reason."""
        entries = []
        for name, manager in self.managers.items():
            model = manager.current
            if model is not None:
                entry = {"name": name, "version": model.version, "state": "READY", "reason": ""}
            else:
                check = manager.last_check
                reason = (
                    "unloaded"
                    if name in self.unloaded
                    else check.detail
                    if check
                    else "not loaded yet"
                )
                entry = {
                    "name": name,
                    "version": (check.version or "") if check else "",
                    "state": "UNAVAILABLE",
                    "reason": reason,
                }
            if entry["state"] == "READY" or not ready_only:
                entries.append(entry)
        return entries

    async def load(self, name: str, parameters: dict | None = None) -> CheckOutcome:
        """Load (or reload) ``name`` from the registry: a model not served yet follows
        ``NAME@ALIAS`` (the all_models alias, else champion). Raises if nothing serves.

        ``parameters``: Triton's load parameters; ``config`` (a JSON model config) may set
        ``max_batch_size``, kept until the model is unloaded (a load without ``config``
        keeps it). Checked before anything loads."""
        override = parse_load_parameters(name, parameters or {})
        manager = self.managers.get(name)
        fresh = manager is None
        if fresh:
            alias = self.settings.all_models or "champion"
            manager = ModelManager(self.settings, self.metrics, f"{name}@{alias}")
        outcome = await manager.check(force=True)
        if manager.current is None:
            # not in the registry: not found; found, but its files could not be fetched:
            # the registry failed us; found and refused by the checks: a conflict
            if outcome.outcome != "registry_error":
                error = Conflict
            else:
                error = NotFound if outcome.version is None else UpstreamError
            raise error(
                f"failed to load {name!r} ({manager.reference}): {outcome.outcome}: "
                f"{outcome.detail or 'no version'}"
            )
        if fresh:
            self.managers[name] = manager
            self.default_name = self.default_name or name
        self.unloaded.discard(name)
        if override is not None:
            self.overrides[name] = override
            log.info("%s loaded with max_batch_size %d", name, override.max_batch_size)
        task = self._watchers.get(name)
        if task is None or task.done():
            self._watch(manager)
        return outcome

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` (and following its alias) until it is loaded again."""
        manager = self.manager(name)
        task = self._watchers.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        manager.current = None
        self.overrides.pop(name, None)
        self.unloaded.add(name)
        log.info("unloaded %s", name)

    async def reload(self, name: str | None = None) -> CheckOutcome:
        """Check the alias of ``name`` (the default model) now, retrying a refused version."""
        if name is None and self.default_name is None:
            raise NotReady("no model to reload yet")
        return await self.manager(name or self.default_name).check(force=True)

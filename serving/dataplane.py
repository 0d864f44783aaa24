"""The data plane: which models are served, their checks and their runs, for every front.

The fronts (:mod:`onnxflow.serving.app` for REST, the gRPC front) parse their protocol
and call this: authorize a token, resolve a model by name and version, execute checked
feeds, report metadata and readiness, reload and describe what is served. Nothing here
knows HTTP; failures are the named errors of :mod:`onnxflow.serving.errors`.

With a shadow alias (``--shadow challenger``) every answered request is also offered to
:mod:`onnxflow.serving.shadow`, which mirrors it off the request path.

Each request reads the served model once (:meth:`DataPlane.model`) and keeps it, so a
swap never mixes versions within a request. Fast models run on the event loop (a thread
hop costs more than the run), slow ones in worker threads, or merged by the batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from onnxflow.serving.batching import Batcher
from onnxflow.serving.capture import new_request_id
from onnxflow.serving.comparison import timed_run
from onnxflow.serving.errors import (
    BadInput,
    CannotRun,
    Conflict,
    Forbidden,
    NotFound,
    NotReady,
    RequestError,
    Unauthorized,
)
from onnxflow.serving.manager import CheckOutcome, ModelManager
from onnxflow.serving.metrics import ServingMetrics
from onnxflow.serving.model import LoadedModel
from onnxflow.serving.model_config import ConfigOverride, parse_load_parameters, triton_config
from onnxflow.serving.settings import ServingSettings
from onnxflow.serving.shared_memory import SharedMemoryRegistry
from onnxflow.serving.statistics import Statistics

log = logging.getLogger(__name__)

HEAVY_MODULES = ("torch", "tensorflow", "pandas", "sklearn", "jax")
SERVER_NAME = "onnxflow"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "statistics", "model_repository"]


class DataPlane:
    """Models, token, executor and batcher shared by the fronts.

    Every model follows its own alias with its own :class:`ModelManager` (its own watcher,
    swap and refusals): one that fails to load is refused and counted, the others serve
    on. With ``all_models`` the registry is asked at every poll for models with that alias,
    and each new one gets a manager.
    """

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        self.managers: dict[str, ModelManager] = {}
        for reference in settings.model_references:
            manager = ModelManager(settings, self.metrics, reference)
            self.managers[manager.name] = manager
        self.default_name: str | None = next(iter(self.managers), None)
        self.discovered = settings.all_models is None  # nothing to discover
        self.executor = ThreadPoolExecutor(
            settings.inference_threads, thread_name_prefix="onnxruntime"
        )
        self.batcher: Batcher | None = None
        self.token = settings.token.get_secret_value().encode() if settings.token else None
        self.started = time.time()
        self._watchers: dict[str, asyncio.Task] = {}  # "discover" and one per model
        self.unloaded: set[str] = set()  # models unloaded through the repository API
        self.overrides: dict[str, ConfigOverride] = {}  # config given on load, until unload
        self.stats = Statistics()
        self.shared_memory = SharedMemoryRegistry() if settings.shared_memory else None
        self.shadow = None
        if settings.shadow:
            from onnxflow.serving.shadow import Shadow

            self.shadow = Shadow(settings, self.metrics)
        self.capture = None
        if settings.capture:
            from onnxflow.serving.capture import Capture

            self.capture = Capture(settings, self.metrics)
        self.feedback = None
        if self.capture is not None:
            from onnxflow.serving.feedback import FeedbackStore

            self.feedback = FeedbackStore(self.capture)
        self.canary = None
        if settings.canary_percent > 0:
            from onnxflow.serving.canary import Canary

            self.canary = Canary(settings, self.metrics)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batcher and one alias watcher per model (on the running loop)."""
        loop = asyncio.get_running_loop()
        if self.capture is not None:
            await asyncio.to_thread(self.capture.start)
        if self.shadow is not None:
            await self.shadow.start()
        if self.settings.batching:
            self.batcher = Batcher(
                self.settings.max_batch_size,
                self.settings.max_batch_delay_ms,
                self.metrics,
                self.executor,
            )
            self.batcher.start()
        for manager in self.managers.values():
            self._watch(manager)
        if self.settings.all_models:
            self._watchers["discover"] = loop.create_task(self._discover(), name="discover")

    def _watch(self, manager: ModelManager) -> None:
        self._watchers[manager.name] = asyncio.get_running_loop().create_task(
            manager.watch(), name=f"watch-{manager.name}"
        )
        if self.shadow is not None:
            self.shadow.follow(manager)
        if self.canary is not None:
            self.canary.follow(manager)

    async def _discover(self) -> None:
        """Serve every model that has the alias, as it appears (every poll interval)."""
        from onnxflow.serving.discovery import models_with_alias

        alias = self.settings.all_models
        interval = self.settings.poll_interval_s
        while True:
            try:
                names = await asyncio.to_thread(
                    models_with_alias, alias, None, self.settings.registry_access
                )
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
        if self.shadow is not None:
            await self.shadow.stop()
        if self.canary is not None:
            await self.canary.stop()
        if self.batcher:
            await self.batcher.stop()
        if self.capture is not None:  # every record accepted so far is written
            self.capture.stopping()
            await asyncio.to_thread(self.capture.stop)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.shared_memory is not None:
            self.shared_memory.unregister()

    # --- checks ----------------------------------------------------------------------

    def authorize(self, authorization: str | None, admin: bool = False) -> None:
        """Check an ``Authorization`` value (HTTP header or gRPC metadata): ``Bearer <token>``."""
        if self.token is None:
            if admin:
                raise Forbidden(
                    "admin routes are off: start the endpoint with a token "
                    "(--token or ONNXFLOW_SERVE_TOKEN) to use them"
                )
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token
        ):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")

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

    def inference_model(self, name: str | None, version: str | None = None) -> LoadedModel:
        """The version that answers an inference request: the served one, or the canary for
        its share (only when no version is asked for). ``name`` None: the default model."""
        model = self.default_model() if name is None else self.model(name, version)
        if self.canary is not None and version is None:
            return self.canary.choose(model)
        return model

    def default_model(self) -> LoadedModel:
        """The model of routes without a model name (``/invocations``): the first served."""
        if self.default_name is None:
            raise NotReady(
                f"no model with alias {self.settings.all_models!r} found in the registry yet"
            )
        return self.model(self.default_name)

    # --- execution -------------------------------------------------------------------

    async def execute(self, model: LoadedModel, feeds: dict) -> tuple[list, float | None]:
        """Run the model on checked feeds: batched, on the loop, or in a worker thread.
        Returns the outputs and the onnxruntime run's seconds (:func:`timed_run`, as the
        shadow times its own), None when the batcher merged the request with others."""
        try:
            if self.batcher is not None and model.batchable:
                rows = {a.shape[0] for a in feeds.values()}
                if len(rows) > 1:
                    raise BadInput(f"inputs disagree on the batch size: {sorted(rows)}")
                limit = self.max_batch_size(model.name)
                return await self.batcher.run(model, feeds, limit), None
            if model.inline:
                rows = max(a.shape[0] if a.ndim else 1 for a in feeds.values())
                if rows <= model.inline_rows:
                    return timed_run(model.run, feeds)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, timed_run, model.run, feeds)
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001  (onnxruntime refused this input at run time)
            raise CannotRun(f"the model could not run on this input: {exc}") from None

    def max_batch_size(self, name: str) -> int:
        """The most rows a request for ``name`` may carry (0: no limit), as loaded."""
        override = self.overrides.get(name)
        return override.max_batch_size if override is not None else 0

    def check_batch(self, name: str, feeds: dict) -> None:
        limit = self.max_batch_size(name)
        if limit <= 0:
            return
        rows = max((a.shape[0] if a.ndim else 1) for a in feeds.values())
        if rows > limit:
            raise BadInput(
                f"a batch of {rows} rows is over max_batch_size {limit} of model {name!r} "
                "(the config it was loaded with)"
            )

    def request_id(self, given: str | None) -> str | None:
        """The id a request is known by: the client's, else (when capturing) a new one that
        the response carries back, for feedback to refer to."""
        if given or self.capture is None:
            return given or None
        return new_request_id()

    async def run_request(self, model: LoadedModel, decode, encode, request_id=None):
        """One inference request, timed for the statistics: ``decode()`` gives the checked
        feeds, :meth:`execute` runs them, ``encode(results)`` gives the answer.
        ``request_id()``: the request's id, read once the request is decoded (capture)."""
        start = time.perf_counter_ns()
        try:
            feeds = decode()
            self.check_batch(model.name, feeds)
            decoded = time.perf_counter_ns()
            results, run_s = await self.execute(model, feeds)
            ran = time.perf_counter_ns()
            answer = encode(results)
        except Exception:
            self.stats.failure(model.name, model.version, time.perf_counter_ns() - start)
            if self.canary is not None:
                self.canary.record(model, False, (time.perf_counter_ns() - start) / 1e9)
            raise
        done = time.perf_counter_ns()
        if self.shadow is not None:  # after the answer exists; never waits, never raises
            self.shadow.offer(model, feeds, results, run_s)
        if self.canary is not None:
            self.canary.record(model, True, (done - start) / 1e9)
        if self.capture is not None:  # never waits, never raises
            self.capture.offer(model, request_id, feeds, results, (done - start) / 1e9)
        rows = max((a.shape[0] if a.ndim else 1) for a in feeds.values())
        self.stats.success(
            model.name,
            model.version,
            rows,
            total_ns=done - start,
            input_ns=decoded - start,
            infer_ns=ran - decoded,
            output_ns=done - ran,
        )
        return answer

    def statistics(self, name: str | None = None, version: str | None = None) -> dict:
        """Triton's statistics: every model (``name`` None), or one model (and version)."""
        if name is None:
            entries = [s.as_json() for s in self.stats.models.values()]
            served = {
                (m.name, m.version)
                for m in (x.current for x in self.managers.values())
                if m is not None
            }
            entries += [
                self.stats.of(*key).as_json()
                for key in sorted(served)
                if key not in self.stats.models
            ]
            return {"model_stats": entries}
        manager = self.manager(name)
        if version is None:
            versions = sorted(
                {v for (n, v) in self.stats.models if n == name}
                | ({manager.current.version} if manager.current else set()),
                key=int,
            )
        else:
            versions = [version]
        return {"model_stats": self.stats.report(name, versions)}

    # --- health and metadata ---------------------------------------------------------

    def server_metadata(self) -> dict:
        extensions = EXTENSIONS + ([] if self.shared_memory is None else ["system_shared_memory"])
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": extensions}

    def ready(self) -> bool:
        """Every model has been checked once and at least one serves: one that cannot load
        (refused, or not in the registry) does not keep the others from serving."""
        managers = [m for n, m in self.managers.items() if n not in self.unloaded]
        return (
            self.discovered
            and any(m.current is not None for m in managers)
            and all(m.current is not None or m.last_check is not None for m in managers)
        )

    def model_metadata(self, name: str, version: str | None = None) -> dict:
        return self.model(name, version).metadata()

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
            raise (NotFound if outcome.outcome == "registry_error" else Conflict)(
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

    # --- administration --------------------------------------------------------------

    async def reload(self, name: str | None = None) -> CheckOutcome:
        """Check the alias of ``name`` (the default model) now, retrying a refused version."""
        if name is None and self.default_name is None:
            raise NotReady("no model to reload yet")
        return await self.manager(name or self.default_name).check(force=True)

    async def store_feedback(self, name: str, payload) -> int:
        """Ground truth for captured requests of ``name`` (see :mod:`.feedback`)."""
        if self.feedback is None:
            raise Conflict("no capture to join labels to: start the endpoint with --capture DIR")
        from onnxflow.serving.feedback import label_kind, parse_labels

        labels = parse_labels(payload, label_kind(self.model(name).outputs[0]))
        return await asyncio.to_thread(self.feedback.submit, name, labels)

    async def flush_shadow(self) -> list[dict]:
        """Write the shadow's figures onto the shadow versions in the registry now."""
        if self.shadow is None:
            raise Conflict("no shadow: start the endpoint with --shadow ALIAS (e.g. challenger)")
        return await self.shadow.flush()

    def status(self) -> dict:
        """What is served; the default model's state at the top level, every model's under
        ``models``."""
        models = {name: _manager_status(m) for name, m in self.managers.items()}
        default = models.get(
            self.default_name, {"model": None, "serving": None, "refused": {}, "last_check": None}
        )
        return {
            **default,
            "models": models,
            "all_models": self.settings.all_models,
            "pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "heavy_modules_loaded": sorted(
                m for m in HEAVY_MODULES if sys.modules.get(m) is not None
            ),
            "mlflow_loaded": sys.modules.get("mlflow") is not None,
            "shadow": self.shadow.status() if self.shadow is not None else None,
            "canary": self.canary.status() if self.canary is not None else None,
            "capture": self.capture.status() if self.capture is not None else None,
            "uptime_s": time.time() - self.started,
        }


def _manager_status(manager: ModelManager) -> dict:
    model = manager.current
    return {
        "model": manager.reference,
        "serving": None
        if model is None
        else {
            "version": model.version,
            "onnx_sha256": model.digest,
            "loaded_at": model.loaded_at,
            "warm_ms": model.warm_ms,
            "inline": model.inline,
            "batchable": model.batchable,
            "providers": model.providers,
            "folder": str(model.folder),
        },
        "refused": manager.refused,
        "last_check": manager.last_check.as_json() if manager.last_check else None,
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

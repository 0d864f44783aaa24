"""The data plane: the one request path every front takes, and what it shares.

The fronts (:mod:`onnxflow.serving.app` for REST, :mod:`onnxflow.serving.grpc_front`)
parse their protocol and call this: authorize a token, pick the model a request runs on
(from the :class:`~onnxflow.serving.repository.ModelRepository`, or the canary's share),
and answer it with :meth:`DataPlane.run_request`: bind the request to the model
(:func:`onnxflow.serving.inference.bind`), execute the feeds, encode the answer. Nothing
here knows HTTP; failures are the named errors of :mod:`onnxflow.serving.errors`.

With a shadow alias (``--shadow challenger``) every answered request is also offered to
:mod:`onnxflow.serving.shadow`, which mirrors it off the request path.

Each request reads the served model once and keeps it, so a swap never mixes versions
within a request. Fast models run on the event loop (a thread hop costs more than the
run), slow ones in worker threads, or merged by the batcher.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from onnxflow.serving.batching import Batcher
from onnxflow.serving.capture import new_request_id
from onnxflow.serving.comparison import timed_run
from onnxflow.serving.drift import DriftTracker
from onnxflow.serving.errors import (
    BadInput,
    CannotRun,
    Conflict,
    Forbidden,
    RequestError,
    Unauthorized,
)
from onnxflow.serving.inference import BoundRequest, bind
from onnxflow.serving.manager import ModelManager
from onnxflow.serving.metrics import ServingMetrics
from onnxflow.serving.model import LoadedModel
from onnxflow.serving.repository import ModelRepository
from onnxflow.serving.settings import ServingSettings
from onnxflow.serving.shared_memory import SharedMemoryRegistry
from onnxflow.serving.statistics import Statistics

log = logging.getLogger(__name__)

HEAVY_MODULES = ("torch", "tensorflow", "pandas", "sklearn", "jax")
SERVER_NAME = "onnxflow"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "statistics", "model_repository"]


class DataPlane:
    """The repository, token, executor, batcher, statistics, shadow and canary shared by
    the fronts."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        self.repository = ModelRepository(settings, self.metrics, self._follow)
        self.executor = ThreadPoolExecutor(
            settings.inference_threads, thread_name_prefix="onnxruntime"
        )
        self.batcher: Batcher | None = None
        self.token = settings.token.get_secret_value().encode() if settings.token else None
        self.started = time.time()
        self.stats = Statistics()
        self._notes: deque = deque()  # what gRPC threads answered, for the loop to note
        self.drift = DriftTracker()  # versions loaded with a reference profile
        self.metrics.watch_drift(self.drift.snapshots)
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
        """Start the capture, the batcher and the repository's alias watchers (on the
        running loop)."""
        if self.capture is not None:
            await asyncio.to_thread(self.capture.start, asyncio.get_running_loop())
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
        await self.repository.start()

    def _follow(self, manager: ModelManager) -> None:
        if self.shadow is not None:
            self.shadow.follow(manager)
        if self.canary is not None:
            self.canary.follow(manager)

    async def stop(self) -> None:
        await self.repository.stop()
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

    def inference_model(self, name: str | None, version: str | None = None) -> LoadedModel:
        """The version that answers an inference request: the served one, or the canary for
        its share (only when no version is asked for). ``name`` None: the default model."""
        repository = self.repository
        model = repository.default_model() if name is None else repository.model(name, version)
        if self.canary is not None and version is None:
            return self.canary.choose(model)
        return model

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
                limit = self.repository.max_batch_size(model.name)
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

    def check_batch(self, name: str, feeds: dict) -> None:
        limit = self.repository.max_batch_size(name)
        if limit <= 0:
            return
        rows = max((a.shape[0] if a.ndim else 1) for a in feeds.values())
        if rows > limit:
            raise BadInput(
                f"a batch of {rows} rows is over max_batch_size {limit} of model {name!r} "
                "(the config it was loaded with)"
            )

    async def run_request(self, model: LoadedModel, read, encode, request_id=None):
        """One inference request, the one path every front takes (timed for the
        statistics, offered to the shadow, the canary and the capture): ``read()`` gives
        the request, an :class:`InferRequest` (bound to ``model`` here: the V2 rules) or a
        :class:`BoundRequest` already checked (MLflow's format); :meth:`execute` runs its
        feeds; ``encode(model, bound, results)`` gives the answer. ``request_id``: the id
        the front was given beside the body (``X-Request-ID``); when capturing, the
        request is known by it, else by its V2 ``id``, else by a new one
        (``bound.request_id``, which the front returns)."""
        start = time.perf_counter_ns()
        try:
            bound = self._bind(model, read, request_id)
            decoded = time.perf_counter_ns()
            results, run_s = await self.execute(model, bound.feeds)
            ran = time.perf_counter_ns()
            answer = encode(model, bound, results)
        except Exception:
            self._failed(model, start)
            raise
        self._answered(model, bound, results, run_s, (start, decoded, ran, time.perf_counter_ns()))
        return answer

    def runs_here(self, model: LoadedModel) -> bool:
        """Whether a request for ``model`` may be answered in the calling thread
        (:meth:`run_request_here`): it runs inline and no batcher merges its requests."""
        return model.inline and (self.batcher is None or not model.batchable)

    def run_request_here(self, model: LoadedModel, read, encode, loop, request_id=None):
        """:meth:`run_request` in the calling thread (a gRPC thread), for a model that
        :meth:`runs_here`: no hop to the loop and back before the answer; what is noted
        after it (statistics, shadow, canary, capture, drift) is handed to ``loop``, where
        it runs as after any request. A request over the model's inline rows runs here all
        the same: the thread is a worker already."""
        start = time.perf_counter_ns()
        try:
            bound = self._bind(model, read, request_id)
            decoded = time.perf_counter_ns()
            try:
                results, run_s = timed_run(model.run, bound.feeds)
            except Exception as exc:  # noqa: BLE001  (onnxruntime refused this input)
                raise CannotRun(f"the model could not run on this input: {exc}") from None
            ran = time.perf_counter_ns()
            answer = encode(model, bound, results)
        except Exception:
            self._note(loop, self._failed, model, start)
            raise
        times = (start, decoded, ran, time.perf_counter_ns())
        self._note(loop, self._answered, model, bound, results, run_s, times)
        return answer

    def _note(self, loop, record, *args) -> None:
        """Hand ``record(*args)`` to the loop. Notes queue up and the loop is woken once
        for all those that arrive before it drains them: waking it per request cost more
        than the rest of the request. A loop that stopped drops them (the endpoint is
        stopping: no statistics are read any more)."""
        notes = self._notes
        notes.append((record, args))
        if len(notes) == 1:
            try:
                loop.call_soon_threadsafe(self._drain_notes)
            except RuntimeError:
                notes.clear()

    def _drain_notes(self) -> None:
        notes = self._notes
        while notes:
            record, args = notes.popleft()
            record(*args)

    def _bind(self, model: LoadedModel, read, request_id) -> BoundRequest:
        request = read()
        if isinstance(request, BoundRequest):
            bound = request
        else:
            bound = bind(request, model, self.settings.max_body_bytes, self.shared_memory)
        if self.capture is not None:  # the client's id, else a new one the answer carries
            bound.request_id = request_id or bound.id or new_request_id()
        else:
            bound.request_id = request_id
        self.check_batch(model.name, bound.feeds)
        return bound

    def _failed(self, model: LoadedModel, start: int) -> None:
        self.stats.failure(model.name, model.version, time.perf_counter_ns() - start)
        if self.canary is not None:
            self.canary.record(model, False, (time.perf_counter_ns() - start) / 1e9)

    def _answered(self, model, bound, results, run_s, times) -> None:
        """What follows an answer, on the loop: never waits, never raises."""
        start, decoded, ran, done = times
        feeds = bound.feeds
        if self.shadow is not None:  # after the answer exists
            self.shadow.offer(model, feeds, results, run_s)
        if self.canary is not None:
            self.canary.record(model, True, (done - start) / 1e9)
        if self.capture is not None:
            self.capture.offer(model, bound.request_id, feeds, results, (done - start) / 1e9)
        self.drift.observe(model, feeds, results)  # O(rows)
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

    def statistics(self, name: str | None = None, version: str | None = None) -> dict:
        """Triton's statistics: every model (``name`` None), or one model (and version)."""
        if name is None:
            entries = [s.as_json() for s in self.stats.models.values()]
            served = self.repository.served_versions()
            entries += [
                self.stats.of(*key).as_json()
                for key in sorted(served)
                if key not in self.stats.models
            ]
            return {"model_stats": entries}
        manager = self.repository.manager(name)
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

    # --- administration --------------------------------------------------------------

    async def store_feedback(self, name: str, payload) -> int:
        """Ground truth for captured requests of ``name`` (see :mod:`.feedback`)."""
        if self.feedback is None:
            raise Conflict("no capture to join labels to: start the endpoint with --capture DIR")
        from onnxflow.serving.feedback import label_kind, parse_labels

        labels = parse_labels(payload, label_kind(self.repository.model(name).outputs[0]))
        return await asyncio.to_thread(self.feedback.submit, name, labels)

    async def flush_shadow(self) -> list[dict]:
        """Write the shadow's figures onto the shadow versions in the registry now."""
        if self.shadow is None:
            raise Conflict("no shadow: start the endpoint with --shadow ALIAS (e.g. challenger)")
        return await self.shadow.flush()

    def status(self) -> dict:
        """What is served; the default model's state at the top level, every model's under
        ``models``."""
        repository = self.repository
        models = {name: _manager_status(m) for name, m in repository.managers.items()}
        default = models.get(
            repository.default_name,
            {"model": None, "serving": None, "refused": {}, "last_check": None},
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
            "drift": self.drift_status(),
            "uptime_s": time.time() - self.started,
        }

    def drift_status(self) -> dict:
        """Live drift per model and version (those served with a reference profile)."""
        out: dict[str, dict] = {}
        for (name, version), snapshot in sorted(self.drift.snapshots().items()):
            out.setdefault(name, {})[version] = snapshot
        return out


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

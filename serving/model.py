"""One servable model version: verified files, an onnxruntime session, its example.

:func:`load_model` turns a downloaded version folder into a :class:`LoadedModel` or
raises :class:`ModelRefused` naming the check that failed. The checks, in order: the
folder holds an ONNX flavor, external data stays inside the folder, the files hash to
the ``onnx_sha256`` recorded at registration, ``onnx.checker`` accepts the model, a
session can be created, and the model answers its registered input example.
Nothing but ONNX is ever loaded: no pickle, no pyfunc.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxflow.errors import ServingError
from onnxflow.onnxfiles import check_external_data, onnx_digest
from onnxflow.serving.drift import PROFILE_FILE
from onnxflow.serving.errors import RequestError
from onnxflow.serving.mlflow_format import parse_payload
from onnxflow.serving.settings import ServingSettings
from onnxflow.serving.tensors import TensorSpec

log = logging.getLogger(__name__)


class ModelRefused(ServingError):
    """A version failed a check on load; the endpoint keeps serving what it had."""


@dataclass(eq=False)
class LoadedModel:
    """A verified, warmed-up version. Immutable once built; swapped as a whole."""

    name: str
    version: str
    folder: Path
    digest: str
    session: object
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example: dict[str, np.ndarray]
    example_payload: dict
    tags: dict[str, str]
    providers: list[str]
    warm_ms: float
    batchable: bool = False
    inline: bool = True
    loaded_at: float = field(default_factory=time.time)
    profile: dict | None = None  # the version's reference profile, for live drift

    def __post_init__(self) -> None:
        self.input_by_name = {s.name: s for s in self.inputs}
        self.output_by_name = {s.name: s for s in self.outputs}
        self.output_names = [s.name for s in self.outputs]
        # Requests up to this many rows run on the event loop when the model is inline.
        self.inline_rows = 4 * max((a.shape[0] if a.ndim else 1) for a in self.example.values())
        self.version_headers = [
            (b"x-model-name", self.name.encode()),
            (b"x-model-version", self.version.encode()),
        ]
        self._run = self.session.run

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs, in model order."""
        return self._run(self.output_names, feeds)

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [s.as_json() for s in self.inputs],
            "outputs": [s.as_json() for s in self.outputs],
            "parameters": {
                "onnx_sha256": self.digest,
                "providers": self.providers,
                "dynamic_batching": self.batchable,
                "tags": self.tags,
            },
        }


def load_model(
    folder: Path, *, name: str, version: str, tags: dict[str, str], settings: ServingSettings
) -> LoadedModel:
    """Verify, open and warm up the version in ``folder``; raise ModelRefused on any failure."""
    what = f"{name} version {version}"
    try:
        return _load(Path(folder), name=name, version=version, tags=tags, settings=settings)
    except ModelRefused:
        raise
    except Exception as exc:  # any failure to load is a refusal, never a crash
        raise ModelRefused(f"{what}: {type(exc).__name__}: {exc}") from exc


def _load(folder: Path, *, name, version, tags, settings) -> LoadedModel:
    what = f"{name} version {version}"
    mlmodel = _read_mlmodel(folder)
    flavor = (mlmodel.get("flavors") or {}).get("onnx")
    if flavor is None:
        raise ModelRefused(
            f"{what} is not an ONNX model (flavors: {', '.join(mlmodel.get('flavors') or {})}); "
            "the endpoint loads only ONNX"
        )
    model_path = (folder / str(flavor.get("data") or "model.onnx")).resolve()
    if not model_path.is_relative_to(folder.resolve()) or not model_path.is_file():
        raise ModelRefused(f"{what}: ONNX file {flavor.get('data')!r} is not inside its folder")

    check_external_data(model_path)  # refuses data outside the folder before any read
    digest = onnx_digest(model_path)
    expected = tags.get("onnx_sha256")
    if expected is None and settings.require_digest:
        raise ModelRefused(f"{what} has no onnx_sha256 tag; cannot verify its files")
    if expected is not None and expected != digest:
        raise ModelRefused(
            f"{what}: sha256 mismatch: registered {expected}, downloaded files hash to {digest}"
        )

    import onnx

    onnx.checker.check_model(str(model_path))
    session, providers = _session(model_path, settings)
    inputs = tuple(TensorSpec.from_ort(n) for n in session.get_inputs())
    outputs = tuple(TensorSpec.from_ort(n) for n in session.get_outputs())

    payload = _example_payload(folder, mlmodel, inputs)
    try:
        example = parse_payload(payload, inputs)
    except RequestError as exc:
        raise ModelRefused(f"{what}: its input example does not fit the model: {exc}") from None

    names = [s.name for s in outputs]
    try:
        first = session.run(names, example)
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            session.run(names, example)
            timings.append(time.perf_counter() - start)
    except Exception as exc:
        raise ModelRefused(f"{what} failed to answer its input example: {exc}") from None
    warm_ms = sorted(timings)[len(timings) // 2] * 1000

    batchable = settings.batching and _batch_consistent(
        session, names, inputs, outputs, example, first, what
    )
    model = LoadedModel(
        name=name,
        version=version,
        folder=folder,
        digest=digest,
        session=session,
        inputs=inputs,
        outputs=outputs,
        example=example,
        example_payload=payload,
        tags=dict(tags),
        providers=providers,
        warm_ms=warm_ms,
        batchable=batchable,
        inline=warm_ms < settings.inline_run_ms,
        profile=_read_profile(folder, what),
    )
    log.info(
        "%s ready: %s in, %s out, warm run %.3f ms (%s), providers %s%s",
        what,
        [s.as_json() for s in inputs],
        [s.as_json() for s in outputs],
        warm_ms,
        "on the event loop" if model.inline else "in worker threads",
        providers,
        ", dynamic batching" if batchable else "",
    )
    return model


def _read_profile(folder: Path, what: str) -> dict | None:
    """The reference profile fetched beside the files (:data:`PROFILE_FILE`); None when
    the version has none (or it cannot be read: no drift figures, the model still serves)."""
    path = folder / PROFILE_FILE
    if not path.is_file():
        return None
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable reference profile, no drift figures: %s", what, exc)
        return None
    return profile if isinstance(profile, dict) and profile.get("features") else None


def _read_mlmodel(folder: Path) -> dict:
    import yaml

    path = folder / "MLmodel"
    if not path.is_file():
        raise ModelRefused(f"{folder} has no MLmodel file; expected an MLflow model folder")
    return yaml.safe_load(path.read_text()) or {}


def _session(model_path: Path, settings: ServingSettings):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.session_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Pool threads that spin between runs would burn the core the event loop needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if settings.providers == "auto" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(model_path), options, providers=providers)
    return session, session.get_providers()


def _example_payload(folder: Path, mlmodel: dict, inputs: tuple[TensorSpec, ...]) -> dict:
    """The registered input example as an /invocations payload, or a synthesized one."""
    info = mlmodel.get("saved_input_example_info") or {}
    serving = info.get("serving_input_path")
    if serving and (folder / serving).is_file():
        return json.loads((folder / serving).read_text())
    stored = info.get("artifact_path")
    if stored and (folder / stored).is_file():
        content = json.loads((folder / stored).read_text())
        if info.get("type") == "dataframe" or (isinstance(content, dict) and "data" in content):
            return {"dataframe_split": content}
        return {"inputs": content}
    log.info("no saved input example; synthesizing one row from the input shapes")
    return {"inputs": {s.name: _synthetic(s).tolist() for s in inputs}}


def _synthetic(spec: TensorSpec) -> np.ndarray:
    shape = tuple(1 if d == -1 else d for d in spec.shape)
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=spec.dtype)


def _batch_consistent(session, names, inputs, outputs, example, first, what) -> bool:
    """Batching is safe when every batch axis is dynamic and rows don't affect each other."""
    if not all(s.shape and s.shape[0] == -1 for s in (*inputs, *outputs)):
        log.warning(
            "%s: not every input and output has a dynamic first axis; "
            "serving without dynamic batching",
            what,
        )
        return False
    doubled = {k: np.concatenate([v, v]) for k, v in example.items()}
    rows = next(iter(example.values())).shape[0]
    try:
        both = session.run(names, doubled)
    except Exception as exc:
        log.warning("%s: a batch of two examples failed (%s); no dynamic batching", what, exc)
        return False
    for single, pair in zip(first, both):
        if pair.shape[0] != 2 * rows or not _close(pair[rows:], single):
            log.warning(
                "%s: outputs of a merged batch differ from single runs; "
                "serving without dynamic batching",
                what,
            )
            return False
    return True


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True))
    return bool(np.array_equal(a, b))

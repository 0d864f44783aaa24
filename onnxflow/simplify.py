"""simplify: onnxsim, keeping the batch axis dynamic, or the exported model unchanged.

A simplification that fails, fails ``onnx.checker``, loses the dynamic batch axis or the
model's interface, or changes outputs by more than ``check_atol`` on probe batches is not
an error: the exported model goes on unchanged and the reason is recorded. Probes are
seeded random batches: this is simplify's self-check only, real-data parity is validate's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from onnxflow.config import SimplifyConfig
from onnxflow.errors import SimplifyError, UnsafeModelError
from onnxflow.interface import load_graph, read_interface
from onnxflow.onnxfiles import (
    copy_model,
    external_data_locations,
    model_files,
    model_size,
    node_count,
)
from onnxflow.results import SimplifiedModel
from onnxflow.runtime import PROVIDERS, open_session

log = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"
#: Where the simplified model keeps its weights when the exported one used external data.
EXTERNAL_DATA_NAME = MODEL_NAME + ".data"
#: Batch sizes of the probe batches (1 and >1 both exercise the dynamic batch axis).
PROBE_BATCHES = (1, 3, 32)


class _Rejected(Exception):
    """The simplified model is not fit to replace the exported one (the reason is the text)."""


def simplify_model(model_path: Path, config: SimplifyConfig, out_dir: Path) -> SimplifiedModel:
    """Write ``out_dir/model.onnx`` (plus external data if the input had any): simplified
    when onnxsim succeeds and the result checks out, otherwise a copy of the input."""
    model_path = Path(model_path)
    _check_usable(model_path, out_dir)
    nodes_before, bytes_before = node_count(model_path), model_size(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MODEL_NAME
    _remove_stale(target)

    reason = None
    if not config.enabled:
        reason = "simplification disabled in the config"
        log.info("simplify: disabled, copying %s", model_path)
    else:
        try:
            simplified = _run_onnxsim(model_path)
            _save(simplified, target, external=bool(external_data_locations(model_path)))
            _check_simplified(target, model_path)
            diff = _probe_max_diff(model_path, target)
            if not diff <= config.check_atol:
                raise _Rejected(
                    f"outputs changed by {diff:.3g} on probe batches "
                    f"> check_atol {config.check_atol:g}"
                )
        except Exception as exc:  # onnxsim, onnx and onnxruntime raise many types
            message = " ".join(str(exc).split())[:500]  # C++ errors span several lines
            reason = message if isinstance(exc, _Rejected) else f"{type(exc).__name__}: {message}"
            log.warning("simplify: keeping the exported model unchanged: %s", reason)

    if reason is not None:
        _remove_stale(target)
        copy_model(model_path, out_dir, MODEL_NAME)
    nodes_after, bytes_after = node_count(target), model_size(target)
    log.info(
        "simplify: %d -> %d nodes, %d -> %d bytes: %s",
        nodes_before,
        nodes_after,
        bytes_before,
        bytes_after,
        target,
    )
    return SimplifiedModel(
        path=target,
        simplified=reason is None,
        reason=reason,
        nodes_before=nodes_before,
        nodes_after=nodes_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
    )


def _check_usable(model_path: Path, out_dir: Path) -> None:
    """Inputs simplify cannot even copy are the one case it raises for."""
    if not model_path.is_file():
        raise SimplifyError(f"No ONNX model at {model_path}")
    if out_dir.resolve() == model_path.parent.resolve():
        raise SimplifyError(
            f"out_dir {out_dir} is the exported model's own folder; simplify never "
            "overwrites its input: give it a folder of its own."
        )
    try:
        model_files(model_path)  # parses the model and resolves its external data
    except UnsafeModelError as exc:
        raise SimplifyError(str(exc)) from exc
    except Exception as exc:  # protobuf's DecodeError and the like
        raise SimplifyError(f"{model_path} is not a readable ONNX model: {exc}") from exc


def _run_onnxsim(model_path: Path):
    import onnx
    import onnxsim

    model = onnx.load(str(model_path))  # with its external data, from beside it
    # No overwrite_input_shapes: the batch axis stays symbolic. check_n=0 and certify=False:
    # the probe comparison below is our check, with our tolerance, on several batch sizes.
    simplified, check_ok = onnxsim.simplify(
        model, check_n=0, certify=False, providers=list(PROVIDERS)
    )
    if not check_ok:
        raise _Rejected("onnxsim's own check failed")
    return simplified


def _save(model, target: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(
            model,
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_NAME,
        )
    else:
        onnx.save_model(model, str(target))


def _check_simplified(target: Path, original_path: Path) -> None:
    """onnx.checker, strict shape inference, and the same inputs/outputs as the original."""
    import onnx

    onnx.checker.check_model(str(target), full_check=True)
    inferred = onnx.shape_inference.infer_shapes(
        load_graph(target), check_type=True, strict_mode=True
    )
    original, simplified = read_interface(load_graph(original_path)), read_interface(inferred)
    for kind in ("inputs", "outputs"):
        # dimension names are normalised to ``?``: renamed is fine, still dynamic is what counts
        before = [t.with_dynamic_as("?").describe() for t in getattr(original, kind)]
        after = [t.with_dynamic_as("?").describe() for t in getattr(simplified, kind)]
        if before != after:
            raise _Rejected(f"graph {kind} changed from {before} to {after}")


def _probe_max_diff(original_path: Path, simplified_path: Path) -> float:
    """Largest output difference between the two models on seeded random batches."""
    sessions = [open_session(p) for p in (original_path, simplified_path)]
    rng = np.random.default_rng(0)
    largest = 0.0
    for batch in PROBE_BATCHES:
        feeds = {}
        for spec in sessions[0].get_inputs():
            shape = [
                d if isinstance(d, int) else batch if i == 0 else 1
                for i, d in enumerate(spec.shape)
            ]
            feeds[spec.name] = _probe(rng, spec, shape)
        before, after = (s.run(None, feeds) for s in sessions)
        for a, b in zip(before, after, strict=True):
            if a.shape != b.shape:
                raise _Rejected(f"output shape changed from {a.shape} to {b.shape}")
            if not np.array_equal(np.isnan(a), np.isnan(b)):
                raise _Rejected(f"NaN outputs differ at batch {batch}")
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))  # inf where only one is
            largest = max(largest, float(np.nanmax(diff, initial=0.0)))
    return largest


#: Integer probes are 0 or 1: valid token ids for any embedding, and valid mask values.
_PROBE_INTEGERS = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _probe(rng, spec, shape: list[int]) -> np.ndarray:
    """A seeded random batch for one input: floats, small integers (ids, masks) or bools."""
    if spec.type == "tensor(float)":
        return (rng.standard_normal(shape) * 5).astype(np.float32)
    if spec.type in _PROBE_INTEGERS:
        return rng.integers(0, 2, shape).astype(_PROBE_INTEGERS[spec.type])
    if spec.type == "tensor(bool)":
        return rng.integers(0, 2, shape).astype(bool)
    raise _Rejected(
        f"probes are float, int32/int64 or bool batches; input {spec.name!r} is {spec.type}"
    )


def _remove_stale(target: Path) -> None:
    """A previous run's model: onnx appends external data to an existing file."""
    for path in (target, target.with_name(EXTERNAL_DATA_NAME)):
        path.unlink(missing_ok=True)

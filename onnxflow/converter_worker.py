"""The part of ``convert --to tensorflow|tflite`` that runs inside the converter venv.

Run as a script by that venv's Python (onnx2tf pins TensorFlow, numpy and onnx versions
that cannot share onnxflow's environment), never imported by onnxflow itself; it uses
only what the venv holds (onnx2tf, TensorFlow, ai_edge_litert, numpy, onnx)::

    python converter_worker.py MODEL.onnx OUT_DIR FEEDS.npz

It writes ``OUT_DIR/saved_model`` (with ``model_float32.tflite`` beside it), the outputs
of the SavedModel and of the TFLite interpreter on the feeds
(``OUT_DIR/outputs_tf.npz``, ``outputs_tflite.npz``, keyed by ONNX output name), their
latencies at batch 1 and 32, and ``OUT_DIR/worker.json``: what was done, or the error
with the operator onnx2tf stopped at. Parity is judged by onnxflow, not here.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    onnx_path, out_dir, feeds_path = Path(argv[1]), Path(argv[2]), Path(argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"ok": False}
    try:
        _run(onnx_path, out_dir, feeds_path, result)
        result["ok"] = True
    except BaseException as exc:  # onnx2tf calls sys.exit(1) on an unconvertible operator
        result["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}"
        result["traceback"] = traceback.format_exc()[-3000:]
    (out_dir / "worker.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["ok"] else 1


def _run(onnx_path: Path, out_dir: Path, feeds_path: Path, result: dict) -> None:
    import numpy as np
    import onnx

    model = onnx.load(str(onnx_path))
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    outputs = [o.name for o in model.graph.output]
    feeds = dict(np.load(feeds_path, allow_pickle=False))
    saved = out_dir / "saved_model"
    result.update(inputs=inputs, outputs=outputs, saved_model=str(saved))

    import onnx2tf

    # onnx2tf runs onnxsim over its input file in place: it gets a copy, weights inside
    # (onnx.load read any external data) unless they pass protobuf's 2 GB
    work = out_dir / "model.onnx"
    onnx.save(model, str(work), save_as_external_data=model.ByteSize() > 1_800_000_000)
    log = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            onnx2tf.convert(
                input_onnx_file_path=str(work),
                output_folder_path=str(saved),
                # the model's layout kept: onnx2tf would turn NCHW inputs into NHWC
                keep_shape_absolutely_input_names=inputs,
                output_signaturedefs=True,
                copy_onnx_input_output_names_to_tflite=True,
                non_verbose=False,
                verbosity="info",
            )
    except BaseException:
        missing = unsupported_operators(model)
        result["operator"] = ", ".join(missing) if missing else failed_operator(log.getvalue())
        result["log_tail"] = _plain(log.getvalue())[-4000:]
        raise
    result["convert_seconds"] = time.perf_counter() - started
    import tensorflow as tf

    result["versions"] = {"onnx2tf": onnx2tf.__version__, "tensorflow": tf.__version__}
    result["log_tail"] = _plain(log.getvalue())[-2000:]
    tflite = saved / f"{work.stem}_float32.tflite"
    if not (saved / "saved_model.pb").is_file() or not tflite.is_file():
        result["operator"] = failed_operator(log.getvalue())
        raise RuntimeError(f"onnx2tf wrote no SavedModel/TFLite to {saved}")
    result["tflite"] = str(tflite)
    for unchecked in saved.glob("*_float16.tflite"):  # only what is checked is handed out
        unchecked.unlink()

    result["batch"], result["latency_ms"] = {}, {}
    for kind, runner in (
        ("tensorflow", _tf_runner(saved, inputs, outputs)),
        ("tflite", _tflite_runner(tflite, inputs, outputs)),
    ):
        found, result["batch"][kind] = _run_all(runner, feeds)
        np.savez(out_dir / f"outputs_{kind}.npz", **found)
        result["latency_ms"][kind] = _latencies(runner, feeds)


def _run_all(run, feeds):
    """All rows at once; when the converted model holds a batch of 1 (onnx2tf fixes some
    reshapes to the batch of its trial run), one row at a time, and the report says so."""
    import numpy as np

    try:
        return run(feeds), "dynamic"
    except Exception as exc:  # TF raises InvalidArgumentError, TFLite ValueError/RuntimeError
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    rows = min(len(v) for v in feeds.values())
    parts = [run({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(rows)]
    found = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
    return found, f"fixed at 1 row: {rows} rows ran one at a time ({reason})"


def _key(name: str) -> str:
    """onnx2tf's signature names: the ONNX name with characters TF refuses replaced."""
    return re.sub(r"[^0-9a-zA-Z_]", "_", name).lower()


def _match(wanted: list[str], found, what: str) -> dict[str, str]:
    by_key = {_key(f): f for f in found}
    positional = [f"output_{i}" for i in range(len(wanted))]
    if not all(w in found or _key(w) in by_key for w in wanted) and set(found) == set(positional):
        return dict(zip(wanted, positional))  # onnx2tf's names for outputs, in ONNX order
    missing = [w for w in wanted if w not in found and _key(w) not in by_key]
    if missing:
        raise RuntimeError(f"the {what} has no {missing} (it has {sorted(found)})")
    return {w: (w if w in found else by_key[_key(w)]) for w in wanted}


def _tf_runner(saved: Path, inputs: list[str], outputs: list[str]):
    import tensorflow as tf

    signature = tf.saved_model.load(str(saved)).signatures["serving_default"]
    in_names = _match(inputs, signature.structured_input_signature[1], "SavedModel signature")
    out_names = _match(outputs, signature.structured_outputs, "SavedModel signature")

    def run(feeds):
        found = signature(**{in_names[n]: tf.convert_to_tensor(feeds[n]) for n in inputs})
        return {n: found[out_names[n]].numpy() for n in outputs}

    return run


def _tflite_runner(path: Path, inputs: list[str], outputs: list[str]):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner()
    details = runner.get_input_details()
    in_names = _match(inputs, details, "TFLite signature")
    out_names = _match(outputs, runner.get_output_details(), "TFLite signature")

    def run(feeds):
        found = runner(**{in_names[n]: feeds[n] for n in inputs})
        return {n: found[out_names[n]] for n in outputs}

    return run


def _latencies(run, feeds, repeats: int = 20) -> dict[str, float]:
    """Median milliseconds of one call at batch 1 and 32 (the sample's first rows, tiled)."""
    import numpy as np

    figures = {}
    for batch in (1, 32):
        part = {k: np.resize(v, (batch, *v.shape[1:])).astype(v.dtype) for k, v in feeds.items()}
        try:
            run(part)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                run(part)
                times.append(time.perf_counter() - started)
            figures[f"batch_{batch}"] = float(np.median(times) * 1000)
        except Exception as exc:  # a fixed-batch model refuses other batch sizes
            figures[f"batch_{batch}"] = f"not run: {type(exc).__name__}"
    return figures


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


def unsupported_operators(model) -> list[str]:
    """``domain::Op(opset N)`` of each node type onnx2tf has no converter module for."""
    import importlib.util

    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing = []
    for domain, op in sorted({(n.domain or "", n.op_type) for n in model.graph.node}):
        if importlib.util.find_spec(f"onnx2tf.ops.{op}") is None:
            prefix = f"{domain}::" if domain else ""
            missing.append(f"{prefix}{op}(opset {opsets.get(domain, '?')})")
    return missing


def failed_operator(log: str) -> str | None:
    """The ONNX operator onnx2tf was converting when it stopped, from its log."""
    found = re.findall(r"onnx_op_type:\s*(\S+)\s+onnx_op_name:\s*(\S+)", _plain(log))
    if not found:
        return None
    op_type, op_name = found[-1]
    return f"{op_type} (node {op_name})"


if __name__ == "__main__":
    sys.exit(main(sys.argv))

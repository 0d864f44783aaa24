"""The converter environment: onnx2tf in its own venv, run as a subprocess.

onnx2tf 1.29 pins TensorFlow 2.19, numpy 1.26, onnx 1.19 and onnxruntime 1.23, none of
which can share onnxflow's environment (numpy 2, newer onnx and onnxruntime). So it gets
a venv of its own, created once from :data:`PINS` (the set tested here) and reused:

* where: ``$ONNXFLOW_CONVERTER_VENV``, else ``~/.cache/onnxflow/converter-venv``;
* when: ``make converter-env``, or on the first ``onnxflow convert --to tensorflow|tflite``;
* reuse: a stamp inside the venv records the pins; a venv whose stamp differs is rebuilt;
* which Python: ``$ONNXFLOW_CONVERTER_PYTHON``, else the one running onnxflow (3.10-3.12).

onnx2tf itself is installed without its declared dependencies: it lists opencv-python,
onnxoptimizer and simple-onnx-processing-tools, which the conversion never imports
(OpenCV only for the ImageDecoder operator); what it does import is pinned in ``PINS``.
Creating the venv downloads about 1 GB (TensorFlow) and takes 2.5 GB on disk.

``python -m onnxflow.converter_env`` creates (or checks) it and prints where it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from onnxflow.errors import ConversionError

log = logging.getLogger(__name__)

PINS: tuple[str, ...] = (
    "tensorflow==2.19.0",
    "tf-keras==2.19.0",
    "numpy==1.26.4",
    "onnx==1.19.1",
    "onnxruntime==1.23.0",
    "onnx-graphsurgeon==0.5.8",
    "onnxsim==0.4.36",
    "sng4onnx==2.0.1",
    "sne4onnx==2.0.1",
    "ai-edge-litert==2.1.0",
    "protobuf==4.25.5",
    "h5py==3.11.0",
    "ml-dtypes==0.5.1",
    "flatbuffers==25.12.19",
    "psutil==5.9.5",
    "requests==2.32.5",
)
ONNX2TF = "onnx2tf==1.29.24"
"""Installed with ``--no-deps`` after :data:`PINS` (see the module docstring)."""

STAMP = "onnxflow-converter.json"
WORKER = Path(__file__).with_name("converter_worker.py")


def venv_dir() -> Path:
    """Where the converter venv lives (``$ONNXFLOW_CONVERTER_VENV`` moves it)."""
    configured = os.environ.get("ONNXFLOW_CONVERTER_VENV")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "onnxflow" / "converter-venv"


def _python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def _pins_digest() -> str:
    return hashlib.sha256("\n".join((*PINS, ONNX2TF)).encode()).hexdigest()[:16]


def ready(venv: Path | None = None) -> bool:
    """Whether the venv exists with exactly the pinned set (its stamp says so)."""
    venv = venv or venv_dir()
    try:
        stamp = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("pins") == _pins_digest() and _python_of(venv).exists()


def ensure(venv: Path | None = None) -> Path:
    """The converter venv's Python, creating the venv first when it is missing or stale.
    Raises :class:`ConversionError` with one line saying why when it cannot be created."""
    import fcntl

    venv = venv or venv_dir()
    if ready(venv):
        return _python_of(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two converts at once build it once
        if not ready(venv):
            _create(venv)
    return _python_of(venv)


def _create(venv: Path) -> None:
    python = os.environ.get("ONNXFLOW_CONVERTER_PYTHON") or sys.executable
    log.info("creating the converter venv at %s with %s (about 1 GB to download)", venv, python)
    steps = [
        [python, "-m", "venv", "--clear", str(venv)],
        [str(_python_of(venv)), "-m", "pip", "install", "--quiet", *PINS],
        [str(_python_of(venv)), "-m", "pip", "install", "--quiet", "--no-deps", ONNX2TF],
        [str(_python_of(venv)), "-c", "import onnx2tf, ai_edge_litert.interpreter"],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True)
            output, code = done.stderr or done.stdout, done.returncode
        except OSError as exc:  # no such Python, not executable
            output, code = f"{type(exc).__name__}: {exc}", -1
        if code:
            last = [line for line in output.splitlines() if line.strip()]
            reason = last[-1].strip() if last else f"exit status {code}"
            raise ConversionError(
                f"Cannot create the converter venv at {venv} ({' '.join(step[:4])}...): "
                f"{reason[:300]}"
            )
    (venv / STAMP).write_text(
        json.dumps({"pins": _pins_digest(), "packages": [*PINS, ONNX2TF]}, indent=2) + "\n"
    )


def run_worker(onnx_path: Path, out_dir: Path, feeds_path: Path, timeout_s: float = 1800) -> dict:
    """Run :mod:`onnxflow.converter_worker` in the converter venv; its ``worker.json``."""
    python = ensure()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}
    env.pop("PYTHONPATH", None)  # nothing of onnxflow's environment leaks in
    with open(out_dir / "worker.log", "w") as log_file:
        try:
            subprocess.run(
                [str(python), str(WORKER), str(onnx_path), str(out_dir), str(feeds_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ConversionError(
                f"onnx2tf did not finish converting {onnx_path} in {timeout_s:.0f} s "
                f"(log: {out_dir / 'worker.log'})"
            ) from None
    try:
        return json.loads((out_dir / "worker.json").read_text())
    except (OSError, ValueError):
        tail = (out_dir / "worker.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise ConversionError(
            f"the converter process died converting {onnx_path}: {' '.join(tail)[:300]} "
            f"(log: {out_dir / 'worker.log'})"
        ) from None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(ensure())
    except ConversionError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)

"""The files of one ONNX model: ``model.onnx`` plus any external-data files beside it.

Every step that moves a model moves all of its files; the digest recorded at
registration covers all of them, and external-data paths that leave the model's folder
are refused (a model file must not be able to read arbitrary files on load).
Only ``onnx`` is imported here, so the serving process can use this module.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from onnxflow.errors import UnsafeModelError


def external_data_locations(model_path: Path) -> list[str]:
    """The ``location`` of every external-data tensor, as written in the model, in order."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(model_path), load_external_data=False)
    seen: dict[str, None] = {}
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    seen.setdefault(entry.value, None)
    return list(seen)


def check_external_data(model_path: Path) -> list[Path]:
    """Resolve external-data files, refusing any that leave the model's folder or are missing."""
    model_path = Path(model_path)
    folder = model_path.parent.resolve()
    files = []
    for location in external_data_locations(model_path):
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise UnsafeModelError(
                f"{model_path.name}: external data location {location!r} points outside "
                f"the model's folder; refusing to load it."
            )
        if not target.is_file():
            raise UnsafeModelError(
                f"{model_path.name}: external data file {location!r} is missing."
            )
        files.append(target)
    return files


def model_files(model_path: Path) -> list[Path]:
    """``model.onnx`` first, then its external-data files in sorted order."""
    model_path = Path(model_path)
    return [model_path, *sorted(check_external_data(model_path))]


def onnx_digest(model_path: Path) -> str:
    """sha256 over the model file and its external data (names and bytes), hex."""
    digest = hashlib.sha256()
    for path in model_files(model_path):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_size(model_path: Path) -> int:
    """Bytes of the model file and its external data together."""
    return sum(p.stat().st_size for p in model_files(model_path))


def node_count(model_path: Path) -> int:
    """Nodes of the main graph (weights are not loaded)."""
    import onnx

    return len(onnx.load(str(model_path), load_external_data=False).graph.node)


def copy_model(model_path: Path, out_dir: Path, name: str = "model.onnx") -> Path:
    """Copy a model and its external data into ``out_dir``; returns the new model path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(model_path)
    files = model_files(model_path)
    target = out_dir / name
    shutil.copyfile(files[0], target)
    for extra in files[1:]:
        shutil.copyfile(extra, out_dir / extra.relative_to(model_path.parent.resolve()))
    return target

"""convert: an ONNX model (a registry version or a file) back into PyTorch.

    resolve (download, sample) ─► onnx2torch ─► save (torch.export .pt2, else TorchScript)
        ─► reload the saved file ─► parity against onnxruntime ─► report

The saved artefact loads with torch alone, neither onnxflow nor onnx2torch:

* ``model.pt2``: a ``torch.export`` program (``torch.export.load(path).module()``), with a
  dynamic first axis when the ONNX model has one. Preferred.
* ``model.pt``: TorchScript (``torch.jit.load(path)``), traced on the sample when the
  converted module does not export; traced code may hold the sample's batch size, so the
  report says whether another batch size was checked.

Parity is measured on the file as reloaded, not on the live module: that is what a user
gets. The sample is ``--sample`` (``.npz``/CSV/Parquet, as for import-model), else for a
registry version the test split of the bundled digits when the version was trained on
it, else the version's registered input example.

Step logic only (no Prefect). ``onnx2torch`` imports torchvision at import time.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from onnxflow.config import StepConfig
from onnxflow.errors import ConversionError, ModelImportError
from onnxflow.interface import has_dynamic_batch, load_graph
from onnxflow.results import ArtifactFormat, ConvertedModel
from onnxflow.runtime import open_session
from onnxflow.validation.checks import Check, one_line, parity_figures

log = logging.getLogger(__name__)


class ConvertConfig(StepConfig):
    to: Literal["torch", "tensorflow", "tflite"] = Field(
        "torch", description="PyTorch (onnx2torch), or a SavedModel/TFLite file (onnx2tf)."
    )
    atol: float = Field(1e-4, gt=0, description="Max absolute torch-vs-onnxruntime difference.")
    rtol: float = Field(1e-3, gt=0, description="Max relative difference (of values above atol).")
    max_rows: int = Field(512, ge=1, description="Sample rows compared (the first ones).")


# -- the step --------------------------------------------------------------------------


def convert_model(
    model: str | Path, config: ConvertConfig, out_dir: Path, sample: Path | None = None
) -> ConvertedModel:
    """Convert ``model`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or an ``.onnx``
    path) to PyTorch in ``out_dir``, check parity against onnxruntime on the sample, write
    ``report.json``; raise :class:`ConversionError` naming every failed check."""
    if config.to != "torch":
        from onnxflow.convert_tf import convert_to_tensorflow

        return convert_to_tensorflow(model, config, out_dir, sample)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, feeds, sample_name = resolve_source(str(model), out_dir / "source", sample)
    feeds = {k: v[: config.max_rows] for k, v in feeds.items()}
    module = onnx_to_torch(onnx_path)
    saved, artifact_format, fallback = save_torch(module, onnx_path, feeds, out_dir)
    del module  # what is checked from here on is the file, as a user loads it

    session = open_session(onnx_path)
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feeds), strict=True))
    checks: list[Check] = []
    try:
        found = dict(zip(names, run_saved(saved, artifact_format, feeds, names), strict=True))
    except Exception as exc:  # torch raises RuntimeError, TypeError, ... with the reason
        checks.append(
            Check(
                "the saved model runs the sample", False, f"{type(exc).__name__}: {one_line(exc)}"
            )
        )
        found = {}
    more_checks, parity = compare_outputs(found, expected, config, "torch")
    checks += more_checks
    dynamic = False
    rows = min((len(v) for v in feeds.values() if v.ndim), default=1)
    if found and _has_dynamic_batch(onnx_path):
        # another batch size than the sample's: its first row alone, or that row twice
        take = 1 if rows > 1 else 2
        other = {
            k: np.resize(v[:1], (take, *v.shape[1:])).astype(v.dtype) for k, v in feeds.items()
        }
        wanted = session.run(names, other)
        try:
            got = run_saved(saved, artifact_format, other, names)
            dynamic = all(
                np.allclose(f, e, atol=config.atol, rtol=config.rtol) for f, e in zip(got, wanted)
            )
            detail = f"{take} row(s): {'same as onnxruntime' if dynamic else 'differ'}"
        except Exception as exc:  # a traced module can hold the sample's batch size
            detail = (
                f"fixed at {rows} rows: {take} row(s) fail ({type(exc).__name__}); a "
                "TorchScript trace can hold the sample's batch size"
            )
        checks.append(
            Check(
                "batch size other than the sample's",
                dynamic or artifact_format == "torchscript",
                detail,
            )
        )

    for check in checks:
        (log.info if check.passed else log.warning)(
            "\t%s %s", "✓" if check.passed else "✗", check.line
        )
    max_abs = max((p["max_abs"] for p in parity.values()), default=math.nan)
    failures = [c.line for c in checks if not c.passed]
    report = {
        "passed": not failures,
        "failures": failures,
        "checks": [asdict(c) for c in checks],
        "source": str(model),
        "onnx_path": str(onnx_path),
        "path": str(saved),
        "artifact_format": artifact_format,
        "fallback_reason": fallback,
        "dynamic_batch": dynamic,
        "sample": sample_name,
        "rows": rows,
        "parity": parity,
        "tolerances": config.model_dump(),
    }
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if failures:
        raise ConversionError(
            f"{len(failures)} check(s) failed converting {model} to "
            f"PyTorch:\n" + "\n".join(f"  ✗ {f}" for f in failures) + f"\nReport: {report_path}"
        )
    return ConvertedModel(
        source=str(model),
        onnx_path=onnx_path,
        path=saved,
        artifact_format=artifact_format,
        fallback_reason=fallback,
        dynamic_batch=dynamic,
        sample=sample_name,
        rows=rows,
        parity=parity,
        parity_max_abs=max_abs,
        report_path=report_path,
        seconds=time.perf_counter() - started,
    )


def compare_outputs(
    found: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    config: ConvertConfig,
    label: str,
) -> tuple[list[Check], dict[str, dict[str, float]]]:
    """One check per output present in ``found``: shape, then values (float outputs
    against atol/rtol, others exactly); and the parity figures per output."""
    checks: list[Check] = []
    parity: dict[str, dict[str, float]] = {}
    for name, want in expected.items():
        if name not in found:
            continue
        got = np.asarray(found[name])
        if got.shape != want.shape:
            checks.append(
                Check(
                    f"{label} output {name!r} shape",
                    False,
                    f"{label} {list(got.shape)}, onnxruntime {list(want.shape)}",
                )
            )
            continue
        if want.dtype.kind in "fc":
            parity[name] = parity_figures(got, want, config.atol)
            ok = parity[name]["max_abs"] <= config.atol and parity[name]["max_rel"] <= config.rtol
            detail = (
                f"max abs diff {parity[name]['max_abs']:.3g} (atol {config.atol:g}), max rel "
                f"{parity[name]['max_rel']:.3g} (rtol {config.rtol:g})"
            )
        else:
            differ = int(np.sum(got != want))
            parity[name] = {"max_abs": 0.0 if not differ else math.inf, "max_rel": 0.0}
            ok, detail = not differ, f"{want.dtype} values: {differ} of {want.size} differ"
        checks.append(
            Check(
                f"{label} output {name!r}" if label != "torch" else f"output {name!r}", ok, detail
            )
        )
    return checks, parity


# -- source and sample -------------------------------------------------------------------


def resolve_source(
    model: str, out_dir: Path, sample: Path | None
) -> tuple[Path, dict[str, np.ndarray], str]:
    """The ONNX file to convert, the feeds to compare on, and what the feeds are."""
    if model.startswith("models:/"):
        onnx_path, tags, folder = _download(model, out_dir)
        if sample is not None:
            return onnx_path, _sample_feeds(onnx_path, sample), Path(sample).name
        digits = _digits_test_split(onnx_path, tags)
        if digits is not None:
            return onnx_path, digits, "digits test split"
        return onnx_path, _input_example(onnx_path, folder), "registered input example"

    from onnxflow.importing import detect_format

    path = Path(model)
    try:
        found = detect_format(path)
    except ModelImportError as exc:
        raise ConversionError(f"Cannot convert {path}: {exc}") from None
    if found != "onnx":
        raise ConversionError(
            f"{path} is a {found} model, not ONNX: convert takes an .onnx "
            "file or a registry URI (models:/NAME@ALIAS); bring it in with "
            "`onnxflow import-model` first"
        )
    if sample is None:
        raise ConversionError(
            f"{path}: a model file needs --sample FILE (.npz, CSV or "
            "Parquet) to check parity on; a registry URI has its own"
        )
    return path, _sample_feeds(path, sample), Path(sample).name


def _download(uri: str, out_dir: Path) -> tuple[Path, dict[str, str], Path]:
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, _, ref = uri.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if ref:
            mv = client.get_model_version_by_alias(name, ref)
        else:
            name, _, version = name.partition("/")
            mv = client.get_model_version(name, version)
        folder = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(out_dir)
            )
        )
    except MlflowException as exc:
        raise ConversionError(f"Cannot read {uri} from the registry: {exc.message}") from None
    onnx_path = folder / "model.onnx"
    if not onnx_path.is_file():
        raise ConversionError(
            f"{uri} (version {mv.version}) holds no model.onnx: not an "
            "ONNX model registered by onnxflow"
        )
    log.info("converting %s (version %s) from %s", uri, mv.version, onnx_path)
    return onnx_path, dict(mv.tags or {}), folder


def _sample_feeds(onnx_path: Path, sample: Path) -> dict[str, np.ndarray]:
    from onnxflow.importing import sample_feeds

    try:
        return sample_feeds(onnx_path, sample)
    except ModelImportError as exc:
        raise ConversionError(str(exc)) from None


def _digits_test_split(onnx_path: Path, tags: Mapping[str, str]) -> dict[str, np.ndarray] | None:
    """The bundled digits' test split when the version was trained on that very table."""
    if tags.get("dataset_name") != "digits":
        return None
    import tempfile

    from onnxflow.config import DataConfig
    from onnxflow.data import load_splits, prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        dataset = prepare_data(DataConfig(), Path(tmp))
        if dataset.info.digest != tags.get("dataset_digest"):
            return None
        X = load_splits(dataset)["X_test"]
    name = open_session(onnx_path).get_inputs()[0].name
    return {name: X}


def _input_example(onnx_path: Path, folder: Path) -> dict[str, np.ndarray]:
    from mlflow.models import Model

    from onnxflow.importing import bind_sample

    example = Model.load(str(folder)).load_input_example(str(folder))
    if example is None:
        raise ConversionError(f"{folder} has no input example: give --sample FILE")
    arrays = example if isinstance(example, Mapping) else {"": example}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    try:
        return bind_sample(arrays, open_session(onnx_path).get_inputs(), "input example")
    except ModelImportError as exc:
        raise ConversionError(str(exc)) from None


# -- conversion --------------------------------------------------------------------------


def onnx_to_torch(onnx_path: Path):
    """An ``fx.GraphModule`` equal to the ONNX model; ConversionError naming every operator
    onnx2torch cannot convert."""
    import onnx
    from onnx2torch import convert

    proto = onnx.load(str(onnx_path))
    unsupported = unsupported_operators(proto)
    if unsupported:
        raise ConversionError(
            f"{onnx_path}: onnx2torch has no converter for {', '.join(unsupported)}; "
            "such a model (e.g. a scikit-learn pipeline's ai.onnx.ml operators) stays ONNX"
        )
    _drop_redundant_allowzero(proto)
    try:
        module = convert(proto).eval()
    except Exception as exc:  # onnx2torch raises NotImplementedError, ValueError, ...
        raise ConversionError(
            f"onnx2torch could not convert {onnx_path}: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        ) from exc
    _freeze_constant_reshapes(module)
    return module


def unsupported_operators(proto) -> list[str]:
    """``domain::Op(opset)`` of each node type onnx2torch has no converter for."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in proto.opset_import}
    missing = []
    for domain, op in sorted({(n.domain or "", n.op_type) for n in proto.graph.node}):
        version = opsets.get(domain, opsets.get("ai.onnx", 0))
        try:
            get_converter(op, version, domain)
        except NotImplementedError:
            missing.append(f"{domain + '::' if domain else ''}{op}(opset {version})")
    return missing


def _drop_redundant_allowzero(proto) -> None:
    """Reshape's ``allowzero=1`` (torch's exporter sets it) only matters when the target
    shape holds a 0; with a constant shape without one it is dropped, as onnx2torch refuses
    it. ``proto`` is the in-memory copy; the file is untouched."""
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape = constants.get(node.input[1])
        if shape is None or np.any(shape == 0):
            continue
        for attribute in list(node.attribute):
            if attribute.name == "allowzero":
                node.attribute.remove(attribute)


def _freeze_constant_reshapes(module) -> None:
    """onnx2torch's Reshape reads its target shape as a tensor at run time (``if
    torch.any(shape == 0)``), which torch.export cannot trace; a constant shape becomes
    Python ints in the module instead."""
    import torch
    from onnx2torch.node_converters.reshape import OnnxReshape

    class ConstantReshape(torch.nn.Module):
        def __init__(self, shape: list[int]) -> None:
            super().__init__()
            self.shape = [int(d) for d in shape]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # ONNX Reshape (allowzero=0): a 0 copies that dimension of the input
            return torch.reshape(x, [x.shape[i] if d == 0 else d for i, d in enumerate(self.shape)])

    changed = False
    for node in list(module.graph.nodes):
        if node.op != "call_module" or not isinstance(
            module.get_submodule(node.target), OnnxReshape
        ):
            continue
        shape_node = node.args[1] if len(node.args) > 1 else None
        if getattr(shape_node, "op", None) != "get_attr":
            continue
        shape = module
        for part in shape_node.target.split("."):
            shape = getattr(shape, part)
        module.add_submodule(node.target, ConstantReshape(shape.tolist()))
        node.args = (node.args[0],)
        changed = True
    if changed:
        module.graph.eliminate_dead_code()
        module.recompile()


def save_torch(
    module, onnx_path: Path, feeds: Mapping[str, np.ndarray], out_dir: Path
) -> tuple[Path, ArtifactFormat, str | None]:
    """``model.pt2`` (torch.export, dynamic first axis when the ONNX model has one), else
    ``model.pt`` (TorchScript traced on the sample)."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())
    target = out_dir / "model.pt2"
    try:
        dynamic = None
        if _has_dynamic_batch(onnx_path):
            batch = torch.export.Dim("batch", min=1)
            dynamic = tuple({0: batch} for _ in args)
            # torch.export specialises a size-1 axis to a constant: trace on two rows
            args = tuple(a if len(a) > 1 else a.repeat(2, *[1] * (a.ndim - 1)) for a in args)
        program = torch.export.export(module, args, dynamic_shapes=dynamic)
        torch.export.save(program, str(target))
        return target, "torch_export", None
    except Exception as exc:  # torch.export raises many types (guards, unsupported ops)
        reason = f"torch.export: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        log.warning("%s; saving TorchScript (traced on the sample) instead", reason)
    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())
    target = out_dir / "model.pt"
    try:
        with torch.no_grad():
            traced = torch.jit.trace(module, args, check_trace=False)
        torch.jit.save(traced, str(target))
    except Exception as exc:  # tracing fails on data-dependent Python control flow
        raise ConversionError(
            f"Neither torch.export nor TorchScript can save the converted {onnx_path}: "
            f"{reason}; torch.jit.trace: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from exc
    return target, "torchscript", reason


def run_saved(
    path: Path, artifact_format: ArtifactFormat, feeds: Mapping[str, np.ndarray], names: list[str]
) -> list[np.ndarray]:
    """Load the saved file as a user would and run it on ``feeds`` (ONNX input order)."""
    import torch

    module = (
        torch.export.load(str(path)).module()
        if artifact_format == "torch_export"
        else torch.jit.load(str(path))
    )
    args = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
    with torch.no_grad():
        result = module(*args)
    result = list(result) if isinstance(result, tuple | list) else [result]
    if len(result) != len(names):
        raise ConversionError(
            f"the saved model gives {len(result)} outputs, the ONNX model {len(names)} ({names})"
        )
    return [r.detach().numpy() for r in result]


def _has_dynamic_batch(onnx_path: Path) -> bool:
    return has_dynamic_batch(load_graph(onnx_path))

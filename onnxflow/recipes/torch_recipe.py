"""A recipe's PyTorch model: check it against the data, train it, save and export it.

Training runs on CUDA when allowed and present; the saved ``model.pt2`` (a
``torch.export`` program with a dynamic batch axis on every input, softmax on top) is made
from a CPU copy, so export and the parity reference run on CPU (TF32 convolutions on a GPU
differ from onnxruntime by ~2e-3).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from onnxflow.arrays import LABEL, ArrayDatasetInfo, NamedArrays
from onnxflow.config import TrainConfig
from onnxflow.errors import RecipeError, TrainingError
from onnxflow.interface import output_name
from onnxflow.recipes import expected_output

log = logging.getLogger(__name__)

BATCH_AXIS = "batch"
EXPORTER = "torch.onnx.export(dynamo=True)"  # frameworks.torch_onnx.DYNAMO_EXPORTER
_EVAL_BATCH = 256


def resolve_device(requested: str) -> str:
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise TrainingError(
            "train.device is cuda but torch sees no CUDA device "
            f"(torch {torch.__version__}); use auto or cpu"
        )
    return "cuda" if requested in ("auto", "cuda") and available else "cpu"


def bind_inputs(model, info: ArrayDatasetInfo, ref: str) -> None:
    """The data's inputs go to ``forward()`` by parameter name (a one-input model takes its
    one array whatever the parameter's name); RecipeError naming both sides otherwise."""
    import inspect

    names = info.input_names
    if len(names) == 1:
        return
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
    ]
    if sorted(named) != sorted(names):
        raise RecipeError(
            f"{ref}: build_model(info) returned a model whose forward() takes "
            f"({', '.join(named) or '*args'}), but the data's inputs are ({', '.join(names)}): "
            "name forward()'s parameters after the data's inputs (they are passed by name)"
        )


def call_net(model, tensors: Mapping[str, object]):
    """The recipe's model on named tensors: by parameter name, or the one tensor."""
    if len(tensors) == 1:
        return model(next(iter(tensors.values())))
    return model(**tensors)


def forward(model, inputs: Mapping[str, np.ndarray], names: tuple[str, ...], device: str = "cpu"):
    """The recipe's model on numpy arrays (by name), on ``device``."""
    import torch

    return call_net(
        model, {n: torch.from_numpy(np.ascontiguousarray(inputs[n])).to(device) for n in names}
    )


def check_output(model, data: NamedArrays, info: ArrayDatasetInfo, ref: str) -> None:
    """Two training rows through the untrained model: its output must be [2, n_classes]."""
    import torch

    bind_inputs(model, info, ref)
    rows = {n: data.train[n][:2] for n in info.input_names}
    model.eval()
    try:
        with torch.no_grad():
            out = forward(model, rows, info.input_names)
    except Exception as exc:
        raise RecipeError(
            f"{ref}: the model from build_model(info) fails on two training rows "
            f"({_describe(rows)}): {type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, info.n_outputs):
        found = (
            f"{type(out).__name__}"
            if not isinstance(out, torch.Tensor)
            else f"shape {list(out.shape)}"
        )
        raise RecipeError(
            f"{ref}: the model from build_model(info) returns {found} for 2 rows; "
            f"expected {expected_output(info)}"
        )


def fit(
    model,
    data: NamedArrays,
    info: ArrayDatasetInfo,
    config: TrainConfig,
    device: str,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, float]:
    """Adam on cross-entropy (classification) or mean squared error (regression), seeded
    mini-batches; validation loss and accuracy (or RMSE) per epoch.

    One of several data-parallel workers (:mod:`onnxflow.distributed`): ``model`` is
    already in DistributedDataParallel, each worker steps through its share of the rows,
    and the epoch's train loss is summed over the workers."""
    import torch

    from onnxflow import distributed

    names = info.input_names
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = _loss(info)
    inputs = {n: torch.from_numpy(np.ascontiguousarray(data.train[n])) for n in names}
    labels = _targets(data.train[LABEL], info)
    generator = torch.Generator().manual_seed(config.seed)
    n = len(labels)
    sampler = distributed.row_sampler(n, seed=config.seed)
    metrics: dict[str, float] = {}
    for epoch in range(1, config.epochs + 1):
        model.train()
        if sampler is None:
            order = torch.randperm(n, generator=generator)
        else:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
        total, started = 0.0, time.perf_counter()
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            optimizer.zero_grad()
            out = call_net(model, {k: inputs[k][rows].to(device) for k in names})
            loss = loss_fn(out, labels[rows].to(device))
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        total, seen = distributed.sum_across([total, len(order)])
        val_loss, val_score = evaluate(distributed.unwrap(model), data.validation, info, device)
        metrics = {"train_loss": total / seen, "val_loss": val_loss, _score_name(info): val_score}
        if not np.isfinite(list(metrics.values())).all():
            raise TrainingError(
                f"training diverged at epoch {epoch}: {metrics}; try a lower "
                f"learning_rate than {config.learning_rate}"
            )
        metrics["epoch_seconds"] = time.perf_counter() - started
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return metrics


def evaluate(
    model, split: Mapping[str, np.ndarray], info: ArrayDatasetInfo, device: str
) -> tuple[float, float]:
    """Mean loss of ``model`` (eval mode) on one split, and its accuracy (classification)
    or RMSE (regression)."""
    import torch

    model.eval()
    names, labels = info.input_names, split[LABEL]
    loss_fn = _loss(info, reduction="sum")
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(labels), _EVAL_BATCH):
            rows = {n: split[n][start : start + _EVAL_BATCH] for n in names}
            y = _targets(labels[start : start + _EVAL_BATCH], info).to(device)
            out = forward(model, rows, names, device)
            total += loss_fn(out, y).item()
            if info.task == "classification":
                correct += int((out.argmax(dim=1) == y).sum().item())
    mean = total / len(labels)
    return mean, correct / len(labels) if info.task == "classification" else float(np.sqrt(mean))


def _loss(info: ArrayDatasetInfo, reduction: str = "mean"):
    import torch

    if info.task == "regression":
        return torch.nn.MSELoss(reduction=reduction)
    return torch.nn.CrossEntropyLoss(reduction=reduction)


def _targets(labels: np.ndarray, info: ArrayDatasetInfo):
    """Class indices (long), or float targets shaped [n, 1] like the model's output."""
    import torch

    if info.task == "regression":
        return torch.from_numpy(labels.astype(np.float32).reshape(-1, 1))
    return torch.from_numpy(labels).long()


def _score_name(info: ArrayDatasetInfo) -> str:
    return "val_accuracy" if info.task == "classification" else "val_rmse"


def inference_program(model, info: ArrayDatasetInfo, sample: Mapping[str, np.ndarray]):
    """``torch.export`` of a CPU copy of the model with softmax on top, dynamic batch on
    every input; RecipeError with torch's own message when it cannot be exported."""
    import copy

    import torch

    names, classification = info.input_names, info.task == "classification"

    class Probabilities(torch.nn.Module):
        """Positional inputs in the data's order (the ONNX inputs' order), passed on to
        the recipe's model by name."""

        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, *inputs):
            out = call_net(self.net, dict(zip(names, inputs, strict=True)))
            return torch.softmax(out, dim=-1) if classification else out

    cpu = copy.deepcopy(model).cpu().eval()
    cpu.requires_grad_(False)
    wrapped = Probabilities(cpu).eval()
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    # a sample batch of 2: torch.export specialises sizes 0 and 1
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[n][:2])) for n in info.input_names)
    shapes = ({0: batch} for _ in args)
    try:
        return torch.export.export(wrapped, args, dynamic_shapes=(tuple(shapes),))
    except Exception as exc:  # torch.export raises many types (Unsupported, UserError...)
        raise RecipeError(
            f"torch.export cannot capture the model: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:800]}"
        ) from exc


def owns(model) -> bool:
    """Whether ``model`` is a ``torch.nn.Module`` (without importing torch when no recipe
    has)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def device_scope(device: str):
    """Torch places by ``to_device``; nothing to enter."""
    import contextlib

    return contextlib.nullcontext()


def to_device(model, device: str):
    return model.to(device)


def check_exportable(model, info: ArrayDatasetInfo, data: NamedArrays, ref: str, when: str) -> None:
    """torch.export problems show before any training (``when``: which model it is)."""
    try:
        inference_program(model, info, data.train)
    except RecipeError as exc:
        raise RecipeError(f"{ref}: {when} cannot be exported: {exc}") from exc


def save(model, info: ArrayDatasetInfo, data: NamedArrays, out_dir: Path, ref: str) -> Path:
    """``model.pt2``: the ``torch.export`` program of a CPU copy (see
    :func:`inference_program`)."""
    import torch

    try:
        program = inference_program(model, info, data.train)
    except RecipeError as exc:
        raise RecipeError(f"{ref}: the trained model cannot be exported: {exc}") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pt2"
    torch.export.save(program, path)
    return path


def export(model_path: Path, info: ArrayDatasetInfo, opset: int, target: Path) -> None:
    """``model.pt2`` -> ``target`` (weights in ``target.data``), inputs named as the data's."""
    import torch

    from onnxflow.frameworks.torch_onnx import export_program

    program = torch.export.load(str(model_path))
    export_program(
        program,
        target,
        input_names=info.input_names,
        output_names=[output_name(info.task)],
        opset=opset,
    )


def reference(
    model_path: Path, names: tuple[str, ...]
) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    """The saved program on CPU as a function of the ONNX feeds -> [probabilities]."""
    import torch

    module = torch.export.load(str(model_path)).module()

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        parts = []
        with torch.inference_mode():
            for start in range(0, n, _EVAL_BATCH):
                part = {k: v[start : start + _EVAL_BATCH] for k, v in feeds.items()}
                args = (torch.from_numpy(np.ascontiguousarray(part[k])) for k in names)
                parts.append(module(*args).numpy())
        return [np.concatenate(parts)]

    return run


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _describe(rows: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in rows.items())

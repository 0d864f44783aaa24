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

log = logging.getLogger(__name__)

BATCH_AXIS = "batch"
OUTPUT_NAME = "probabilities"
EXPORTER = "torch.onnx.export(dynamo=True)"
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


def forward(model, inputs: Mapping[str, np.ndarray], names: tuple[str, ...], device: str = "cpu"):
    import torch

    return model(*(torch.from_numpy(np.ascontiguousarray(inputs[n])).to(device) for n in names))


def check_output(model, data: NamedArrays, info: ArrayDatasetInfo, ref: str) -> None:
    """Two training rows through the untrained model: its output must be [2, n_classes]."""
    import torch

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
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, info.n_classes):
        found = (
            f"{type(out).__name__}"
            if not isinstance(out, torch.Tensor)
            else f"shape {list(out.shape)}"
        )
        raise RecipeError(
            f"{ref}: the model from build_model(info) returns {found} for 2 rows; "
            f"expected class scores of shape [2, {info.n_classes}] "
            f"({info.n_classes} classes: {', '.join(info.class_names[:10])})"
        )


def fit(
    model,
    data: NamedArrays,
    info: ArrayDatasetInfo,
    config: TrainConfig,
    device: str,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, float]:
    """Adam on cross-entropy, seeded mini-batches; validation loss and accuracy per epoch."""
    import torch

    names = info.input_names
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = torch.nn.CrossEntropyLoss()
    inputs = {n: torch.from_numpy(np.ascontiguousarray(data.train[n])) for n in names}
    labels = torch.from_numpy(data.train[LABEL]).long()
    generator = torch.Generator().manual_seed(config.seed)
    n = len(labels)
    metrics: dict[str, float] = {}
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator)
        total, started = 0.0, time.perf_counter()
        for start in range(0, n, config.batch_size):
            rows = order[start : start + config.batch_size]
            optimizer.zero_grad()
            out = model(*(inputs[k][rows].to(device) for k in names))
            loss = loss_fn(out, labels[rows].to(device))
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        val_loss, val_accuracy = evaluate(model, data.validation, names, device)
        metrics = {"train_loss": total / n, "val_loss": val_loss, "val_accuracy": val_accuracy}
        if not np.isfinite(list(metrics.values())).all():
            raise TrainingError(
                f"training diverged at epoch {epoch}: {metrics}; try a lower "
                f"learning_rate than {config.learning_rate}"
            )
        log.info(
            "recipe epoch %d/%d (%.1f s): %s",
            epoch,
            config.epochs,
            time.perf_counter() - started,
            " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return metrics


def evaluate(
    model, split: Mapping[str, np.ndarray], names: tuple[str, ...], device: str
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on one split."""
    import torch

    model.eval()
    labels = split[LABEL]
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(labels), _EVAL_BATCH):
            rows = {n: split[n][start : start + _EVAL_BATCH] for n in names}
            y = torch.from_numpy(labels[start : start + _EVAL_BATCH]).long().to(device)
            out = forward(model, rows, names, device)
            total += torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
            correct += int((out.argmax(dim=1) == y).sum().item())
    return total / len(labels), correct / len(labels)


def inference_program(model, info: ArrayDatasetInfo, sample: Mapping[str, np.ndarray]):
    """``torch.export`` of a CPU copy of the model with softmax on top, dynamic batch on
    every input; RecipeError with torch's own message when it cannot be exported."""
    import copy

    import torch

    class Probabilities(torch.nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, *inputs):
            return torch.softmax(self.net(*inputs), dim=-1)

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


def save(program, out_dir: Path) -> Path:
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pt2"
    torch.export.save(program, path)
    return path


def export(model_path: Path, info: ArrayDatasetInfo, opset: int, target: Path) -> None:
    """``model.pt2`` -> ``target`` (weights in ``target.data``), inputs named as the data's."""
    import torch

    program = torch.export.load(str(model_path))
    for stale in (target, target.with_name(target.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx_program = torch.onnx.export(
        program,
        (),
        None,
        dynamo=True,
        input_names=list(info.input_names),
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        verbose=False,
    )
    onnx_program.save(str(target), external_data=True)


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
                parts.append(forward(module, part, names).numpy())
        return [np.concatenate(parts)]

    return run


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _describe(rows: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in rows.items())

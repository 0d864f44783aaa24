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

from onnxflow.arrays import ArrayDatasetInfo
from onnxflow.config import TrainConfig
from onnxflow.errors import RecipeError, TrainingError
from onnxflow.interface import output_name
from onnxflow.recipes import expected_output
from onnxflow.streaming import StreamedSplits, TrainingData, head, split_reader

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


def check_output(model, data: TrainingData, info: ArrayDatasetInfo, ref: str) -> None:
    """Two training rows through the untrained model: its output must be [2, n_classes]."""
    import torch

    bind_inputs(model, info, ref)
    rows = head(data, "train", 2, info.input_names)
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


def autocast_dtype(precision: str, device: str):
    """The dtype ``train.precision`` autocasts to on ``device`` (None: fp32); TrainingError
    for a precision the device cannot train in."""
    import torch

    if precision == "fp32":
        return None
    if precision == "fp16" and device != "cuda":
        raise TrainingError(
            "train.precision fp16 needs a CUDA device (fp16 autocast with a gradient "
            f"scaler); training here is on {device}: use bf16 or fp32"
        )
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(
            f"train.precision bf16: {torch.cuda.get_device_name()} does not support bfloat16; "
            "use fp16 or fp32"
        )
    return torch.bfloat16 if precision == "bf16" else torch.float16


def fit(
    model,
    data: TrainingData,
    info: ArrayDatasetInfo,
    config: TrainConfig,
    device: str,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, float]:
    """Adam on cross-entropy (classification) or mean squared error (regression), batches
    shuffled per epoch with the seed; validation loss and accuracy (or RMSE) per epoch.

    Batches come from :func:`~onnxflow.recipes.torch_data.make_loader` (streamed data: by
    ``train.loader_workers`` processes, pinned when on CUDA, copied without blocking);
    ``train.precision`` autocasts the forward pass; the loss is summed on the device and
    read once per epoch (no per-step synchronisation).

    One of several data-parallel workers (:mod:`onnxflow.distributed`): ``model`` is
    already in DistributedDataParallel, each worker reads its share of the training rows
    (a ``DistributedSampler``; an iterable dataset is read whole by every worker), and the
    epoch's train loss is summed over the workers."""
    import torch

    from onnxflow import distributed
    from onnxflow.recipes.torch_data import IterableRows, make_loader, set_epoch

    names = info.input_names
    amp = autocast_dtype(config.precision, device)
    cuda = device == "cuda"
    streamed = isinstance(data, StreamedSplits)
    workers = config.loader_workers if streamed else 0
    # streamed: validation batches as small as training's (memory: batch x workers)
    eval_batch = config.batch_size if streamed else _EVAL_BATCH
    train_rows = torch_split(data, "train", names, config.batch_size)
    sampler = (
        None
        if isinstance(train_rows, IterableRows)
        else distributed.row_sampler(len(train_rows), seed=config.seed)
    )
    train = make_loader(
        train_rows,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        workers=workers,
        pin_memory=cuda,
        sampler=sampler,
    )
    validation = make_loader(
        torch_split(data, "validation", names, eval_batch),
        eval_batch,
        shuffle=False,
        seed=config.seed,
        workers=workers,
        pin_memory=cuda,
    )
    layout = _memory_format(info, device)
    model.to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    loss_fn = _loss(info)
    metrics: dict[str, float] = {}
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        set_epoch(train, epoch)
        model.train()
        total, rows = torch.zeros((), device=device), 0
        for inputs, labels in train:
            x = _on_device(inputs, device, layout)
            y = _targets(labels, info).to(device, non_blocking=True)
            with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
                out = call_net(model, x)
            loss = loss_fn(out.float(), y)
            optimizer_step(loss, optimizer, scaler)
            total += loss.detach() * len(labels)
            rows += len(labels)
        # the epoch's one wait for the device, then the sum over data-parallel workers
        total_loss, seen = distributed.sum_across([total.item(), rows])
        train_loss = total_loss / max(seen, 1)
        train_seconds = time.perf_counter() - started
        val_loss, val_score = evaluate_batches(
            distributed.unwrap(model), validation, info, device, amp, layout
        )
        metrics = {"train_loss": train_loss, "val_loss": val_loss, _score_name(info): val_score}
        if not np.isfinite(list(metrics.values())).all():
            raise TrainingError(
                f"training diverged at epoch {epoch}: {metrics}; try a lower "
                f"learning_rate than {config.learning_rate}"
            )
        metrics["epoch_seconds"] = time.perf_counter() - started
        metrics["train_samples_per_second"] = rows / train_seconds
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    model.to(memory_format=torch.contiguous_format)
    return metrics


def optimizer_step(loss, optimizer, scaler=None) -> None:
    """Backward and step; through the gradient scaler with fp16 (``scaler`` not None)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def evaluate_batches(model, loader, info: ArrayDatasetInfo, device: str, amp=None, layout=None):
    """Mean loss of ``model`` (eval mode) over a loader's batches, and its accuracy
    (classification) or RMSE (regression); summed on the device, read once."""
    import torch

    model.eval()
    loss_fn = _loss(info, reduction="sum")
    total = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    rows = 0
    with torch.no_grad():
        for inputs, labels in loader:
            y = _targets(labels, info).to(device, non_blocking=True)
            with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
                out = call_net(model, _on_device(inputs, device, layout))
            out = out.float()
            total += loss_fn(out, y)
            if info.task == "classification":
                correct += (out.argmax(dim=1) == y).sum()
            rows += len(labels)
    mean = total.item() / max(rows, 1)
    if info.task == "classification":
        return mean, correct.item() / max(rows, 1)
    return mean, float(np.sqrt(mean))


def _on_device(inputs, device: str, layout=None) -> dict:
    """The batch on ``device`` (non-blocking from pinned memory); 4-D float inputs in
    ``layout`` (channels_last on CUDA)."""

    moved = {}
    for name, tensor in inputs.items():
        tensor = tensor.to(device, non_blocking=True)
        if layout is not None and tensor.dim() == 4 and tensor.is_floating_point():
            tensor = tensor.contiguous(memory_format=layout)
        moved[name] = tensor
    return moved


def torch_split(data: TrainingData, split: str, names: tuple[str, ...], batch_size: int):
    """One split of the data as the torch dataset :func:`make_loader` reads."""
    from onnxflow.recipes.torch_data import split_dataset

    return split_dataset(split_reader(data, split), names, batch_size)


def _memory_format(info: ArrayDatasetInfo, device: str):
    """channels_last for image models on CUDA (tensor cores read NHWC), else contiguous."""
    import torch

    images = any(len(s.shape) == 3 and s.dtype.startswith("float") for s in info.inputs)
    return torch.channels_last if device == "cuda" and images else torch.contiguous_format


def _loss(info: ArrayDatasetInfo, reduction: str = "mean"):
    import torch

    if info.task == "regression":
        return torch.nn.MSELoss(reduction=reduction)
    return torch.nn.CrossEntropyLoss(reduction=reduction)


def _targets(labels, info: ArrayDatasetInfo):
    """Class indices (long), or float targets shaped [n, 1] like the model's output."""
    import torch

    labels = torch.as_tensor(labels)
    if info.task == "regression":
        return labels.float().reshape(-1, 1)
    return labels.long()


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


def check_exportable(
    model, info: ArrayDatasetInfo, data: TrainingData, ref: str, when: str
) -> None:
    """torch.export problems show before any training (``when``: which model it is)."""
    try:
        inference_program(model, info, head(data, "train", 2, info.input_names))
    except RecipeError as exc:
        raise RecipeError(f"{ref}: {when} cannot be exported: {exc}") from exc


def save(model, info: ArrayDatasetInfo, data: TrainingData, out_dir: Path, ref: str) -> Path:
    """``model.pt2``: the ``torch.export`` program of a CPU copy (see
    :func:`inference_program`)."""
    import torch

    try:
        program = inference_program(model, info, head(data, "train", 2, info.input_names))
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

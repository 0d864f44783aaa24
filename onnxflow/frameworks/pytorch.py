"""PyTorch adapter: train an MLP or a small CNN, save it as a ``torch.export`` program,
export it to ONNX.

The trained model is ``model.pt2`` (``torch.export.save``), not a state_dict: it loads with
``torch.export.load`` alone, without this module's code or a class definition, it already
holds the dynamic batch axis, and it is exactly what the dynamo ONNX exporter consumes.
The standardisation is folded into its first layer and the softmax (or the target
de-standardisation) into its last, so it takes raw features like the ONNX model does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from onnxflow.config import ExportConfig, TrainConfig
from onnxflow.errors import ExportError, TrainingError
from onnxflow.frameworks import (
    EpochCallback,
    Predictor,
    check_exported_model,
    fold_standardization,
    format_metrics,
    image_side,
    standardized_splits,
    trained_model,
)
from onnxflow.frameworks.torch_onnx import DYNAMO_EXPORTER, export_program, remove_stale
from onnxflow.interface import BATCH_AXIS, INPUT_NAME, output_name
from onnxflow.results import DatasetArtifact, DatasetInfo, ExportedModel, TrainedModel

log = logging.getLogger(__name__)

LEGACY_EXPORTER = "torch.onnx.export(dynamo=False)"


def train(
    dataset: DatasetArtifact,
    config: TrainConfig,
    out_dir: Path,
    on_epoch: EpochCallback | None = None,
) -> TrainedModel:
    """Train an MLP or a CNN (``config.model``) with Adam; write ``out_dir/model.pt2`` (raw
    features in, probabilities or predictions out). ``on_epoch(epoch, metrics)`` is called
    after each epoch (1-based)."""
    import torch

    info = dataset.info
    side = image_side(info.n_features, TrainingError) if config.model == "cnn" else 0
    X_train, y_train, X_val, y_val = standardized_splits(dataset)
    started = time.perf_counter()
    with _deterministic(config.seed):
        if config.model == "cnn":
            net = _cnn(side, config.hidden_sizes, info.n_outputs)
        else:
            net = _mlp(info.n_features, config.hidden_sizes, info.n_outputs)
        metrics = _fit(net, X_train, y_train, X_val, y_val, info, config, on_epoch)
    inference = _cnn_inference_module(net, info) if side else _inference_module(net, info)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pt2"
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    # a sample batch of 2: torch.export specialises sizes 0 and 1
    program = torch.export.export(
        inference, (torch.zeros(2, info.n_features),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, path)
    return trained_model(
        "torch",
        path,
        metrics,
        started,
        {
            "framework_version": torch.__version__,
            "n_parameters": str(sum(p.numel() for p in inference.parameters())),
        },
        config,
    )


def export(
    trained: TrainedModel, info: DatasetInfo, config: ExportConfig, out_dir: Path
) -> ExportedModel:
    """Export ``model.pt2`` with the dynamo exporter (weights in ``model.onnx.data``); the
    legacy TorchScript exporter runs only if that fails, and the reason is returned."""
    import torch

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.onnx"
    program = torch.export.load(str(trained.path))
    sample = torch.zeros(2, info.n_features)
    out_name = output_name(info.task)

    exporter, fallback_reason = DYNAMO_EXPORTER, None
    try:
        export_program(
            program,
            target,
            input_names=[INPUT_NAME],
            output_names=[out_name],
            opset=config.opset,
            args=(sample,),
            require_dynamic_batch=True,
        )
    except Exception as exc:  # torch, onnxscript and the version converter raise many types
        message = " ".join(str(exc).split())[:500]  # torch's messages span many lines
        fallback_reason = f"{type(exc).__name__}: {message}"
        log.warning("dynamo ONNX export failed (%s); using the legacy exporter", fallback_reason)
        exporter = LEGACY_EXPORTER
        remove_stale(target)
        try:
            _export_legacy(program, sample, out_name, config.opset, target)
        except Exception as legacy_exc:
            raise ExportError(
                f"Cannot export {trained.path} to ONNX: the dynamo exporter failed "
                f"({fallback_reason}) and so did the legacy one ({legacy_exc})"
            ) from legacy_exc
    check_exported_model(target, info, config.opset)
    seconds = time.perf_counter() - started
    log.info("exported %s with %s in %.1f s", target, exporter, seconds)
    return ExportedModel(
        path=target,
        exporter=exporter,
        opset=config.opset,
        fallback_reason=fallback_reason,
        export_seconds=seconds,
    )


def load_predictor(model_path: Path) -> Predictor:
    """float32 raw features -> the same output as the ONNX model, from ``model.pt2``."""
    import torch

    module = torch.export.load(str(model_path)).module()

    def predict(features: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        with torch.inference_mode():
            return module(batch).numpy()

    return predict


# -- training --------------------------------------------------------------------------


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic, single-threaded torch inside the block; the caller's RNG,
    flags and thread count are restored.

    One thread: the steps of a small MLP are too short to gain from intra-op threads, and
    on a busy 2-core machine OpenMP's spinning threads made training 3-10x slower.
    """
    import torch

    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            torch.set_num_threads(previous[2])


def _mlp(n_features: int, hidden_sizes: tuple[int, ...], n_outputs: int):
    import torch

    layers: list[torch.nn.Module] = []
    width = n_features
    for hidden in hidden_sizes:
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    layers.append(torch.nn.Linear(width, n_outputs))
    return torch.nn.Sequential(*layers)


def _cnn(side: int, hidden_sizes: tuple[int, ...], n_outputs: int):
    """Two 3x3 convolutions (16, 32 channels) with a 2x2 max-pool between, then a dense head.

    The flat features are unflattened to ``[batch, 1, side, side]`` inside the network, so
    the model keeps the ``[batch, n_features]`` interface of every onnxflow model.
    """
    import torch

    layers: list[torch.nn.Module] = [
        torch.nn.Unflatten(1, (1, side, side)),
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
    ]
    width = 32 * (side // 2) ** 2
    for hidden in hidden_sizes:
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    layers.append(torch.nn.Linear(width, n_outputs))
    return torch.nn.Sequential(*layers)


def _fit(
    net,
    X_train,
    y_train,
    X_val,
    y_val,
    info: DatasetInfo,
    config: TrainConfig,
    on_epoch: EpochCallback | None,
) -> dict[str, float]:
    import torch

    classification = info.task == "classification"
    loss_fn = torch.nn.CrossEntropyLoss() if classification else torch.nn.MSELoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    X, Xv = torch.from_numpy(X_train), torch.from_numpy(X_val)
    if classification:
        y, yv = torch.from_numpy(y_train).long(), torch.from_numpy(y_val).long()
    else:
        y, yv = torch.from_numpy(y_train).reshape(-1, 1), torch.from_numpy(y_val).reshape(-1, 1)
    generator = torch.Generator().manual_seed(config.seed)
    n = len(y)

    metrics: dict[str, float] = {}
    for epoch in range(1, config.epochs + 1):
        net.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, config.batch_size):
            rows = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(net(X[rows]), y[rows])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)

        net.eval()
        with torch.no_grad():
            out = net(Xv)
            val_loss = loss_fn(out, yv).item()
        metrics = {"train_loss": total / n, "val_loss": val_loss}
        if classification:
            metrics["val_accuracy"] = (out.argmax(dim=1) == yv).float().mean().item()
        else:  # val_loss is the MSE of standardised targets; rmse is in the target's units
            metrics["val_rmse"] = float(np.sqrt(val_loss) * info.target_std)
        if not np.isfinite(list(metrics.values())).all():
            raise TrainingError(
                f"torch training diverged at epoch {epoch}: {format_metrics(metrics)}; "
                f"try a lower learning_rate than {config.learning_rate}."
            )
        log.info("torch epoch %d/%d: %s", epoch, config.epochs, format_metrics(metrics))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return metrics


def _inference_module(net, info: DatasetInfo):
    """The trained network with standardisation folded in and the output head attached."""
    import torch

    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    pairs = [(m.weight.detach().numpy().T, m.bias.detach().numpy()) for m in linears]
    layers: list[torch.nn.Module] = []
    for i, (kernel, bias) in enumerate(fold_standardization(pairs, info)):
        linear = torch.nn.Linear(*kernel.shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            linear.bias.copy_(torch.from_numpy(bias))
        layers.append(linear)
        if i < len(linears) - 1:
            layers.append(torch.nn.ReLU())
    if info.task == "classification":
        layers.append(torch.nn.Softmax(dim=-1))
    module = torch.nn.Sequential(*layers).eval()
    module.requires_grad_(False)
    return module


def _cnn_inference_module(net, info: DatasetInfo):
    """The trained CNN behind an explicit standardisation, with the output head attached.

    A per-pixel scale cannot be folded into a padded convolution, so the CNN keeps one
    ``(x - mean) * (1 / std)`` in front (two elementwise nodes in the ONNX graph).
    """
    import torch

    class Affine(torch.nn.Module):
        def __init__(self, shift, scale) -> None:
            super().__init__()
            self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32))
            self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

        def forward(self, x):
            return (x - self.shift) * self.scale

    mean = np.asarray(info.feature_mean, dtype=np.float32)
    inv_std = (1.0 / np.asarray(info.feature_std, dtype=np.float64)).astype(np.float32)
    layers = [Affine(mean, inv_std), net]
    if info.task == "classification":
        layers.append(torch.nn.Softmax(dim=-1))
    else:  # y = y_std * target_std + target_mean == (y_std - (-mean / std)) * std
        layers.append(Affine([-info.target_mean / info.target_std], [info.target_std]))
    module = torch.nn.Sequential(*layers).eval()
    module.requires_grad_(False)
    return module


# -- export ----------------------------------------------------------------------------


def _export_legacy(program, sample, out_name: str, opset: int, target: Path) -> None:
    import torch

    class Traceable(torch.nn.Module):
        """The legacy exporter calls ``.train()``, which an unlifted ExportedProgram module
        refuses; keeping it out of the module tree lets the tracer call it as a function."""

        def __init__(self, fn) -> None:
            super().__init__()
            object.__setattr__(self, "fn", fn)

        def forward(self, x):
            return self.fn(x)

    module = program.module()
    module.requires_grad_(False)  # the tracer folds the weights in as constants
    torch.onnx.export(
        Traceable(module),
        (sample,),
        str(target),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[out_name],
        opset_version=opset,
        dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, out_name: {0: BATCH_AXIS}},
    )

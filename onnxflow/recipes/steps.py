"""The recipe's side of the chain, as plain functions (:class:`onnxflow.sources.RecipeSource`
is the chain's adapter over them).

    data (load_data or a built-in loader) ─► train (build_model, fit) ─► export

Each step takes the recipe's path (never its module) and loads it again, so tasks can
retry or run in another process. Problems with the recipe are RecipeErrors naming the
recipe file and the function, raised before training whenever they can be.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from onnxflow.arrays import (
    SPLITS,
    ArrayDataset,
    ArrayDatasetInfo,
    NamedArrays,
    as_named_arrays,
    load_arrays,
    prepare_arrays,
    read_split,
)
from onnxflow.config import DataConfig, ExportConfig, TrainConfig
from onnxflow.errors import ExportError, RecipeError
from onnxflow.interface import (
    BATCH_AXIS,
    ModelInterface,
    TensorDecl,
    load_graph,
    output_name,
    read_interface,
)
from onnxflow.recipes import load_recipe, takes_params
from onnxflow.results import EpochCallback, ExportedModel, TrainedModel
from onnxflow.streaming import TrainingData, described, streamed_splits

log = logging.getLogger(__name__)

#: Where the parity reference runs, whatever device trained the model.
REFERENCE_DEVICE = "cpu"
#: The trained model's params that become version tags: how it was trained.
TRAINING_TAGS = ("train_precision", "train_loader_workers", "data_streamed", "sample_rows")


def prepare_recipe_data(recipe_ref: str, config: DataConfig, out_dir: Path) -> ArrayDataset:
    """The recipe's ``load_data(config)``, or the built-in loader of ``data.path``; checked
    and written as ``splits.npz``."""
    from onnxflow.recipes.datasets import recipe_datasets, stream_recipe
    from onnxflow.stream_plan import stream_data

    recipe = load_recipe(recipe_ref)
    if recipe.has("load_data"):
        where = f"{recipe.ref}: load_data(config)"
        value = recipe.call("load_data", config)
        if recipe_datasets(value):
            return stream_recipe(recipe.ref, value, config, out_dir, where)
        data = as_named_arrays(value, where)
    else:
        where = f"{recipe.ref}: data.path {config.path or '(digits)'}"
        if config.stream:
            if config.path is None:
                raise RecipeError(
                    f"{where}: data.stream needs data.path (an image folder or a Parquet table)"
                )
            return stream_data(config.path, config, out_dir, where)
        data = load_arrays(config)
    return prepare_arrays(data, config, out_dir, where)


#: The recipe adapters, one module per framework, all with the same functions: ``owns``,
#: ``resolve_device``, ``device_scope``, ``to_device``, ``check_output``,
#: ``check_exportable``, ``fit``, ``save``, ``export``, ``reference``,
#: ``count_parameters`` and ``EXPORTER``. Imported lazily (neither imports its framework
#: at import time).
ADAPTERS = {"torch": "onnxflow.recipes.torch_recipe", "keras": "onnxflow.recipes.keras_recipe"}


def framework_adapter(model, ref: str) -> tuple[str, ModuleType]:
    """``("torch", torch_recipe)`` or ``("keras", keras_recipe)`` for a built model."""
    for framework in ADAPTERS:
        adapter = _adapter(framework)
        if adapter.owns(model):
            return framework, adapter
    raise RecipeError(
        f"{ref}: build_model(info) returned {type(model).__module__}."
        f"{type(model).__qualname__}, expected a torch.nn.Module or a keras.Model"
    )


def train_recipe(
    recipe_ref: str,
    dataset: ArrayDataset,
    config: TrainConfig,
    out_dir: Path,
    on_epoch: EpochCallback | None = None,
) -> TrainedModel | None:
    """build_model → check it on two rows and that it can be captured for export → fit
    (the recipe's or onnxflow's) on the chosen device → ``model.pt2`` / ``model.keras``.

    Every epoch's metrics are logged as one progress line, whoever's ``fit`` reports them.

    In one of several data-parallel workers (:mod:`onnxflow.recipes.ddp` starts them) the
    torch model trains in DistributedDataParallel, and only rank 0 checks that it can be
    exported and saves it; the other ranks return None."""
    from onnxflow import distributed

    recipe = load_recipe(recipe_ref)
    info = dataset.info
    data = training_data(dataset)
    _seed(config.seed)
    if takes_params(recipe.module.build_model):
        model = recipe.call("build_model", info, dict(config.params))
    elif config.params and not recipe.has("fit"):
        raise RecipeError(
            f"{recipe.ref}: train.params {sorted(config.params)} are set, but neither "
            "build_model(info) nor a fit(...) can receive them: write build_model(info, params)"
        )
    else:
        model = recipe.call("build_model", info)
    framework, adapter = framework_adapter(model, recipe.ref)
    if distributed.active() and framework != "torch":
        raise RecipeError(
            f"{recipe.ref}: train.workers {config.workers}: a {framework} model trains in one "
            "process (several processes train torch models only); set train.workers: 1"
        )
    if dataset.stream == "recipe" and framework != "torch":
        raise RecipeError(
            f"{recipe.ref}: load_data(config) returned torch datasets, which train torch "
            f"models only; build_model(info) returned a {framework} model, which trains on "
            "an image folder or a Parquet table with data.stream, or on arrays in memory "
            "(load_data returning named arrays)"
        )
    adapter.check_output(model, data, info, recipe.ref)
    if distributed.is_main():
        adapter.check_exportable(model, info, data, recipe.ref, "the model from build_model(info)")
    device = adapter.resolve_device(config.device)
    config = config.on_device(device)
    log.info(
        "recipe %s: %s model with %s parameters, training on %s",
        recipe.ref,
        framework,
        f"{adapter.count_parameters(model):,}",
        device,
    )

    started = time.perf_counter()
    model = distributed.wrap(adapter.to_device(model, device), device)
    last_epoch: dict[str, float] = {}  # what the recipe's own fit reported last

    def reported(epoch: int, metrics: dict[str, float]) -> None:
        last_epoch.update(metrics)
        log.info("%s", epoch_line(recipe.ref, epoch, config.epochs, metrics))
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    with adapter.device_scope(device):
        if recipe.has("fit"):
            returned = recipe.call("fit", model, data, config, reported)
            if returned is not None:
                if not adapter.owns(returned):
                    raise RecipeError(
                        f"{recipe.ref}: fit(...) returned a {type(returned).__name__}, "
                        f"expected the {framework} model it was given (or None)"
                    )
                model = returned
            metrics = {k: float(v) for k, v in last_epoch.items()}
        else:
            metrics = adapter.fit(model, data, info, config, device, reported)
    seconds = time.perf_counter() - started
    model = distributed.unwrap(model)
    if not distributed.is_main():
        return None
    path = adapter.save(model, info, data, out_dir, recipe.ref)
    log.info("recipe model trained in %.1f s on %s -> %s", seconds, device, path)
    return TrainedModel(
        framework=framework,
        path=path,
        metrics=metrics,
        train_seconds=seconds,
        params={
            "recipe": recipe.ref,
            "train_device": device,
            "n_parameters": str(adapter.count_parameters(model)),
            "epochs": str(config.epochs),
            "learning_rate": str(config.learning_rate),
            "batch_size": str(config.batch_size),
            "seed": str(config.seed),
            "own_fit": str(recipe.has("fit")).lower(),
            "workers": str(distributed.world_size()),
            **training_settings(framework, dataset, config, device, recipe.has("fit")),
            **{f"param.{k}": json.dumps(v) for k, v in sorted(config.params.items())},
        },
    )


def epoch_line(ref: str, epoch: int, epochs: int, metrics: dict[str, float]) -> str:
    """One epoch's progress line: ``my_recipe.py epoch 2/3: train_loss 0.4120 ...``."""
    values = " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items())
    return f"{ref} epoch {epoch}/{epochs}: {values}"


def export_recipe(
    trained: TrainedModel, info: ArrayDatasetInfo, config: ExportConfig, out_dir: Path
) -> ExportedModel:
    """The trained model to ``out_dir/model.onnx``, its inputs named and typed as the data's,
    dynamic batch axis ``batch``; the exporter's own message when it fails."""
    from onnxflow.importing import _name_batch_axis

    adapter = _adapter(trained.framework)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.onnx"
    started = time.perf_counter()
    try:
        adapter.export(trained.path, info, config.opset, target)
    except Exception as exc:  # the exporters raise whatever their framework raises
        recipe = trained.params.get("recipe", "the recipe")
        raise ExportError(
            f"{recipe}: {adapter.EXPORTER} cannot export the model from "
            f"build_model(info): {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:1500]}"
        ) from exc
    _name_batch_axis(target)
    _check_interface(target, info)
    seconds = time.perf_counter() - started
    log.info("exported %s with %s in %.1f s", target, adapter.EXPORTER, seconds)
    return ExportedModel(
        path=target, exporter=adapter.EXPORTER, opset=config.opset, export_seconds=seconds
    )


def recipe_reference(trained: TrainedModel, info: ArrayDatasetInfo):
    """The framework model, on CPU, as a function of ONNX feeds -> [probabilities]."""
    return _adapter(trained.framework).reference(trained.path, info.input_names)


def recipe_tags(trained: TrainedModel, info: ArrayDatasetInfo) -> dict[str, str]:
    """Version tags a client needs to feed the model, and where it was trained."""
    tags = {
        "recipe": trained.params.get("recipe", ""),
        "train_device": trained.params.get("train_device", ""),
        "train_workers": trained.params.get("workers", "1"),
        "reference_device": REFERENCE_DEVICE,
        "inputs": "; ".join(
            f"{s.name} {s.dtype} [batch, {', '.join(map(str, s.shape))}]"
            if s.shape
            else f"{s.name} {s.dtype} [batch]"
            for s in info.inputs
        ),
        "classes": ", ".join(info.class_names)[:4000],
    }
    # how it trained: precision, loader workers, streamed data
    tags.update({k: trained.params[k] for k in TRAINING_TAGS if k in trained.params})
    # the recipe's own parameters (train.params), as the trained model had them
    tags.update({f"recipe_{k}": v for k, v in trained.params.items() if k.startswith("param.")})
    tags.update({f"preprocessing.{k}": v for k, v in info.preprocessing.items()})
    return tags


def recipe_interface(info: ArrayDatasetInfo) -> ModelInterface:
    """What a recipe's exported model takes and gives: the data's inputs (names, types,
    shapes) behind a dynamic batch axis, and ``probabilities`` ``[batch, n_classes]`` (or
    ``prediction`` ``[batch, 1]`` for a regression)."""
    import numpy as np
    from onnx import TensorProto
    from onnx.helper import np_dtype_to_tensor_dtype

    def onnx_type(dtype: str) -> str:
        return TensorProto.DataType.Name(np_dtype_to_tensor_dtype(np.dtype(dtype)))

    return ModelInterface(
        inputs=tuple(
            TensorDecl(s.name, onnx_type(s.dtype), (BATCH_AXIS, *s.shape)) for s in info.inputs
        ),
        outputs=(TensorDecl(output_name(info.task), "FLOAT", (BATCH_AXIS, info.n_outputs)),),
    )


def _check_interface(target: Path, info: ArrayDatasetInfo) -> None:
    """The exported model has the data's interface (see :func:`recipe_interface`)."""
    problems = recipe_interface(info).mismatches(read_interface(load_graph(target)))
    if problems:
        raise ExportError(f"{target} does not have the data's interface: " + "; ".join(problems))


def _adapter(framework: str) -> ModuleType:
    return importlib.import_module(ADAPTERS[framework])


def training_data(dataset: ArrayDataset) -> TrainingData:
    """What training reads: the splits in memory (NamedArrays), or their streamed readers."""
    if dataset.stream is not None:
        return streamed_splits(dataset)
    return NamedArrays(
        **{split: _split_arrays(dataset, split) for split in SPLITS}, **described(dataset.info)
    )


def training_settings(
    framework: str, dataset: ArrayDataset, config: TrainConfig, device: str, own_fit: bool
) -> dict[str, str]:
    """How the model was trained, for the version's tags: precision, loader workers (torch:
    DataLoader processes; Keras, streamed: the threads reading its batches, ``"2 threads"``),
    whether the data was streamed (and how many rows the validation sample reads)."""
    loop = framework == "torch" and not own_fit
    workers = str(config.loader_workers if dataset.stream else 0)
    if dataset.stream and framework == "keras" and not own_fit:
        # PyDataset threads; with 0 or 1 Keras reads in tf.data's one generator thread
        threads = max(1, config.loader_workers or 0)
        workers = f"{threads} thread{'s' if threads > 1 else ''}"
    return {
        "train_precision": config.precision if loop else "fp32 (own fit or keras)",
        "train_loader_workers": workers,
        "data_streamed": dataset.stream or "no",
        **({"sample_rows": str(dataset.sample_rows)} if dataset.stream else {}),
    }


def _split_arrays(dataset: ArrayDataset, split: str) -> dict[str, np.ndarray]:
    inputs, labels = read_split(dataset, split)
    return {**inputs, "label": labels}


def _seed(seed: int) -> None:
    import random
    import sys

    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)
    if "keras" in sys.modules:
        sys.modules["keras"].utils.set_random_seed(seed)

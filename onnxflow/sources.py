"""One chain, many sources: what every source of a model gives the chain.

    source.train ─► source.export ─► simplify ─► validate ─► register ─► promote
    (tables, recipes: a framework model; imports: nothing to train)

A :class:`ModelSource` turns whatever the user has (a built-in table model to train, a
recipe, a file trained elsewhere) into a :class:`SourcedModel`: an ONNX file (through the
one exporter module of its framework), the sample to validate it on
(:class:`ValidationSample`), its lineage tags and, through :meth:`ModelSource.reference`,
a CPU predictor of the framework original. From there every model takes the same steps:
:func:`onnxflow.validation.validate_onnx` and :func:`onnxflow.registration.register_validated`
in the one flow :func:`onnxflow.flows.pipeline.chain`.

Sources are small frozen models (paths and configs), so tasks can retry them and Dask
workers can receive them; the live framework model never travels between tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from onnxflow.arrays import ArrayDataset
from onnxflow.config import (
    ExportConfig,
    Framework,
    PipelineConfig,
    TrainConfig,
    ValidateConfig,
    pipeline_params,
)
from onnxflow.interface import ModelInterface
from onnxflow.results import (
    DatasetArtifact,
    EpochCallback,
    ExportedModel,
    ImportedModel,
    StepResult,
    TrainedModel,
    ValidationSummary,
)

log = logging.getLogger(__name__)

Reference = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]
"""A framework model on CPU as a function of ONNX feeds -> its outputs in ONNX order."""

LABELS = "__labels__"
EXPECTED = "__expected__."


class ValidationSample(StepResult):
    """The rows a model is validated on (and registered with as its input example).

    ``path`` is an ``.npz`` of the model's inputs by name, plus the labels (``task`` says
    which kind) and any expected outputs given with an imported model."""

    path: Path
    name: str
    digest: str
    split: Literal["test", "sample"]
    rows: int
    task: Literal["classification", "regression"] | None = None
    """None: the sample has no labels (an imported model's)."""
    class_names: tuple[str, ...] = ()
    training: Path | None = None
    """``training.npz``: the inputs the model was trained on (``train.NAME``) and
    validated on during training (``validation.NAME``), for the version's reference
    profile; None when the source trained nothing (an imported file)."""


@dataclass(frozen=True)
class SampleArrays:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    expected: dict[str, np.ndarray] | None = None


def write_sample(
    out_dir: Path,
    inputs: Mapping[str, np.ndarray],
    *,
    name: str,
    digest: str,
    split: Literal["test", "sample"],
    labels: np.ndarray | None = None,
    task: Literal["classification", "regression"] | None = None,
    class_names: tuple[str, ...] = (),
    expected: Mapping[str, np.ndarray] | None = None,
    training: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> ValidationSample:
    """``out_dir/sample.npz`` and its description (``training``: the train and validation
    inputs by name, written beside it as ``training.npz``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sample.npz"
    training_path = None
    if training is not None:
        training_path = out_dir / "training.npz"
        np.savez(
            training_path,
            **{f"{split}.{k}": v for split, arrays in training.items() for k, v in arrays.items()},
        )
    arrays = {**inputs}
    if labels is not None:
        arrays[LABELS] = labels
    arrays.update({EXPECTED + k: v for k, v in (expected or {}).items()})
    np.savez(path, **arrays)
    rows = min((len(v) for v in inputs.values() if np.ndim(v)), default=1)
    return ValidationSample(
        path=path,
        name=name,
        digest=digest,
        split=split,
        rows=rows,
        task=task if labels is not None else None,
        class_names=class_names,
        training=training_path,
    )


def read_sample(sample: ValidationSample) -> SampleArrays:
    """The sample's inputs by name, its labels and expected outputs (when it has them)."""
    # string tensors are object arrays: pickled, in a file this chain wrote itself
    with np.load(sample.path, allow_pickle=True) as npz:
        arrays = {k: npz[k] for k in npz.files}
    labels = arrays.pop(LABELS, None)
    expected = {k[len(EXPECTED) :]: arrays.pop(k) for k in list(arrays) if k.startswith(EXPECTED)}
    return SampleArrays(inputs=arrays, labels=labels, expected=expected or None)


def read_training_inputs(
    sample: ValidationSample,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """The (train, validation) inputs by name the model was trained on, if it was."""
    if sample.training is None:
        return None
    with np.load(sample.training, allow_pickle=True) as npz:
        split = {k: npz[k] for k in npz.files}
    return tuple(  # type: ignore[return-value]
        {k.split(".", 1)[1]: v for k, v in split.items() if k.startswith(f"{name}.")}
        for name in ("train", "validation")
    )


class SourcedModel(StepResult):
    """What a source hands the chain: the ONNX file and everything validate and register
    need about where it came from."""

    framework: str
    exported: ExportedModel | ImportedModel
    trained: TrainedModel | None = None
    """None for an imported model (trained elsewhere)."""
    sample: ValidationSample
    lineage: dict[str, str]
    """Tags of the source beyond the chain's own (dataset digest, recipe, import file)."""
    origin: dict[str, Any]
    """The validation report's ``framework`` section: what the ONNX file is compared with."""


@runtime_checkable
class ModelSource(Protocol):
    """An adapter of the chain. ``train`` (None when there is nothing to train) runs inside
    the chain's MLflow run; ``export`` turns the trained model (or the file) into a
    :class:`SourcedModel`; ``reference`` loads the framework original on CPU (None when
    there is none: a bare ONNX file)."""

    kind: str
    trains: bool
    """False: nothing to train; ``export`` runs before the MLflow run is opened."""
    dataset: DatasetArtifact | ArrayDataset | None
    """The data the model learns from (an MLflow dataset input of the run), if any."""

    @property
    def label(self) -> str: ...

    def run_name(self, model_name: str) -> str: ...

    def run_params(self, config: PipelineConfig) -> dict[str, object]: ...

    def run_tags(self) -> dict[str, str]: ...

    def train(
        self, out_dir: Path, on_epoch: EpochCallback | None = None
    ) -> TrainedModel | None: ...

    def export(self, trained: TrainedModel | None, out_dir: Path) -> SourcedModel: ...

    def reference(self, model: SourcedModel) -> Reference | None: ...

    def declared(self, model: SourcedModel) -> ModelInterface | None: ...


# -- the adapters ------------------------------------------------------------------------


class _TrainingSource(StepResult):
    """What the sources that train a model share: their train and export settings, and a
    sample made of the dataset's test split (its train and validation inputs beside it)."""

    trains: bool = True
    train_config: TrainConfig = TrainConfig()
    export_config: ExportConfig = ExportConfig()

    @property
    def label(self) -> str:
        """What trains the model; the kind of source unless it names a framework."""
        return self.kind  # type: ignore[attr-defined]

    def run_name(self, model_name: str) -> str:
        return f"{self.label}-{model_name}"

    def run_params(self, config: PipelineConfig) -> dict[str, object]:
        return pipeline_params(config)

    def split(self, name: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The inputs by name and the labels of the dataset's split ``name``."""
        raise NotImplementedError

    def sourced(
        self,
        trained: TrainedModel,
        exported: ExportedModel,
        out_dir: Path,
        lineage: Mapping[str, str] | None = None,
        origin: Mapping[str, Any] | None = None,
    ) -> SourcedModel:
        """The exported model with its sample (the test split) and lineage."""
        info = self.dataset.info  # type: ignore[attr-defined]
        inputs, labels = self.split("test")
        sample = write_sample(
            out_dir / "sample",
            inputs,
            name=info.name,
            digest=info.digest,
            split="test",
            labels=labels,
            task=info.task,
            class_names=info.class_names,
            training={s: self.split(s)[0] for s in ("train", "validation")},
        )
        return SourcedModel(
            framework=trained.framework,
            exported=exported,
            trained=trained,
            sample=sample,
            lineage={"dataset_digest": info.digest, "dataset_name": info.name, **(lineage or {})},
            origin={"name": trained.framework, "path": str(trained.path), **(origin or {})},
        )


class TableSource(_TrainingSource):
    """A built-in PyTorch/Keras/scikit-learn model on a table (:mod:`onnxflow.frameworks`)."""

    kind: Literal["table"] = "table"
    framework: Framework
    dataset: DatasetArtifact

    @property
    def label(self) -> str:
        return self.framework

    def run_tags(self) -> dict[str, str]:
        return {"source_framework": self.framework}

    def split(self, name: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        from onnxflow.data import load_splits
        from onnxflow.interface import INPUT_NAME

        suffix = {"train": "train", "validation": "val", "test": "test"}[name]
        splits = load_splits(self.dataset)
        return {INPUT_NAME: splits[f"X_{suffix}"]}, splits[f"y_{suffix}"]

    def train(self, out_dir: Path, on_epoch: EpochCallback | None = None) -> TrainedModel:
        from onnxflow.frameworks import get_adapter

        return get_adapter(self.framework).train(
            self.dataset, self.train_config, out_dir, on_epoch=on_epoch
        )

    def export(self, trained: TrainedModel | None, out_dir: Path) -> SourcedModel:
        from onnxflow.frameworks import get_adapter

        assert trained is not None
        exported = get_adapter(self.framework).export(
            trained, self.dataset.info, self.export_config, out_dir / "export"
        )
        return self.sourced(trained, exported, out_dir)

    def reference(self, model: SourcedModel) -> Reference:
        from onnxflow.frameworks import get_adapter
        from onnxflow.interface import INPUT_NAME

        assert model.trained is not None
        predict = get_adapter(self.framework).load_predictor(model.trained.path)
        return lambda feeds: [predict(feeds[INPUT_NAME])]

    def declared(self, model: SourcedModel) -> ModelInterface:
        from onnxflow.interface import table_model_interface

        info = self.dataset.info
        return table_model_interface(info.task, info.n_features, info.n_outputs)


class RecipeSource(_TrainingSource):
    """The user's recipe file (:mod:`onnxflow.recipes`) on its named arrays."""

    kind: Literal["recipe"] = "recipe"
    recipe: str
    dataset: ArrayDataset

    def run_tags(self) -> dict[str, str]:
        return {"source_framework": "recipe", "recipe": self.recipe}

    def split(self, name: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        from onnxflow.arrays import read_split

        return read_split(self.dataset, name)

    def train(self, out_dir: Path, on_epoch: EpochCallback | None = None) -> TrainedModel:
        if self.train_config.distributed:  # train.workers processes, launched by torchrun
            from onnxflow.recipes.ddp import train_recipe_ddp

            return train_recipe_ddp(self.recipe, self.dataset, self.train_config, out_dir, on_epoch)
        from onnxflow.recipes.steps import train_recipe

        trained = train_recipe(self.recipe, self.dataset, self.train_config, out_dir, on_epoch)
        assert trained is not None  # one process saves its model
        return trained

    def export(self, trained: TrainedModel | None, out_dir: Path) -> SourcedModel:
        from onnxflow.recipes.steps import REFERENCE_DEVICE, export_recipe, recipe_tags

        assert trained is not None
        info = self.dataset.info
        exported = export_recipe(trained, info, self.export_config, out_dir / "export")
        origin = {
            "format": "recipe",
            "recipe": trained.params.get("recipe", ""),
            "train_device": trained.params.get("train_device", ""),
            "reference_device": REFERENCE_DEVICE,
        }
        return self.sourced(trained, exported, out_dir, recipe_tags(trained, info), origin)

    def reference(self, model: SourcedModel) -> Reference:
        from onnxflow.recipes.steps import recipe_reference

        assert model.trained is not None
        return recipe_reference(model.trained, self.dataset.info)

    def declared(self, model: SourcedModel) -> ModelInterface:
        from onnxflow.recipes.steps import recipe_interface

        return recipe_interface(self.dataset.info)


class ImportSource(StepResult):
    """A model trained elsewhere (:mod:`onnxflow.importing`): nothing to train; ``export``
    converts it and binds the sample (and expected outputs) to its inputs and outputs, so a
    broken file or a sample that does not fit fails before any MLflow run exists."""

    kind: Literal["import"] = "import"
    trains: bool = False
    dataset: None = None
    source: Path
    sample_path: Path
    expected_path: Path | None = None
    opset: int = ExportConfig().opset

    @property
    def label(self) -> str:
        return "import"

    def run_name(self, model_name: str) -> str:
        from onnxflow.importing import detect_format

        return f"import-{detect_format(self.source)}-{model_name}"

    def run_params(self, config: PipelineConfig) -> dict[str, object]:
        """No training, so no dataset input: what was imported, with what."""
        from onnxflow.importing import detect_format

        return {
            "source": str(self.source),
            "source_format": detect_format(self.source),
            "sample": str(self.sample_path),
            "opset": str(self.opset),
        }

    def run_tags(self) -> dict[str, str]:
        from onnxflow.importing import FRAMEWORK_OF, detect_format

        fmt = detect_format(self.source)
        return {"source_framework": FRAMEWORK_OF[fmt], "source_format": fmt}

    def train(self, out_dir: Path, on_epoch: EpochCallback | None = None) -> None:
        return None

    def export(self, trained: TrainedModel | None, out_dir: Path) -> SourcedModel:
        from onnxflow import importing

        imported = importing.convert_to_onnx(
            self.source,
            importing.detect_format(self.source),
            importing.read_arrays(self.sample_path),
            self.opset,
            out_dir / "export",
        )
        feeds = importing.sample_feeds(imported.path, self.sample_path)
        expected = importing.expected_outputs(imported.path, self.expected_path)
        digest = importing.file_digest(self.sample_path)[:16]
        sample = write_sample(
            out_dir / "sample",
            feeds,
            name=self.sample_path.name,
            digest=digest,
            split="sample",
            expected=expected,
        )
        return SourcedModel(
            framework=imported.framework,
            exported=imported,
            sample=sample,
            lineage={
                "dataset_digest": "none (imported model)",
                "imported_from": str(imported.source)[:4000],
                "source_format": imported.source_format,
                "sample_digest": digest,
                **(
                    {"upgraded_from_opset": str(imported.upgraded_from_opset)}
                    if imported.upgraded_from_opset
                    else {}
                ),
            },
            origin={
                "name": imported.framework,
                "path": str(imported.source),
                "format": imported.source_format,
            },
        )

    def reference(self, model: SourcedModel) -> Reference | None:
        from onnxflow.importing import load_reference

        assert isinstance(model.exported, ImportedModel)
        return load_reference(model.exported)

    def declared(self, model: SourcedModel) -> None:
        return None


AnySource = TableSource | RecipeSource | ImportSource


def training_source(
    config: PipelineConfig, dataset: DatasetArtifact | ArrayDataset, framework: Framework
) -> TableSource | RecipeSource:
    """The source a config trains: its recipe on ``dataset`` (named arrays) when it has
    one, else the built-in ``framework`` model on the table."""
    common = {"dataset": dataset, "train_config": config.train, "export_config": config.export}
    if config.recipe:
        return RecipeSource(recipe=config.recipe, **common)
    return TableSource(framework=framework, **common)


# -- the steps every source shares -------------------------------------------------------


def validate_sourced(
    source: ModelSource,
    model: SourcedModel,
    model_path: Path,
    config: ValidateConfig,
    out_dir: Path,
) -> ValidationSummary:
    """:func:`onnxflow.validation.validate_onnx` of ``model_path`` (the simplified file) on
    the source's sample, against its CPU reference and declared interface."""
    from onnxflow.validation import validate_onnx

    return validate_onnx(
        model_path,
        model.sample,
        config,
        out_dir,
        origin=model.origin,
        reference=source.reference(model),
        declared=source.declared(model),
    )

"""Typed configuration: one frozen pydantic model per step, plus the settings that
depend on the environment (read once, in the entry point).

A YAML file given with ``onnxflow run --config`` maps onto :class:`PipelineConfig`,
one section per step, e.g.::

    data: {path: houses.csv, target: price}
    train: {epochs: 40, hidden_sizes: [256, 128]}
    validate: {atol: 1e-4}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

Framework = Literal["torch", "keras", "sklearn"]
ModelKind = Literal["mlp", "cnn"]
Task = Literal["classification", "regression"]


class StepConfig(BaseModel):
    """Base of every step's configuration: immutable, unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(StepConfig):
    path: Path | None = Field(
        None, description="CSV or Parquet table; None uses scikit-learn's bundled digits."
    )
    target: str | None = Field(None, description="Label column of the table (required with path).")
    task: Literal["auto", "classification", "regression"] = Field(
        "auto",
        description="auto: classification for integer/string labels with few distinct values.",
    )
    test_size: float = Field(0.2, gt=0, lt=1, description="Fraction held out for the test split.")
    val_size: float = Field(0.1, gt=0, lt=1, description="Fraction held out for validation.")
    seed: int = Field(42, description="Seed of the split.")
    image_size: int = Field(
        32,
        ge=8,
        le=1024,
        description="Images (a folder of class subfolders) are resized to "
        "image_size x image_size pixels (recipes only).",
    )
    stream: bool = Field(
        False,
        description="Recipes: read an image folder or a Parquet table lazily during training "
        "(batches decoded by loader workers; memory bounded by batch x workers, not the "
        "dataset); torch and Keras models. False reads the data into memory once.",
    )
    sample_rows: int = Field(
        2048,
        ge=32,
        description="Streamed data: rows of the test split the validation gate checks, and of "
        "the train and validation splits the reference profile is built from (the first "
        "rows of each shuffled split).",
    )


class TrainConfig(StepConfig):
    epochs: int = Field(30, ge=1, description="Passes over the training split.")
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
    hidden_sizes: tuple[int, ...] = Field((128, 64), description="Widths of the hidden layers.")
    batch_size: int = Field(32, ge=1, description="Mini-batch size.")
    seed: int = Field(42, description="Seed of weights and shuffling.")
    model: ModelKind = Field(
        "mlp",
        description="mlp, or cnn: a small conv net that reads the features as a square "
        "one-channel image (digits: 8x8); torch and keras only, scikit-learn ignores it.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where a recipe's model trains: auto uses a CUDA device when the "
        "framework sees one; export and validation always run on a CPU copy.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="A recipe's torch training in onnxflow's loop: fp32, or autocast to bf16 "
        "(CUDA; CPU where it supports bf16) or fp16 (CUDA only, with a gradient scaler). "
        "Export and the parity reference stay fp32 on CPU.",
    )
    loader_workers: int | None = Field(
        None,
        ge=0,
        description="Workers decoding batches of a recipe's streamed data (torch DataLoader "
        "worker processes, 0: in the training process; Keras PyDataset threads, 0 or 1: "
        "tf.data's one generator thread). Default: 0 on CPU, min(4, cores - 1) on CUDA. "
        "In-memory data is read in the training process.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="A recipe's own parameters (width, dropout, ...): build_model(info, "
        "params) receives them when it takes a second argument, fit(...) as config.params; "
        "a sweep's space names them params.NAME. The built-in models ignore them.",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Processes that train a recipe's torch model together on this machine "
        "(DistributedDataParallel launched by torchrun: gloo on CPU, NCCL on GPUs); 1 trains "
        "in the flow's own process.",
    )
    nodes: int = Field(
        1,
        ge=1,
        description="Machines that train together (each runs train.workers processes); "
        "more than 1 needs train.rdzv, a shared folder and the same command on every machine.",
    )
    ddp_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Seconds a worker waits for the others at a step they take together "
        "(gradients, the epoch's figures) before the run fails: a worker that hangs or is "
        "stopped ends the run after this long (torch's own default for gloo).",
    )
    rdzv: str | None = Field(
        None,
        description="HOST:PORT of torchrun's c10d rendezvous that every machine reaches "
        "(the first to arrive hosts it); None: this machine, a free port.",
    )

    @field_validator("rdzv")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None:
            rendezvous_address(value)
        return value

    @model_validator(mode="after")
    def _rendezvous_for_several_machines(self) -> TrainConfig:
        if self.nodes > 1 and self.rdzv is None:
            raise ValueError(
                f"train.nodes is {self.nodes}: machines meet at a rendezvous address; "
                "set train.rdzv (--train-rdzv HOST:PORT)"
            )
        return self

    @property
    def distributed(self) -> bool:
        """Whether training runs as torchrun processes (DDP) rather than in this process."""
        return self.workers > 1 or self.nodes > 1

    def on_device(self, device: str) -> TrainConfig:
        """This config for training on ``device`` (``cpu`` or ``cuda``): the device named and
        the loader workers decided. On CPU the default is none: every core already runs the
        trainer's intra-op threads, and loader processes only take cores from them (``make
        bench-train``, 2 cores: the streamed loop took 1.55x the in-memory loop's time per
        sample with 2 workers, 1.05x with none). On CUDA the CPU is free while the GPU
        trains: min(4, cores - 1) workers, at least 1."""
        workers = self.loader_workers
        if workers is None:
            workers = max(1, min(4, (os.cpu_count() or 1) - 1)) if device == "cuda" else 0
        return self.model_copy(update={"device": device, "loader_workers": workers})


def rendezvous_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); ValueError naming the problem."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rendezvous {value!r} is not HOST:PORT (e.g. 10.0.0.5:29400)")
    return host, int(port)


class ExportConfig(StepConfig):
    opset: int = Field(18, ge=13, le=23, description="ONNX opset to export to.")


class SimplifyConfig(StepConfig):
    enabled: bool = Field(True, description="Run onnxsim; off keeps the exported model.")
    check_atol: float = Field(1e-5, gt=0, description="Largest output change simplify may cause.")


class ValidateConfig(StepConfig):
    atol: float = Field(1e-4, gt=0, description="Max absolute framework-vs-ONNX difference.")
    rtol: float = Field(1e-3, gt=0, description="Max relative difference (of values above atol).")
    max_accuracy_drop: float = Field(
        0.001, ge=0, description="Largest allowed accuracy loss through onnxruntime (fraction)."
    )
    batch_size: int = Field(32, ge=2, description="Batch size of the batch-N consistency check.")
    latency_repeats: int = Field(50, ge=1, description="Timed runs per latency figure.")


class QuantizeConfig(StepConfig):
    mode: Literal["off", "dynamic", "static"] = Field(
        "off",
        description="off; dynamic (int8 weights, activations quantized at run time); static "
        "(int8 weights and activations, calibrated on the training split).",
    )
    max_accuracy_drop: float = Field(
        0.01,
        ge=0,
        description="Largest allowed test accuracy loss vs the float model "
        "(fraction; for regression the allowed RMSE increase relative to it).",
    )
    calibration_rows: int = Field(
        256, ge=1, description="Training rows used to calibrate static quantization."
    )
    latency_repeats: int = Field(50, ge=1, description="Timed runs per latency figure.")


class RegisterConfig(StepConfig):
    model_name: str = Field("digits", description="Registered model (one per use case).")
    alias: str = Field("challenger", description="Alias given to the new version.")


class PromoteConfig(StepConfig):
    mode: Literal["auto", "review"] = Field(
        "auto", description="auto moves champion when better; review leaves it to a reviewer."
    )
    metric: str | None = Field(
        None, description="Version tag compared; None: accuracy (classification) or rmse."
    )
    alias: str = Field("champion", description="Alias that is served.")


class ParamRange(StepConfig):
    """A numeric range of a train setting: integers for integer settings (epochs,
    batch_size), floats otherwise (learning_rate)."""

    low: int | float = Field(description="Smallest value tried.")
    high: int | float = Field(description="Largest value tried.")
    log: bool = Field(False, description="Sample on a log scale (learning rates).")

    @model_validator(mode="after")
    def _ordered(self) -> ParamRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class ParamChoice(StepConfig):
    """A list of values of a train setting, one of which each trial takes."""

    choices: list[object] = Field(
        min_length=1,
        description="Values to choose from, e.g. hidden_sizes: [[64], [128, 64]].",
    )


def _param_kind(value: object) -> str:
    """``{choices: [...]}`` is a choice, anything else a range (errors then name one kind)."""
    if isinstance(value, ParamChoice) or (isinstance(value, dict) and "choices" in value):
        return "choice"
    return "range"


ParamSpec = Annotated[
    Annotated[ParamRange, Tag("range")] | Annotated[ParamChoice, Tag("choice")],
    Discriminator(_param_kind),
]


def default_search_space() -> dict[str, ParamSpec]:
    return {
        "learning_rate": ParamRange(low=1e-4, high=1e-2, log=True),
        "hidden_sizes": ParamChoice(choices=[[64], [128, 64], [256, 128]]),
        "batch_size": ParamChoice(choices=[32, 64, 128]),
    }


#: Sweep-space names of a recipe's own parameters: ``params.width`` is ``train.params.width``.
RECIPE_PARAM_PREFIX = "params."


class SweepConfig(StepConfig):
    """A hyperparameter sweep (``onnxflow run --sweep N``): Optuna asks for trials, each
    trains one model on the Dask cluster; the best is exported, validated and registered."""

    trials: int = Field(8, ge=1, description="Trials to run (--sweep N overrides it).")
    space: dict[str, ParamSpec] = Field(
        default_factory=default_search_space,
        description="Search space: train settings (learning_rate, hidden_sizes, epochs, "
        "batch_size, ...) and a recipe's own parameters (params.NAME: integers when both "
        "bounds are) -> {low, high, log} or {choices: [...]}; the train section gives "
        "the settings not in it.",
    )
    metric: str | None = Field(
        None,
        description="Epoch metric the trials are ranked and pruned on; None: val_accuracy "
        "(classification, maximised) or val_rmse (regression, minimised). Names ending in "
        "loss or rmse are minimised, others maximised.",
    )
    parallel: int | None = Field(
        None, ge=1, description="Trials in flight at once; None: one per Dask worker thread."
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna's sampler.")
    seed: int = Field(42, description="Seed of the sampler.")
    pruning: bool = Field(True, description="Stop trials whose epochs trail the median.")
    prune_after_trials: int = Field(
        2, ge=0, description="Finished trials needed before any trial is pruned."
    )
    prune_warmup_epochs: int = Field(
        2, ge=0, description="Epochs a trial always runs before it can be pruned."
    )
    storage: str | None = Field(
        None,
        description="Optuna storage the study and the workers share: an RDB URL "
        "(postgresql://..., sqlite:///...) or a journal file path; None: a journal file in "
        "the run's folder (workers on this machine or a shared disk).",
    )

    @model_validator(mode="after")
    def _known_settings(self) -> SweepConfig:
        settings = set(TrainConfig.model_fields) - {"params"}  # params: one name at a time
        names = {n for n in self.space if not n.startswith(RECIPE_PARAM_PREFIX)}
        unknown = sorted(names - settings)
        if unknown:
            known = ", ".join(sorted(settings))
            raise ValueError(
                f"sweep.space names {', '.join(unknown)}, which the train section does not "
                f"have; known settings: {known}, and a recipe's own parameters as "
                f"{RECIPE_PARAM_PREFIX}NAME"
            )
        for name, spec in self.space.items():
            if name.startswith(RECIPE_PARAM_PREFIX):
                if name == RECIPE_PARAM_PREFIX:
                    raise ValueError("sweep.space: params. needs a parameter name (params.width)")
                continue  # the recipe says what its parameters take
            annotation = TrainConfig.model_fields[name].annotation
            if isinstance(spec, ParamRange) and annotation not in (int, float):
                raise ValueError(
                    f"sweep.space.{name} is not a number: give {{choices: [...]}}, "
                    "not a low/high range"
                )
            if isinstance(spec, ParamRange) and annotation is int:
                if spec.low != int(spec.low) or spec.high != int(spec.high):
                    raise ValueError(f"sweep.space.{name} is an integer setting: whole bounds")
            values = spec.choices if isinstance(spec, ParamChoice) else [spec.low, spec.high]
            for value in values:
                try:
                    TrainConfig.model_validate({name: value})
                except ValueError as exc:
                    problem = exc.errors()[0]["msg"] if hasattr(exc, "errors") else exc
                    raise ValueError(
                        f"sweep.space.{name}: {value!r} is not valid: {problem}"
                    ) from None
        return self


class DaskConfig(StepConfig):
    """Where tasks run when they run on Dask (``--dask``, ``--sweep``)."""

    address: str | None = Field(
        None,
        description="Scheduler of an existing Dask cluster (tcp://host:8786); None: a local "
        "cluster of worker processes on this machine, for the flow run's length.",
    )
    workers: int = Field(2, ge=1, description="Worker processes of the local cluster.")
    threads_per_worker: int = Field(
        1, ge=1, description="Threads per local worker (1: one trial per process)."
    )


class PipelineConfig(StepConfig):
    experiment: str = Field("onnxflow", description="MLflow experiment of the runs.")
    recipe: str | None = Field(
        None,
        description="Your own model code: a Python file (or importable module) with "
        "build_model(info) or build_model(info, params) (params: train.params) and optionally "
        "load_data(config) and fit(model, data, config, on_epoch). Replaces the built-in "
        "models; must be readable where the flow runs.",
    )
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    simplify: SimplifyConfig = SimplifyConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    promote: PromoteConfig = PromoteConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    sweep: SweepConfig = SweepConfig()
    dask: DaskConfig = DaskConfig()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _workers_train_a_recipe(self) -> PipelineConfig:
        if self.train.distributed and not self.recipe:
            raise ValueError(
                f"train.workers {self.train.workers} (train.nodes {self.train.nodes}): "
                "several training processes run a recipe's torch model; the built-in models "
                "train in one process (set recipe, or train.workers: 1)"
            )
        return self


def pipeline_params(config: PipelineConfig) -> dict[str, object]:
    """The step settings as flat MLflow run params (``train.epochs``, ``export.opset``...)."""
    dumped = config.model_dump(by_alias=True)
    sections = ("data", "train", "export", "simplify", "validate", "register", "promote")
    return {
        f"{section}.{k}": v
        for section in (*sections, "quantize")
        for k, v in dumped[section].items()
    }


def layered_config(path: Path | None, overrides: dict[str, Any]) -> PipelineConfig:
    """The YAML file (if any), with ``overrides`` on top (the command line: ``{section:
    {field: value}}``, None meaning "not given"; a top-level key such as ``recipe`` as a
    plain value), validated once. ConfigError naming the file and the problem."""
    import yaml
    from pydantic import ValidationError

    from onnxflow.errors import ConfigError

    raw: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (data:, train:, ...)")
        raw = loaded
    for section, values in overrides.items():
        if not isinstance(values, dict):  # a top-level key such as recipe
            if values is not None:
                raw[section] = values
            continue
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            raw[section] = {**(raw.get(section) or {}), **values}
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration{f' in {path}' if path else ''}:\n{exc}") from None


class Settings(BaseSettings):
    """Where things live; read from the environment (``ONNXFLOW_*``) in entry points."""

    model_config = SettingsConfigDict(env_prefix="ONNXFLOW_", extra="ignore")

    tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI (MLFLOW_TRACKING_URI wins when set).",
    )
    artifacts_dir: Path = Field(Path("artifacts"), description="Where steps write their files.")
    dask_address: str | None = Field(
        None,
        description="Scheduler of the Dask cluster that sweeps and --dask runs use when the "
        "config names none (a deployment's worker reads it too); None: a local cluster.",
    )
    prefect_server: Literal["auto", "temporary"] = Field(
        "auto",
        description="Without PREFECT_API_URL: auto uses a Prefect server running at the "
        "stack's address (make up) and starts a temporary one otherwise; temporary always "
        "starts a temporary one.",
    )

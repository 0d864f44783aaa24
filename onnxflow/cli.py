"""The ``onnxflow`` command line.

Settings that depend on the machine (tracking URI, artifact folder) are read here, in
the entry point, and passed down; heavy libraries are imported inside each command so
that ``onnxflow --help`` stays instant. A command that fails ends with one ``error: ...``
line (:func:`main`); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
import uuid
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from onnxflow.config import PipelineConfig, Settings, layered_config
from onnxflow.errors import OnnxflowError
from onnxflow.explain import check_tracking_store, explain
from onnxflow.prefect_api import prefect_api

app = typer.Typer(
    help="Train in PyTorch or Keras, ship as ONNX: export, simplify, validate, register in "
    "MLflow, promote and serve with onnxruntime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


_DEBUG = {"on": os.environ.get("ONNXFLOW_DEBUG", "") not in ("", "0", "false")}


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="ONNXFLOW_DEBUG",
            help="On failure, show the full traceback (not just the error line).",
        ),
    ] = False,
) -> None:
    _DEBUG["on"] = _DEBUG["on"] or debug


class FrameworkChoice(str, Enum):
    torch = "torch"
    keras = "keras"
    sklearn = "sklearn"
    both = "both"
    all = "all"


def _frameworks(choice: FrameworkChoice | None, sweep: int | None = None) -> list[str]:
    """both = torch + keras (the neural nets); all = torch + keras + sklearn. The default
    is both, or torch for a sweep (a sweep trains one framework)."""
    if choice is None:
        choice = FrameworkChoice.torch if sweep else FrameworkChoice.both
    frameworks = {
        FrameworkChoice.both: ["torch", "keras"],
        FrameworkChoice.all: ["torch", "keras", "sklearn"],
    }.get(choice, [choice.value])
    if sweep and len(frameworks) > 1:
        _fail(f"--sweep trains one framework; --framework {choice.value} names several", 2)
    return frameworks


class ModelChoice(str, Enum):
    mlp = "mlp"
    cnn = "cnn"


class QuantizeChoice(str, Enum):
    off = "off"
    dynamic = "dynamic"
    static = "static"


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class PromotionMode(str, Enum):
    auto = "auto"
    review = "review"


def _setup(settings: Settings | None = None) -> Settings:
    """Point MLflow (and every subprocess) at the store, quiet the noisy libraries."""
    settings = settings or Settings()
    os.environ.setdefault("MLFLOW_TRACKING_URI", settings.tracking_uri)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "onnxflow")
    # onnxflow's own lines outside a flow (starting a server...) go to the terminal only
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.WARNING,
        datefmt="%H:%M:%S",
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    logging.getLogger("onnxflow").setLevel(logging.INFO)  # progress lines; libraries stay quiet
    if not _DEBUG["on"]:
        route_failures_to_file(settings.artifacts_dir / "logs" / f"onnxflow-{os.getpid()}.log")
    return settings


class _NoFailureDetails(logging.Filter):
    """The terminal shows no failure's traceback nor its repeats: a failed step or flow run
    is said once, by the command's last line (``error: ...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect", "onnxflow")):
            return True
        if record.levelno >= logging.ERROR:
            return False
        # a run's end in a failed state repeats the error (Prefect logs it at INFO)
        return not str(record.msg).startswith(
            ("Finished in state Failed", "Finished in state Crashed")
        )


_LOG_FILE: dict[str, Path] = {}


def route_failures_to_file(path: Path) -> None:
    """Every log line, with tracebacks, to ``path`` (opened on the first line); the
    terminal's handlers keep the progress lines and drop the failures' details (Prefect
    still sends them to its UI). ``--debug`` leaves the terminal as it is."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, _NoFailureDetails) for f in handler.filters):
            handler.addFilter(_NoFailureDetails())
    if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(path, delay=True)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        root.addHandler(to_file)
        _LOG_FILE["path"] = path


def _prefect_api(settings: Settings):
    """The Prefect API for a command's flows; a server of the stack (`make up`) counts."""
    local = None
    if settings.prefect_server == "auto":
        from onnxflow.stack.manager import running_settings
        from onnxflow.stack.settings import StackSettings

        local = running_settings(StackSettings()).prefect_api_url
    return prefect_api(local, say=_say)


def _say(line: str) -> None:
    typer.echo(line, err=True)


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {_one_line(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _one_line(message: str) -> str:
    """The message on one line, pointing at the log file when details went there."""
    line = " ".join(message.split())
    log_file = _LOG_FILE.get("path")
    if log_file is not None and log_file.exists() and log_file.stat().st_size:
        line += f" (details: {log_file})"
    return line


def load_config(path: Path | None, overrides: dict[str, Any]) -> PipelineConfig:
    """The YAML file (if any) with the command-line options on top
    (:func:`onnxflow.config.layered_config`); a problem is the command's error line."""
    try:
        return layered_config(path, overrides)
    except OnnxflowError as exc:
        _fail(str(exc), 2)
        raise  # unreachable, for type checkers


FrameworkOpt = Annotated[
    FrameworkChoice | None,
    typer.Option(help="Which framework(s) to train (default: both; with --sweep: torch)."),
]
SweepOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Sweep: train this many trials (Optuna; search space in the YAML's sweep: "
        "section) as tasks on a Dask cluster; the best is validated and registered. One "
        "framework.",
    ),
]
DaskOpt = Annotated[
    bool,
    typer.Option(
        "--dask", help="Run the framework chains side by side as tasks on a Dask cluster."
    ),
]
DaskWorkersOpt = Annotated[
    int | None, typer.Option(help="Worker processes of the local Dask cluster (default 2).")
]
DaskAddressOpt = Annotated[
    str | None,
    typer.Option(
        envvar="ONNXFLOW_DASK_ADDRESS",
        show_envvar=True,
        help="Scheduler of an existing Dask cluster (tcp://host:8786) instead of a local one.",
    ),
]
DataOpt = Annotated[
    Path | None, typer.Option(help="CSV or Parquet table (default: the bundled digits).")
]
TargetOpt = Annotated[str | None, typer.Option(help="Label column of --data.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file with step settings.")]
PromotionOpt = Annotated[
    PromotionMode | None,
    typer.Option(help="auto moves champion when better; review leaves it to a reviewer."),
]
ModelNameOpt = Annotated[str | None, typer.Option(help="Registered model name (default: digits).")]
EpochsOpt = Annotated[int | None, typer.Option(help="Training epochs (overrides the config).")]
ModelOpt = Annotated[
    ModelChoice | None,
    typer.Option(
        help=(
            "mlp, or cnn: a small conv net on the features as a square image (digits: 8x8); torch "
            "and keras."
        )
    ),
]
PrecisionOpt = Annotated[
    PrecisionChoice | None,
    typer.Option(
        help="A recipe's torch training in onnxflow's loop: fp32, bf16 or fp16 autocast "
        "(fp16: CUDA only); export and the parity reference stay fp32 on CPU."
    ),
]
RecipeOpt = Annotated[
    str | None,
    typer.Option(
        help="Your own model code: a .py file (or importable module) with build_model(info), "
        "optionally load_data(config) and fit(model, data, config, on_epoch). Replaces "
        "--framework/--model."
    ),
]
QuantizeOpt = Annotated[
    QuantizeChoice | None,
    typer.Option(
        help=(
            "Also register an int8 version: dynamic, or static (calibrated on the training split); "
            "kept only if accuracy drops at most quantize.max_accuracy_drop."
        )
    ),
]
TrainWorkersOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Train a recipe's torch model with N processes on this machine (DDP launched by "
        "torchrun; gloo on CPU, NCCL on GPUs); export, validation and registration run once.",
    ),
]
TrainNodesOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Machines training together with --train-workers each (needs --train-rdzv; "
        "each other machine runs the torchrun command the run logs).",
    ),
]
TrainRdzvOpt = Annotated[
    str | None,
    typer.Option(help="HOST:PORT of the torchrun c10d rendezvous every machine can reach."),
]


#: The options of `run` and `trigger` that set the pipeline's configuration, declared once:
#: :func:`pipeline_config` puts them on top of the YAML.
PIPELINE_OPTIONS: dict[str, Any] = {
    "data": DataOpt,
    "target": TargetOpt,
    "promotion": PromotionOpt,
    "model_name": ModelNameOpt,
    "epochs": EpochsOpt,
    "model": ModelOpt,
    "quantize": QuantizeOpt,
    "precision": PrecisionOpt,
    "recipe": RecipeOpt,
    "sweep": SweepOpt,
    "dask_workers": DaskWorkersOpt,
    "dask_address": DaskAddressOpt,
    "train_workers": TrainWorkersOpt,
    "train_nodes": TrainNodesOpt,
    "train_rdzv": TrainRdzvOpt,
}


def with_pipeline_options(**overrides: Any):
    """The command takes :data:`PIPELINE_OPTIONS` too, after its own, in its ``**pipeline``
    (each None unless given); ``overrides`` declare one of them differently for this command."""
    import typing

    def decorate(command):
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            parameter.replace(annotation=hints[name])
            for name, parameter in inspect.signature(command).parameters.items()
            if parameter.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        options = {**PIPELINE_OPTIONS, **overrides}
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
            for name, kind in options.items()
        ]
        command.__signature__ = inspect.Signature([*own, *shared], return_annotation=None)
        command.__annotations__ = {p.name: p.annotation for p in [*own, *shared]}
        return command

    return decorate


def pipeline_config(
    config: Path | None,
    *,
    data: Path | None,
    target: str | None,
    epochs: int | None,
    model_name: str | None,
    promotion: PromotionMode | None,
    model: ModelChoice | None,
    quantize: QuantizeChoice | None,
    precision: PrecisionChoice | None = None,
    recipe: str | None = None,
    sweep: int | None = None,
    dask_workers: int | None = None,
    dask_address: str | None = None,
    train_workers: int | None = None,
    train_nodes: int | None = None,
    train_rdzv: str | None = None,
) -> PipelineConfig:
    """The YAML file with the command-line options of `run` and `trigger` on top, and a
    recipe's DEFAULTS under both."""
    cfg = load_config(
        config,
        {
            "recipe": recipe,
            "data": {"path": data, "target": target},
            "train": {
                "epochs": epochs,
                "model": model.value if model else None,
                "workers": train_workers,
                "nodes": train_nodes,
                "rdzv": train_rdzv,
                "precision": precision.value if precision else None,
            },
            "register": {"model_name": model_name},
            "promote": {"mode": promotion.value if promotion else None},
            "quantize": {"mode": quantize.value if quantize else None},
            "sweep": {"trials": sweep},
            "dask": {"workers": dask_workers, "address": dask_address},
        },
    )
    if not cfg.recipe:
        return cfg
    from onnxflow.recipes import with_recipe_defaults

    try:
        return with_recipe_defaults(cfg)
    except OnnxflowError as exc:
        _fail(str(exc), 2)
        raise  # unreachable, for type checkers


@app.command()
@with_pipeline_options()
def run(
    framework: FrameworkOpt = None,
    config: ConfigOpt = None,
    deploy: Annotated[
        bool, typer.Option(help="End by serving champion with the endpoint.")
    ] = False,
    port: Annotated[int, typer.Option(help="Port of the endpoint with --deploy.")] = 8080,
    dask: DaskOpt = False,
    **pipeline: Any,
) -> None:
    """Train, export, simplify, validate, register and promote."""
    settings = _setup()
    cfg = pipeline_config(config, **pipeline)
    sweep = pipeline["sweep"]
    frameworks = _frameworks(framework, sweep)
    out_dir = settings.artifacts_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    # Bad data fails here, in seconds, before Prefect or any framework starts (a recipe's
    # data is checked by the flow's first task, before any training).
    from onnxflow.data import prepare_data

    try:
        if not cfg.recipe:
            prepare_data(cfg.data, out_dir / "data-check")
    except OnnxflowError as exc:
        _fail(str(exc), 2)
    check_tracking_store()

    with _prefect_api(settings) as api:  # a temporary server boots while we import
        from onnxflow.flows.pipeline import run as run_flow
        from onnxflow.summary import print_table

        api.wait()
        started = time.perf_counter()
        failure = None
        try:
            if sweep:
                from onnxflow.flows.sweep import sweep as sweep_flow

                result = sweep_flow(frameworks[0], cfg, out_dir)
            else:
                dask = dask or bool(pipeline["dask_address"])
                result = run_flow(frameworks, cfg, out_dir, dask=dask)
        except OnnxflowError as exc:
            failure = str(exc)
    if failure is not None:  # said after the temporary server stopped: the last line
        _fail(failure)
    for chain in result.chains:
        if chain.sweep is not None:
            _print_sweep(chain.sweep)
    print_table(result.table, title=f"{cfg.register_.model_name}: versions from this run")
    decision = result.promotion
    if decision:
        typer.echo(
            f"promotion ({decision.metric}): v{decision.candidate} "
            f"{decision.decision.replace('_', ' ')} — {decision.reason}"
        )
        typer.echo(
            f"champion: v{decision.champion_after or '-'}    challenger: v{decision.candidate}"
        )
    typer.echo(f"artifacts: {out_dir}    run time: {time.perf_counter() - started:.1f} s")
    if deploy:
        _deploy(f"{cfg.register_.model_name}@champion", port)


def _print_sweep(outcome) -> None:
    from onnxflow.sweep import summary_line

    typer.echo(f"sweep {outcome.study}: {summary_line(outcome.trials)}")
    for t in outcome.trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        mark = " <- best" if outcome.best and t.number == outcome.best.number else ""
        note = f"  ({t.note[:100]})" if t.state in ("lost", "failed") and t.note else ""
        typer.echo(
            f"  trial {t.number:>2} {t.state:<8} {outcome.metric}={value} {t.params}{mark}{note}"
        )
    if outcome.lost:
        lost = ", ".join(f"#{t.number}" for t in outcome.lost)
        typer.echo(f"lost trials (their Dask worker died): {lost}")


@app.command("import-model")
def import_model(
    path: Annotated[
        Path,
        typer.Argument(
            help=(
                "A .keras file, a TensorFlow SavedModel folder, a torch.export .pt2, a TorchScript "
                "file or an .onnx model."
            )
        ),
    ],
    name: Annotated[str, typer.Option(help="Registered model to add the version to.")],
    sample: Annotated[
        Path,
        typer.Option(
            help="Sample inputs: .npz (one array per input name), or a CSV/Parquet table."
        ),
    ],
    expected: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Expected outputs (.npz by output name, or a table for one output): what a bare "
                "ONNX model is compared with."
            )
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file with step settings.")
    ] = None,
    opset: Annotated[
        int | None, typer.Option(help="ONNX opset of the conversion (framework models).")
    ] = None,
) -> None:
    """Import a model trained elsewhere: convert to ONNX, simplify, validate, register."""
    settings = _setup()
    cfg = load_config(config, {"export": {"opset": opset}})
    # An unknown or broken file fails here, in seconds, before Prefect starts.
    from onnxflow.importing import detect_format, read_arrays

    try:
        found = detect_format(path)
        read_arrays(sample)
        if expected is not None:
            read_arrays(expected, "expected outputs")
    except OnnxflowError as exc:
        _fail(str(exc), 2)
    typer.echo(f"{path}: {found}")
    check_tracking_store()
    out_dir = (
        settings.artifacts_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-import-{uuid.uuid4().hex[:6]}"
    )
    with _prefect_api(settings) as api:  # a temporary server boots while we import
        from onnxflow.flows.pipeline import chain
        from onnxflow.sources import ImportSource
        from onnxflow.summary import print_table, version_rows

        api.wait()
        source = ImportSource(
            source=path, sample_path=sample, expected_path=expected, opset=cfg.export.opset
        )
        cfg = cfg.model_copy(
            update={"register_": cfg.register_.model_copy(update={"model_name": name})}
        )
        failure = None
        try:
            result = chain(source, cfg, out_dir)
        except OnnxflowError as exc:
            failure = str(exc)
    if failure is not None:  # said after the temporary server stopped: the last line
        _fail(failure)
    print_table(version_rows(name, [result.version.version]), title=f"{name}: imported version")
    tags = result.version.tags
    parity = (
        f"max abs diff {tags.get('parity_max_abs')} against {tags.get('parity_against')}"
        if tags.get("parity_checked") == "true"
        else f"not checked: {tags.get('parity_note')}"
    )
    typer.echo(f"parity: {parity}")
    typer.echo(f"batch axis: {tags.get('batch_axis')}    report: {result.validation.report_dir}")
    typer.echo(
        f"{name} v{result.version.version} is challenger; to serve it: "
        f"onnxflow promote {name} {result.version.version}"
    )


@app.command()
def models(
    name: Annotated[str, typer.Argument(help="Registered model.")] = "digits",
) -> None:
    """List a registered model's versions with aliases and key tags."""
    _setup()
    check_tracking_store()
    from mlflow.exceptions import MlflowException

    from onnxflow.summary import print_table, version_rows

    try:
        rows = version_rows(name)
    except MlflowException as exc:
        _fail(f"no registered model {name!r} in {os.environ['MLFLOW_TRACKING_URI']}: {exc.message}")
    print_table(rows, title=f"{name} ({os.environ['MLFLOW_TRACKING_URI']})")


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model.")],
    version: Annotated[str, typer.Argument(help="Version to point the alias at.")],
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "champion",
) -> None:
    """Move an alias to a version (rollback is the same command with an older version)."""
    _setup()
    check_tracking_store()
    from onnxflow.registration import set_alias

    try:
        set_alias(name, alias, version)
    except OnnxflowError as exc:
        _fail(str(exc))
    typer.echo(f"{name}@{alias} -> version {version}")


@app.command()
def audit(
    name: Annotated[str, typer.Argument(help="Registered model.")] = "digits",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Recompute the audit chain's hashes; exit 1 if it was tampered with."
        ),
    ] = False,
) -> None:
    """Who moved (or tried to move) the model's aliases, when, and what the server decided.

    Reads the append-only, hash-chained audit table the stack's MLflow server writes
    (GET /api/2.0/onnxflow/audit) at MLFLOW_TRACKING_URI, logged in as
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
    """
    _setup()
    from mlflow.exceptions import MlflowException

    from onnxflow.stack.audit import fetch_rows, format_trail, verify_chain

    try:
        rows = fetch_rows()
    except MlflowException as exc:
        _fail(
            f"cannot read the audit trail of {name!r} at "
            f"{os.environ['MLFLOW_TRACKING_URI']}: {exc.message}"
        )
    typer.echo(format_trail(name, [r for r in rows if r["model"] == name]))
    if verify:
        problem = verify_chain(rows)
        if problem is not None:
            _fail(f"audit trail TAMPERED: {problem}")
        head = rows[-1]["hash"] if rows else "(empty)"
        typer.echo(f"audit chain intact: {len(rows)} rows, head {head}")


def _deploy(model: str, port: int) -> None:
    from onnxflow.deploy import deploy_endpoint, smoke_test
    from onnxflow.serving.launcher import make_settings

    try:
        url = deploy_endpoint(model, port=port)
        answer = smoke_test(url, make_settings(model=model))
    except OnnxflowError as exc:
        _fail(str(exc))
    typer.echo(f"serving {model} (version {answer['version']}) at {url}")
    typer.echo(
        f"sample prediction for the registered input example: {_brief(answer['predictions'])}"
    )
    typer.echo(f"try: curl -s {url}/v2/models/{model.split('@')[0]}")
    typer.echo("stop it with: onnxflow stop   (or: make stop)")


def _brief(predictions: Any) -> str:
    """``class 3 (p=0.998)`` for class probabilities; the first values otherwise."""
    if isinstance(predictions, dict):  # MLflow's format for named outputs
        predictions = next(iter(predictions.values()))
    row = predictions[0] if isinstance(predictions, list) and predictions else predictions
    if isinstance(row, list) and len(row) > 1 and all(isinstance(v, float) for v in row):
        best = max(range(len(row)), key=row.__getitem__)
        return f"class {best} (p={row[best]:.3f} of {len(row)} classes)"
    return str(row)[:200]


def _serve_options() -> inspect.Signature:
    """The `serve` command's options: one per :class:`ServingSettings` field, with its type
    and description (each option is declared once, there). None: the setting's
    ``ONNXFLOW_SERVE_*`` variable, else its default."""
    import types
    import typing

    from pydantic import SecretStr

    from onnxflow.serving.settings import ServingSettings

    parameters = []
    for name, field in ServingSettings.model_fields.items():
        kind = field.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        help_text = field.description
        extra: dict = {}
        if kind is SecretStr:
            kind = str
            extra = {"envvar": "ONNXFLOW_SERVE_TOKEN", "show_envvar": True}
        if name == "model":  # repeatable: one endpoint, several models
            kind = list[str]
            help_text += " Repeat --model to serve several."
            extra = {"metavar": "NAME@ALIAS"}
        option = typer.Option(help=help_text, **extra)
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[kind | None, option],
            )
        )
    return inspect.Signature(parameters, return_annotation=None)


def serve(**options: Any) -> None:
    """Serve registered models in the foreground with the onnxruntime endpoint.

    Each model is on /v2/models/NAME/infer (KServe V2) and /v2/models/NAME/invocations
    (MLflow scoring); /invocations answers with the first.
    """
    _setup()
    from onnxflow.serving.launcher import serve as serve_foreground

    try:
        serve_foreground(**options)
    except ValueError as exc:  # the settings refused an option
        _fail(str(exc))


serve.__signature__ = _serve_options()
serve.__annotations__ = {p.name: p.annotation for p in serve.__signature__.parameters.values()}
app.command()(serve)


@app.command()
def feedback(
    name: Annotated[str, typer.Argument(help="The served model the labels are for.")],
    labels_csv: Annotated[
        Path, typer.Argument(help="CSV with request_id,label (and optionally row).")
    ],
    url: Annotated[
        str, typer.Option(help="The endpoint that captured the requests.")
    ] = "http://127.0.0.1:8080",
    token: Annotated[
        str | None,
        typer.Option(envvar="ONNXFLOW_SERVE_TOKEN", show_envvar=True, help="Its bearer token."),
    ] = None,
) -> None:
    """Send ground truth for captured requests (all stored, or none with the reason)."""
    from onnxflow.feedback import read_labels_csv, send_feedback

    stored = send_feedback(url, name, read_labels_csv(labels_csv), token)
    typer.echo(f"{stored} label(s) stored for {name}")


@app.command()
def monitor(
    name: Annotated[str, typer.Argument(help="The registered model to monitor.")],
    capture: Annotated[
        str | None,
        typer.Option(help="Where the endpoints capture (serve --capture): folder or URL."),
    ] = None,
    since: Annotated[
        str, typer.Option(help="The window: a duration back from now (30m, 6h, 2d) or ISO time.")
    ] = "1d",
    alias: Annotated[str, typer.Option(help="The alias of the version served.")] = "champion",
    max_drift_share: Annotated[
        float, typer.Option(help="Retrain when more than this share of features drift.")
    ] = 0.3,
    min_live_accuracy: Annotated[
        float, typer.Option(help="Retrain when live accuracy is below this ...")
    ] = 0.8,
    min_labels: Annotated[int, typer.Option(help="... on at least this many labels.")] = 50,
    min_shadow_requests: Annotated[
        int,
        typer.Option(
            help="With --retrain: a retrained challenger meets the promotion gate once it "
            "has answered this many requests in shadow."
        ),
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    retrain: Annotated[
        bool,
        typer.Option(
            help="When the policy is crossed, retrain on the original data plus the labelled "
            "captured rows; the new version lands as challenger (default: report only)."
        ),
    ] = False,
    config: ConfigOpt = None,
    on_stack: Annotated[
        bool,
        typer.Option(
            help="Run the stack's deployment onnxflow-monitor/NAME on its worker now (its "
            "capture, policy and promotion mode; --since and --retrain as given) and wait."
        ),
    ] = False,
) -> None:
    """Captured traffic and feedback of a window against the served version's profile:
    drift per feature, live accuracy, the retrain decision; report and tags on the version.
    With --retrain, a retrain on that evidence (--config: the pipeline's settings; its data,
    when it names none, is the table the served version was trained on); while its
    challenger is pending, the promotion gate instead (--config's promote.mode)."""
    import dataclasses
    import json

    from onnxflow.monitor import NO_DATA, RetrainPolicy, parse_since

    settings = _setup()
    parse_since(since)  # a bad window is refused before a Prefect server starts
    if on_stack:
        _monitor_on_stack(name, since, retrain)
        return
    if capture is None:
        _fail("--capture is required (where the endpoints capture), or --on-stack")
    policy = RetrainPolicy(
        max_drift_share=max_drift_share,
        min_live_accuracy=min_live_accuracy,
        min_labels=min_labels,
        min_shadow_requests=min_shadow_requests,
    )
    with _prefect_api(settings) as api:
        from onnxflow.flows.monitor import monitor as monitor_flow

        api.wait()
        cfg = load_config(config, {}) if retrain else PipelineConfig()
        figures = monitor_flow(
            name,
            capture,
            since,
            policy,
            alias,
            retrain=retrain,
            config=cfg,
            out_dir=settings.artifacts_dir / "retrain",
        )
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(figures), indent=2))
        return
    if figures.status == NO_DATA:
        typer.echo(
            f"{figures.model} version {figures.version}, {figures.window}: no data "
            f"({figures.reason}); no drift or accuracy figures, retrain: no"
        )
        if figures.promotion:
            typer.echo(f"promotion gate: {figures.promotion}")
        return
    accuracy = "n/a" if figures.live_accuracy is None else f"{figures.live_accuracy:.4f}"
    typer.echo(
        f"{figures.model} version {figures.version}, {figures.window}: {figures.rows} rows "
        f"({figures.labelled} labelled); drift share {figures.drift_share:.4f} "
        f"({', '.join(figures.drifted[:8]) or 'no feature drifts'}); live accuracy "
        f"{accuracy}; retrain: {'yes' if figures.retrain else 'no'} ({figures.reason})"
    )
    if figures.retrained:
        typer.echo(
            f"retrained on the evidence: {name} version(s) {', '.join(figures.retrained)} "
            "registered as challenger"
        )
    if figures.promotion:
        typer.echo(f"promotion gate: {figures.promotion}")


def _monitor_on_stack(name: str, since: str, retrain: bool) -> None:
    from onnxflow.stack.deployments import MONITOR_FLOW, trigger_monitor
    from onnxflow.stack.manager import running_settings
    from onnxflow.stack.settings import StackSettings

    stack = running_settings(StackSettings())
    try:
        run = trigger_monitor(stack, name, {"since": since, "retrain": retrain})
    except Exception as exc:  # noqa: BLE001  (no such deployment, no server: one line)
        _fail(f"{MONITOR_FLOW}/{name} on the stack at {stack.prefect_url}: {exc}")
    line = f"{MONITOR_FLOW}/{name}: flow run {run.name} {run.state.type.value}"
    typer.echo(f"{line} ({stack.prefect_url}/runs/flow-run/{run.id})")
    if not run.state.is_completed():
        _fail(f"{line}: {run.state.message or ''}")


@app.command()
def stop() -> None:
    """Stop the endpoint started by `onnxflow run --deploy` (or `make demo`)."""
    from onnxflow.deploy import stop_endpoint

    typer.echo("endpoint stopped" if stop_endpoint() else "no endpoint was running")


# --- the service stack: `onnxflow stack up|status|down|deploy` and `onnxflow trigger` ---

from onnxflow.stack.commands import stack_app  # noqa: E402  (light: typer only)

app.add_typer(stack_app, name="stack")


#: `trigger`'s files and cluster are the worker's, not this machine's.
TriggerDataOpt = Annotated[
    Path | None,
    typer.Option(help="CSV or Parquet table the worker can read (default: the bundled digits)."),
]
TriggerRecipeOpt = Annotated[
    str | None,
    typer.Option(
        help="Your own model code (see run --help): a .py file the worker can read, sent "
        "as an absolute path, or an importable module."
    ),
]
TriggerDaskAddressOpt = Annotated[
    str | None,
    typer.Option(
        help="Scheduler of an existing Dask cluster the worker can reach (default: the "
        "worker's ONNXFLOW_DASK_ADDRESS, else a local cluster on the worker's machine)."
    ),
]


@app.command()
@with_pipeline_options(
    data=TriggerDataOpt, recipe=TriggerRecipeOpt, dask_address=TriggerDaskAddressOpt
)
def trigger(
    framework: FrameworkOpt = None,
    config: ConfigOpt = None,
    wait: Annotated[
        bool,
        typer.Option(help="Wait until the run finished (and the replicas serve its champion)."),
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
    ] = None,
    **pipeline: Any,
) -> None:
    """Run the on-demand retrain-and-deploy deployment on the stack's worker."""
    data, recipe, sweep = pipeline["data"], pipeline["recipe"], pipeline["sweep"]
    if data is not None and not data.exists():
        _fail(f"data file not found: {data}", 2)
    if recipe is not None and Path(recipe).is_file():
        recipe = str(Path(recipe).resolve())
    cfg = pipeline_config(
        config, **{**pipeline, "data": data.resolve() if data else None, "recipe": recipe}
    )
    from onnxflow.stack.commands import trigger_run

    trigger_run(_frameworks(framework, sweep), cfg, wait=wait, timeout_s=timeout, sweep=bool(sweep))


class ConvertTarget(str, Enum):
    torch = "torch"
    tensorflow = "tensorflow"
    tflite = "tflite"


@app.command()
def convert(
    model: Annotated[
        str,
        typer.Argument(
            help=(
                "A registry URI (models:/digits@champion, models:/digits/3), a registered "
                "model's NAME (with VERSION), or an .onnx file."
            )
        ),
    ],
    version: Annotated[
        str | None,
        typer.Argument(help="With a NAME: the version number, or an alias such as champion."),
    ] = None,
    to: Annotated[
        ConvertTarget, typer.Option(help="Framework to convert to.")
    ] = ConvertTarget.torch,
    out: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Folder for the saved model and report.json (default: a new one under the artifacts"
                " folder)."
            )
        ),
    ] = None,
    sample: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Inputs to check parity on (.npz, CSV or Parquet); default: a registry version's "
                "digits test split or input example."
            )
        ),
    ] = None,
) -> None:
    """Convert an ONNX model into PyTorch (onnx2torch), a TensorFlow SavedModel or a TFLite
    file (onnx2tf, in its own venv) and check parity against onnxruntime."""
    settings = _setup()
    from onnxflow.convert import ConvertConfig, convert_model

    if version is not None:
        sep = "/" if version.isdigit() else "@"
        model = f"models:/{model}{sep}{version}"

    out_dir = (
        out
        or settings.artifacts_dir
        / f"{time.strftime('%Y%m%d-%H%M%S')}-convert-{uuid.uuid4().hex[:6]}"
    )
    try:
        result = convert_model(model, ConvertConfig(to=to.value), out_dir, sample)
    except OnnxflowError as exc:
        _fail(str(exc))
    for name, figures in result.parity.items():
        typer.echo(
            f"✓ {name}: max abs diff {figures['max_abs']:.3g} against onnxruntime "
            f"({result.rows} rows of the {result.sample})"
        )
    if result.artifact_format in ("savedmodel", "tflite"):
        figures = result.figures
        typer.echo(
            f"✓ TensorFlow max abs diff {figures['parity_max_abs']['tensorflow']:.3g}, TFLite "
            f"{figures['parity_max_abs']['tflite']:.3g} against onnxruntime"
        )
        typer.echo(
            f"saved {Path(result.report_path).parent / 'tensorflow' / 'saved_model'} (SavedModel, "
            f"tf.saved_model.load(PATH).signatures['serving_default']) and "
            f"{figures['tflite_path']} (ai_edge_litert Interpreter)"
        )
        typer.echo(f"report: {result.report_path}    time: {result.seconds:.1f} s")
        return
    load = (
        "torch.export.load(PATH).module()"
        if result.artifact_format == "torch_export"
        else "torch.jit.load(PATH)"
    )
    typer.echo(
        f"saved {result.path} ({result.artifact_format}"
        f"{', dynamic batch' if result.dynamic_batch else ', fixed batch'}); load with {load}"
    )
    if result.fallback_reason:
        typer.echo(f"not a torch.export program because {result.fallback_reason}")
    typer.echo(f"report: {result.report_path}    time: {result.seconds:.1f} s")


class OnceOnlyCommand(TyperCommand):
    """A command whose single-value options may be given once: click would keep the last
    of ``--port 1 --port 2`` without a word, and a user who meant both loses one."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        single = {}
        for param in self.get_params(ctx):
            # typer ships its own click: look at the parameter, not at its class
            # (a flag counts too: --deploy --no-deploy cannot both be honoured)
            if getattr(param, "param_type_name", "") == "option" and not (
                param.multiple or param.count
            ):
                single.update(dict.fromkeys(param.opts + param.secondary_opts, param))
        seen: dict[str, str] = {}  # parameter -> the option name it was given as
        for arg in args:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            param = single.get(name)
            if param is None:
                continue
            if param.name in seen:
                raise typer.BadParameter(
                    "given more than once; it takes one value", ctx=ctx, param_hint=f"'{name}'"
                )
            seen[param.name] = name
        return super().parse_args(ctx, args)


def _refuse_repeated_options(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = OnceOnlyCommand
    for group in typer_app.registered_groups:
        _refuse_repeated_options(group.typer_instance)


_refuse_repeated_options(app)


def main() -> None:
    """The console entry: every failure ends with one ``error: ...`` line, not a traceback.

    SIGTERM unwinds the command like Ctrl-C, so whatever it started (a temporary Prefect
    server, an endpoint half-deployed) is stopped on the way out.
    """
    from onnxflow.processes import interrupt_on_sigterm, stop_with_make

    interrupt_on_sigterm()
    stop_with_make()
    try:
        app()  # click's standalone mode: usage errors, typer.Exit and Ctrl-C ("Aborted!")
    except Exception as exc:
        if _DEBUG["on"]:
            raise
        typer.secho(f"error: {_one_line(explain(exc))}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()

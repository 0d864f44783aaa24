"""Hyperparameter sweeps with Optuna: the study, a trial's settings, pruning, the outcome.

Plain functions and one small class, no Prefect. The sweep flow (:mod:`onnxflow.flows.sweep`)
runs the ask/tell loop of a :class:`TrialScheduler`: it asks for trials, trains each as a
task on the Dask cluster (:func:`run_trial`, in a worker process) and tells the scheduler
how each ended; the best trial's model then goes through the normal
export → simplify → validate → register chain.

The study lives in an Optuna storage that the flow and the workers share (a journal file
in the run's folder by default, any RDB URL for a remote cluster): a worker reports each
epoch's metric into it, and the median pruner compares it there with the other trials'.
A trial whose worker died is *lost*: the study records it as failed and the sweep goes
on with the others.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from onnxflow.config import (
    RECIPE_PARAM_PREFIX,
    ParamChoice,
    ParamRange,
    SweepConfig,
    Task,
    TrainConfig,
)
from onnxflow.errors import OnnxflowError, SweepError
from onnxflow.results import (
    EpochCallback,
    StepResult,
    SweepOutcome,
    TrainedModel,
    TrialResult,
)

if TYPE_CHECKING:  # optuna is imported where it is used
    import optuna

log = logging.getLogger(__name__)

Direction = Literal["maximize", "minimize"]
#: Trains one trial's model: (train settings, out_dir, on_epoch) -> the trained model.
Trainer = Callable[[TrainConfig, Path, EpochCallback], TrainedModel]


class StudyRef(StepResult):
    """What a worker needs to open the study: its name and the shared storage."""

    name: str
    storage: str
    direction: Direction
    metric: str


class TrialSpec(StepResult):
    """One asked trial, as the flow hands it to a worker."""

    number: int
    trial_id: int
    params: dict[str, Any]
    run_id: str
    """The trial's MLflow child run (created by the flow, so a lost trial can be closed)."""


def objective_metric(config: SweepConfig, task: Task) -> str:
    """The epoch metric trials are ranked on: the configured one, or the task's default."""
    if config.metric:
        return config.metric
    return "val_accuracy" if task == "classification" else "val_rmse"


def direction_of(metric: str) -> Direction:
    """Losses and errors are minimised, everything else (accuracy, r2, ...) maximised."""
    lowered = metric.lower()
    return "minimize" if lowered.endswith(("loss", "rmse", "mse", "mae", "error")) else "maximize"


def storage_url(config: SweepConfig, out_dir: Path) -> str:
    """The configured storage, or a journal file in the run's folder (absolute: workers
    may run in another working directory)."""
    if config.storage:
        return config.storage
    return str((out_dir / "optuna-journal.log").resolve())


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage for a URL (``sqlite:///``, ``postgresql://``), a journal file otherwise."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in url:
        return optuna.storages.RDBStorage(url)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


def make_pruner(config: SweepConfig) -> optuna.pruners.BasePruner:
    import optuna

    if not config.pruning:
        return optuna.pruners.NopPruner()
    # epochs are reported as steps 1, 2, ...; Optuna prunes from step n_warmup_steps on
    return optuna.pruners.MedianPruner(
        n_startup_trials=config.prune_after_trials,
        n_warmup_steps=config.prune_warmup_epochs + 1,
    )


def create_study(config: SweepConfig, ref: StudyRef) -> optuna.Study:
    import optuna

    sampler = (
        optuna.samplers.TPESampler(seed=config.seed)
        if config.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=config.seed)
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=ref.name,
        storage=open_storage(ref.storage),
        sampler=sampler,
        pruner=make_pruner(config),
        direction=ref.direction,
    )


def suggest(trial: optuna.Trial, space: dict[str, ParamRange | ParamChoice]) -> dict[str, Any]:
    """One value per setting of the space, as the train section takes it."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, ParamChoice):
            # Optuna's choices are scalars: a list (hidden_sizes) travels as its JSON text
            labels = [json.dumps(c) for c in spec.choices]
            params[name] = json.loads(trial.suggest_categorical(name, labels))
        elif _is_integer(name, spec):
            params[name] = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
        else:
            params[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    return params


def _is_integer(name: str, spec: ParamRange) -> bool:
    """Integer train settings (epochs, batch_size); a recipe's parameter when both bounds
    are integers in the YAML (``{low: 16, high: 128}``)."""
    if name.startswith(RECIPE_PARAM_PREFIX):
        return isinstance(spec.low, int) and isinstance(spec.high, int)
    return TrainConfig.model_fields[name].annotation is int


def trial_train_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The train section with a trial's values on top, validated as the YAML would be;
    ``params.width`` goes into ``train.params`` beside the recipe parameters already there."""
    settings = {k: v for k, v in params.items() if not k.startswith(RECIPE_PARAM_PREFIX)}
    recipe = {
        k[len(RECIPE_PARAM_PREFIX) :]: v
        for k, v in params.items()
        if k.startswith(RECIPE_PARAM_PREFIX)
    }
    return TrainConfig.model_validate(
        {**base.model_dump(), **settings, "params": {**base.params, **recipe}}
    )


def run_trial(
    trainer: Trainer,
    base: TrainConfig,
    spec: TrialSpec,
    study: StudyRef,
    config: SweepConfig,
    out_dir: Path,
    log_epoch: EpochCallback,
) -> TrialResult:
    """Train one trial; every epoch goes to ``log_epoch`` and to the pruner. Pruned and
    failed trials are results too (the flow tells the study); only a dead worker raises."""
    import optuna

    train_config = trial_train_config(base, spec.params)
    reported: dict[int, float] = {}
    trial = optuna.Trial(_load_study(study, config), spec.trial_id)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        log_epoch(epoch, metrics)
        if study.metric not in metrics:
            return
        reported[epoch] = float(metrics[study.metric])
        trial.report(reported[epoch], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"epoch {epoch}: {study.metric} {reported[epoch]:.4g} trails the median"
            )

    started = time.perf_counter()

    def result(state: str, **figures: Any) -> TrialResult:
        return TrialResult(
            number=spec.number,
            params=spec.params,
            run_id=spec.run_id,
            state=state,
            epochs=len(reported),
            seconds=time.perf_counter() - started,
            **figures,
        )

    try:
        trained = trainer(train_config, out_dir, on_epoch)
    except optuna.TrialPruned as exc:
        return result("pruned", value=reported[max(reported)] if reported else None, note=str(exc))
    except OnnxflowError as exc:  # diverged, bad settings: this trial's fault, not the sweep's
        return result("failed", note=str(exc))
    value = trained.metrics.get(study.metric)
    if value is None:
        raise SweepError(
            f"sweep.metric {study.metric!r} is not an epoch metric of this model; it "
            f"reports: {', '.join(sorted(trained.metrics))}"
        )
    return result("complete", value=float(value), trained=trained)


def _load_study(ref: StudyRef, config: SweepConfig) -> optuna.Study:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(
        study_name=ref.name, storage=open_storage(ref.storage), pruner=make_pruner(config)
    )


def lost_result(spec: TrialSpec, reason: str) -> TrialResult:
    """A trial whose worker died (or whose future was cancelled) before it returned."""
    return TrialResult(
        number=spec.number, params=spec.params, run_id=spec.run_id, state="lost", note=reason
    )


def future_result(future: Any, spec: TrialSpec) -> tuple[TrialResult, bool]:
    """The result of a trial's future and whether the task returned it (then it also closed
    the trial's run). A dead worker or a cancelled future makes the trial lost; any other
    error (the task raised) failed."""
    from onnxflow.dask_cluster import is_lost

    try:
        return future.result(), True
    except Exception as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        if is_lost(exc):
            return lost_result(spec, reason), False
        failed = TrialResult(
            number=spec.number, params=spec.params, run_id=spec.run_id, state="failed", note=reason
        )
        return failed, False


def tell(study: optuna.Study, result: TrialResult) -> None:
    """Record how a trial ended: its value, pruned, or failed (lost trials count as failed)."""
    from optuna.trial import TrialState

    if result.state == "complete":
        study.tell(result.number, result.value)
    elif result.state == "pruned":
        study.tell(result.number, state=TrialState.PRUNED)
    else:
        study.tell(result.number, state=TrialState.FAIL)


def best_trial(results: Iterable[TrialResult], direction: Direction) -> TrialResult | None:
    """The completed trial with the best value (the earliest among equals), or None."""
    complete = [r for r in results if r.state == "complete" and r.value is not None]
    if not complete:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(complete, key=lambda r: (sign * r.value, r.number))


def summary_line(results: Iterable[TrialResult]) -> str:
    """``8 trials: 5 complete, 2 pruned, 1 lost (#3)``."""
    results = list(results)
    counts = {}
    for r in results:
        counts.setdefault(r.state, []).append(r.number)
    parts = []
    for state in ("complete", "pruned", "failed", "lost"):
        if state in counts:
            numbers = (
                f" (#{', #'.join(map(str, counts[state]))})" if state in ("failed", "lost") else ""
            )
            parts.append(f"{len(counts[state])} {state}{numbers}")
    return f"{len(results)} trials: " + ", ".join(parts)


class TrialScheduler:
    """The ask/tell loop of a sweep, apart from how its trials run: ask for trials while
    fewer than ``parallel`` are running and the budget of ``config.trials`` lasts, tell it
    how each ended (in any order), then take the :meth:`outcome`."""

    def __init__(self, study: optuna.Study, ref: StudyRef, config: SweepConfig, parallel: int):
        self.study, self.ref, self.config, self.parallel = study, ref, config, parallel
        self.asked = 0
        self.results: list[TrialResult] = []

    @property
    def running(self) -> int:
        return self.asked - len(self.results)

    @property
    def can_ask(self) -> bool:
        return self.asked < self.config.trials and self.running < self.parallel

    @property
    def done(self) -> bool:
        return self.asked >= self.config.trials and self.running == 0

    def ask(self, run_for: Callable[[int, dict[str, Any]], str]) -> TrialSpec:
        """The next trial's settings from the study; ``run_for(number, params)`` opens its
        MLflow run and returns the run id."""
        trial = self.study.ask()
        params = suggest(trial, self.config.space)
        self.asked += 1
        return TrialSpec(  # a worker reopens the trial by its storage id
            number=trial.number,
            trial_id=trial._trial_id,
            params=params,
            run_id=run_for(trial.number, params),
        )

    def tell(self, result: TrialResult) -> None:
        tell(self.study, result)
        self.results.append(result)

    def outcome(self) -> SweepOutcome:
        """Every trial told so far, by number, and the best of them."""
        trials = sorted(self.results, key=lambda r: r.number)
        return SweepOutcome(
            study=self.ref.name,
            metric=self.ref.metric,
            direction=self.ref.direction,
            trials=trials,
            best=best_trial(trials, self.ref.direction),
        )


def require_best(outcome: SweepOutcome) -> TrialResult:
    """The best trial, or a :class:`SweepError` saying how every trial ended."""
    best = outcome.best
    if best is None or best.trained is None:
        results = outcome.trials
        raise SweepError(
            f"No trial of the sweep completed ({summary_line(results)}); "
            + "; ".join(f"#{r.number}: {r.note}" for r in results if r.note)[:2000]
        )
    return best


def log_outcome(run_id: str, outcome: SweepOutcome, out: Path) -> None:
    """The outcome into the sweep's MLflow run: ``sweep.json``, tags, the best trial's
    value and settings."""
    from onnxflow import tracking

    out.mkdir(parents=True, exist_ok=True)
    path = out / "sweep.json"
    path.write_text(outcome.model_dump_json(indent=2, exclude={"trials": {"__all__": {"trained"}}}))
    tracking.log_artifact_file(run_id, path)
    tags = {
        "sweep_trials": str(len(outcome.trials)),
        "sweep_lost": ",".join(str(t.number) for t in outcome.lost) or "none",
        "sweep_summary": summary_line(outcome.trials),
    }
    if outcome.best is not None:
        tags["sweep_best_trial"] = str(outcome.best.number)
        tags["sweep_best_run_id"] = outcome.best.run_id
        tracking.log_metrics(run_id, {f"best_{outcome.metric}": outcome.best.value})
        tracking.log_params(
            run_id, {f"best.{k}": json.dumps(v) for k, v in outcome.best.params.items()}
        )
    tracking.set_tags(run_id, tags)


def trials_markdown(outcome: SweepOutcome | None) -> str:
    """The trials as a Markdown table for the run's summary artifact ("" without a sweep)."""
    if outcome is None:
        return ""
    lines = [
        f"**Sweep** `{outcome.study}` ({outcome.metric}, {outcome.direction}): "
        f"{summary_line(outcome.trials)}\n",
        "| trial | state | value | epochs | settings | note |",
        "|---|---|---|---|---|---|",
    ]
    for t in outcome.trials:
        best = " (best)" if outcome.best and t.number == outcome.best.number else ""
        value = f"{t.value:.4g}" if t.value is not None else "-"
        lines.append(
            f"| {t.number}{best} | {t.state} | {value} | {t.epochs} | "
            f"{json.dumps(t.params)} | {(t.note or '')[:120]} |"
        )
    return "\n".join(lines) + "\n"

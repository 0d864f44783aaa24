"""The sweep's logic without Prefect or Dask: the search space from the YAML, a trial's
settings, the ask/tell loop, pruning on epoch metrics, the best trial, lost-trial accounting."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from onnxflow.config import PipelineConfig, SweepConfig, TrainConfig
from onnxflow.errors import SweepError
from onnxflow.results import TrainedModel, TrialResult
from onnxflow.sweep import (
    StudyRef,
    TrialScheduler,
    TrialSpec,
    best_trial,
    create_study,
    direction_of,
    lost_result,
    objective_metric,
    require_best,
    run_trial,
    storage_url,
    suggest,
    summary_line,
    tell,
    trial_train_config,
)

SPACE = {
    "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
    "hidden_sizes": {"choices": [[64], [128, 64]]},
    "epochs": {"low": 3, "high": 9},
    "batch_size": {"choices": [32, 64]},
}


def test_search_space_from_the_yaml_section():
    config = PipelineConfig.model_validate({"sweep": {"trials": 5, "space": SPACE}})
    assert config.sweep.trials == 5
    assert set(config.sweep.space) == set(SPACE)
    assert config.sweep.space["hidden_sizes"].choices == [[64], [128, 64]]
    assert config.sweep.space["learning_rate"].log
    # the defaults: a space over the learning rate, widths and batch size
    assert {"learning_rate", "hidden_sizes", "batch_size"} <= set(SweepConfig().space)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lr": {"low": 1e-4, "high": 1e-2}}, "train section does not have; known settings"),
        ({"hidden_sizes": {"low": 1, "high": 4}}, "hidden_sizes is not a number"),
        ({"epochs": {"low": 0, "high": 5}}, "epochs: 0"),
        ({"epochs": {"low": 5, "high": 5}}, "must be below high"),
        ({"epochs": {"low": 1.5, "high": 5}}, "integer setting"),
        ({"learning_rate": {"low": 0, "high": 1, "log": True}}, "log range needs low > 0"),
        ({"batch_size": {"choices": []}}, "at least 1 item"),
        ({"batch_size": {"choices": [0, 32]}}, "batch_size: 0 is not valid"),
    ],
)
def test_a_bad_search_space_names_the_setting_and_the_problem(space, message):
    with pytest.raises(ValidationError, match=message):
        SweepConfig.model_validate({"space": space})


def test_metric_and_direction():
    assert objective_metric(SweepConfig(), "classification") == "val_accuracy"
    assert objective_metric(SweepConfig(), "regression") == "val_rmse"
    assert objective_metric(SweepConfig(metric="val_loss"), "classification") == "val_loss"
    assert direction_of("val_accuracy") == "maximize"
    assert direction_of("val_loss") == direction_of("val_rmse") == "minimize"


def study_ref(tmp_path, direction="maximize") -> StudyRef:
    return StudyRef(
        name="test",
        storage=storage_url(SweepConfig(), tmp_path),
        direction=direction,
        metric="val_accuracy",
    )


def test_trial_settings_come_from_the_space_and_fit_the_train_section(tmp_path):
    config = SweepConfig.model_validate({"space": SPACE})
    study = create_study(config, study_ref(tmp_path))
    seen = []
    for _ in range(6):
        trial = study.ask()
        params = suggest(trial, config.space)
        train = trial_train_config(TrainConfig(seed=7), params)
        assert 1e-4 <= train.learning_rate <= 1e-2
        assert train.hidden_sizes in ((64,), (128, 64))
        assert isinstance(train.epochs, int) and 3 <= train.epochs <= 9
        assert train.batch_size in (32, 64) and train.seed == 7  # the rest from train:
        seen.append(params)
        study.tell(trial, params["learning_rate"])
    assert len({p["learning_rate"] for p in seen}) == 6


def test_best_trial_follows_the_direction_and_ignores_unfinished():
    trials = [
        TrialResult(number=0, params={}, state="complete", run_id="a", value=0.91),
        TrialResult(number=1, params={}, state="pruned", run_id="b", value=0.99),
        TrialResult(number=2, params={}, state="complete", run_id="c", value=0.95),
        TrialResult(number=3, params={}, state="lost", run_id="d"),
        TrialResult(number=4, params={}, state="complete", run_id="e", value=0.95),
    ]
    assert best_trial(trials, "maximize").number == 2  # the earliest of equals
    assert best_trial(trials, "minimize").number == 0
    assert best_trial(trials[1:2] + trials[3:4], "maximize") is None
    assert summary_line(trials) == "5 trials: 3 complete, 1 pruned, 1 lost (#3)"


def fake_trainer(curve: list[float]):
    """A trainer that reports ``curve`` as val_accuracy, one value per epoch (the real
    frameworks' training loops call on_epoch the same way; tests/integration trains them)."""

    def train(config: TrainConfig, out_dir, on_epoch) -> TrainedModel:
        for epoch, value in enumerate(curve[: config.epochs], start=1):
            on_epoch(epoch, {"val_accuracy": value, "val_loss": 1 - value})
        return TrainedModel(
            framework="torch",
            path=out_dir / "model.pt2",
            metrics={"val_accuracy": curve[config.epochs - 1]},
            params={},
            train_seconds=0.0,
        )

    return train


def test_pruning_stops_a_trial_that_trails_the_median_and_lost_trials_count_as_failed(
    tmp_path,
):
    from optuna.trial import TrialState

    config = SweepConfig(prune_after_trials=1, prune_warmup_epochs=1)
    ref = study_ref(tmp_path)
    study = create_study(config, ref)
    logged: list[tuple[int, float]] = []
    base = TrainConfig(epochs=5)

    def run(curve):
        trial = study.ask()
        spec = TrialSpec(number=trial.number, trial_id=trial._trial_id, params={}, run_id="r")
        result = run_trial(
            fake_trainer(curve),
            base,
            spec,
            ref,
            config,
            tmp_path,
            lambda e, m: logged.append((e, m["val_accuracy"])),
        )
        tell(study, result)
        return result

    good = run([0.5, 0.7, 0.8, 0.9, 0.95])
    assert good.state == "complete" and good.value == 0.95 and good.epochs == 5
    bad = run([0.4, 0.3, 0.2, 0.1, 0.1])
    assert bad.state == "pruned" and bad.epochs == 2, bad  # warm-up epoch 1, stopped at 2
    assert "trails the median" in bad.note and bad.value == 0.3
    assert logged[-1] == (2, 0.3), "every epoch is logged, the pruned one too"

    trial = study.ask()
    spec = TrialSpec(number=trial.number, trial_id=trial._trial_id, params={}, run_id="x")
    lost = lost_result(spec, "KilledWorker: worker tcp://127.0.0.1:1 died")
    tell(study, lost)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert best_trial([good, bad, lost], "maximize") == good


def test_the_scheduler_asks_while_slots_are_free_and_tells_in_any_order(tmp_path):
    """3 trials, 2 at a time: a third is asked only once one is told; results told out of
    order come back by number, the best one chosen, and the study records each state."""
    from optuna.trial import TrialState

    config = SweepConfig(trials=3, space={"learning_rate": {"low": 1e-4, "high": 1e-2}})
    ref = study_ref(tmp_path)
    scheduler = TrialScheduler(create_study(config, ref), ref, config, parallel=2)
    runs: list[tuple[int, dict]] = []

    def run_for(number, params):
        runs.append((number, params))
        return f"run-{number}"

    first, second = scheduler.ask(run_for), scheduler.ask(run_for)
    assert not scheduler.can_ask and not scheduler.done
    assert (first.number, first.run_id) == (0, "run-0")
    assert runs == [(0, first.params), (1, second.params)]
    assert 1e-4 <= first.params["learning_rate"] <= 1e-2

    def told(spec, state, value=None):
        return TrialResult(
            number=spec.number, params=spec.params, run_id=spec.run_id, state=state, value=value
        )

    scheduler.tell(told(second, "complete", 0.7))
    third = scheduler.ask(run_for)
    assert not scheduler.can_ask, "the budget of 3 trials is spent"
    scheduler.tell(lost_result(third, "KilledWorker"))
    assert not scheduler.done, "trial 0 still runs"
    scheduler.tell(told(first, "complete", 0.9))
    assert scheduler.done

    outcome = scheduler.outcome()
    assert [t.number for t in outcome.trials] == [0, 1, 2]
    assert outcome.best.number == 0 and outcome.lost == [outcome.trials[2]]
    states = [t.state for t in scheduler.study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    with pytest.raises(SweepError, match=r"No trial of the sweep completed \(3 trials"):
        require_best(outcome)  # completed, but this fake trial carries no trained model


# -- a recipe's own parameters (train.params) in the space ---------------------------------


def test_a_recipes_parameters_are_swept_as_params_names(tmp_path):
    config = SweepConfig.model_validate(
        {
            "space": {
                "params.width": {"choices": [32, 64]},
                "params.depth": {"low": 1, "high": 3},
                "params.dropout": {"low": 0.1, "high": 0.5},
                "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
            }
        }
    )
    study = create_study(config, study_ref(tmp_path))
    base = TrainConfig(params={"width": 16, "activation": "relu"}, epochs=4)
    for _ in range(4):
        trial = study.ask()
        params = suggest(trial, config.space)
        assert isinstance(params["params.depth"], int) and 1 <= params["params.depth"] <= 3
        assert isinstance(params["params.dropout"], float)
        train = trial_train_config(base, params)
        assert train.params["width"] in (32, 64) and train.params["activation"] == "relu"
        assert train.params["depth"] == params["params.depth"] and train.epochs == 4
        assert 1e-4 <= train.learning_rate <= 1e-2
        study.tell(trial, 0.5)
    assert base.params == {"width": 16, "activation": "relu"}, "the base is not changed"


def test_the_params_section_from_yaml_is_empty_by_default():
    assert TrainConfig().params == {}
    config = PipelineConfig.model_validate({"train": {"params": {"width": 64}}})
    assert config.train.params == {"width": 64}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"widht": {"choices": [1, 2]}}, r"widht, which the train section.*params\.NAME"),
        ({"params": {"choices": [{"width": 3}]}}, "params, which the train section"),
        ({"params.": {"choices": [1]}}, r"needs a parameter name \(params.width\)"),
    ],
)
def test_unknown_names_still_fail_with_recipe_params_allowed(space, message):
    with pytest.raises(ValidationError, match=message):
        SweepConfig.model_validate({"space": space})

"""Recipes: bad recipes fail early with one clear error, and a recipe goes through the whole
chain (data → train → export → simplify → validate → register → promote → serve)."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from onnxflow.arrays import NamedArrays, prepare_arrays
from onnxflow.config import DataConfig, ExportConfig, PipelineConfig, TrainConfig
from onnxflow.errors import OnnxflowError, RecipeError
from onnxflow.recipes import load_recipe, with_recipe_defaults
from onnxflow.recipes.steps import train_recipe

ROOT = Path(__file__).resolve().parents[1]
TEXT_RECIPE = ROOT / "examples" / "text" / "recipe.py"


def _recipe(tmp_path: Path, body: str, name: str = "recipe.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """Two float inputs of 4 values, three classes, 60 rows."""
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3

    def split(rows):
        return {
            "a": rng.normal(size=(rows, 4)).astype(np.float32),
            "b": rng.normal(size=(rows, 4)).astype(np.float32),
            "label": labels[:rows],
        }

    data = NamedArrays(train=split(42), validation=split(9), test=split(9), name="small")
    return prepare_arrays(data, DataConfig(), tmp_path_factory.mktemp("small"))


HEAD = """
import torch

class Net(torch.nn.Module):
    def __init__(self, n_out=3):
        super().__init__()
        self.linear = torch.nn.Linear(8, n_out)

    def forward(self, a, b):
        return self.linear(torch.cat([a, b], dim=1))
"""


def test_a_good_recipe_trains_with_its_own_fit(tmp_path, small_dataset):
    path = _recipe(
        tmp_path,
        HEAD
        + """
def build_model(info):
    assert info.input_names == ("a", "b") and info.n_classes == 3
    return Net()

def fit(model, data, config, on_epoch):
    assert config.device == "cpu"  # auto, resolved: this machine has no GPU
    for epoch in range(1, 3):
        on_epoch(epoch, {"custom_loss": 1.0 / epoch})
    return model
""",
    )
    epochs = []
    trained = train_recipe(
        str(path),
        small_dataset,
        TrainConfig(device="auto"),
        tmp_path / "out",
        on_epoch=lambda e, m: epochs.append((e, m)),
    )
    assert trained.framework == "torch" and trained.path.name == "model.pt2"
    assert trained.params["train_device"] == "cpu" and trained.params["own_fit"] == "true"
    assert epochs == [(1, {"custom_loss": 1.0}), (2, {"custom_loss": 0.5})]


@pytest.mark.parametrize(
    "body, message",
    [
        ("import torch\n", r"recipe.py: no build_model\(info\) function"),
        (
            "def build_model():\n    pass\n",
            r"recipe.py: build_model\(\) cannot be called as build_model\(info\)",
        ),
        (
            "def build_model(info):\n    pass\ndef fit(model):\n    pass\n",
            r"recipe.py: fit\(model\) cannot be called as fit\(model, data, config, on_epoch\)",
        ),
        (
            "import nonexistent_module_xyz\n",
            r"recipe.py: importing the recipe raised "
            r"ModuleNotFoundError",
        ),
    ],
)
def test_broken_recipes_are_refused_when_loaded(tmp_path, body, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe(tmp_path, body))


@pytest.mark.parametrize(
    "body, message",
    [
        (
            HEAD + "def build_model(info):\n    return {'not': 'a model'}\n",
            r"recipe.py: build_model\(info\) returned builtins.dict, expected a torch.nn.Module or "
            r"a keras.Model",
        ),
        (
            HEAD + "def build_model(info):\n    raise ValueError('boom')\n",
            r"recipe.py: build_model\(info\) raised ValueError: boom",
        ),
        (
            HEAD + "def build_model(info):\n    return Net(n_out=5)\n",
            r"recipe.py: the model from build_model\(info\) returns shape \[2, 5\] for 2 rows; "
            r"expected class scores of shape \[2, 3\]",
        ),
        (
            HEAD + "def build_model(info):\n    return torch.nn.Linear(4, 3)\n",
            r"recipe.py: build_model\(info\) returned a model whose forward\(\) takes "
            r"\(input\), but the data's inputs are \(a, b\)",
        ),
        (
            HEAD + "def build_model(info):\n    net = Net()\n    net.linear = torch.nn.Linear(5, 3)"
            "\n    return net\n",
            r"recipe.py: the model from build_model\(info\) fails on two training rows",
        ),
        (
            HEAD
            + """
class Branchy(Net):
    def forward(self, a, b):
        out = super().forward(a, b)
        if out.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return out
        return -out

def build_model(info):
    return Branchy()
""",
            r"recipe.py: the model from build_model\(info\) cannot be exported: torch.export "
            r"cannot capture the model: \w+",
        ),
        (
            HEAD
            + """
def build_model(info):
    return Net()

def fit(model, data, config, on_epoch):
    return "trained"
""",
            r"recipe.py: fit\(...\) returned a str, expected the torch model",
        ),
    ],
)
def test_bad_models_fail_with_the_recipe_and_function_named(tmp_path, small_dataset, body, message):
    epochs = []
    with pytest.raises(RecipeError, match=message):
        train_recipe(
            str(_recipe(tmp_path, body)),
            small_dataset,
            TrainConfig(epochs=1),
            tmp_path / "out",
            on_epoch=lambda e, m: epochs.append(e),
        )
    assert not epochs  # found before any training
    assert not (tmp_path / "out" / "model.pt2").exists()


def test_cuda_asked_for_without_a_gpu_is_an_error(tmp_path, small_dataset):
    from onnxflow.errors import TrainingError

    path = _recipe(tmp_path, HEAD + "def build_model(info):\n    return Net()\n")
    with pytest.raises(TrainingError, match="train.device is cuda but torch sees no CUDA"):
        train_recipe(
            str(path), small_dataset, TrainConfig(device="cuda", epochs=1), tmp_path / "out"
        )


def test_recipe_defaults_fill_only_what_the_config_leaves_unset():
    config = PipelineConfig.model_validate({"recipe": str(TEXT_RECIPE), "train": {"epochs": 2}})
    merged = with_recipe_defaults(config)
    assert merged.train.epochs == 2  # set by the user: kept
    assert merged.train.batch_size == 64  # from the recipe's DEFAULTS
    assert merged.register_.model_name == "tokens"


def test_build_model_and_fit_receive_the_recipes_parameters(tmp_path, small_dataset):
    from onnxflow.recipes.steps import recipe_tags

    path = _recipe(
        tmp_path,
        HEAD
        + """
def build_model(info, params):
    assert params == {"width": 7, "tag": "x"}, params
    return Net(n_out=info.n_classes)

def fit(model, data, config, on_epoch):
    assert config.params["width"] == 7
    on_epoch(1, {"val_accuracy": 0.5})
    return model
""",
    )
    trained = train_recipe(
        str(path), small_dataset, TrainConfig(params={"width": 7, "tag": "x"}), tmp_path / "out"
    )
    assert trained.params["param.width"] == "7" and trained.metrics == {"val_accuracy": 0.5}
    tags = recipe_tags(trained, small_dataset.info)
    assert tags["recipe_param.width"] == "7" and tags["recipe_param.tag"] == '"x"'


def test_parameters_nothing_can_receive_are_refused(tmp_path, small_dataset):
    path = _recipe(tmp_path, HEAD + "def build_model(info):\n    return Net()\n")
    with pytest.raises(RecipeError, match=r"train.params \['width'\] are set, but neither"):
        train_recipe(str(path), small_dataset, TrainConfig(params={"width": 3}), tmp_path / "o")
    # without parameters a one-argument build_model works as before
    load_recipe(path)
    bad = _recipe(tmp_path, "def build_model(info, params, more):\n    pass\n", "bad.py")
    with pytest.raises(RecipeError, match=r"or build_model\(info, params\)"):
        load_recipe(bad)


def test_recipe_default_parameters_merge_one_by_one(tmp_path):
    path = _recipe(
        tmp_path,
        HEAD
        + """
DEFAULTS = {"train": {"epochs": 2, "params": {"width": 16, "depth": 2}}}

def build_model(info, params):
    return Net()
""",
    )
    config = PipelineConfig.model_validate(
        {"recipe": str(path), "train": {"params": {"width": 64}}}
    )
    merged = with_recipe_defaults(config)
    assert merged.train.params == {"width": 64, "depth": 2} and merged.train.epochs == 2


# -- the whole chain, on a tiny slice of the text example ---------------------------------


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def test_bad_recipe_through_the_flow_registers_nothing(prefect_harness, mlflow_store, tmp_path):
    from mlflow import MlflowClient

    from onnxflow.flows.pipeline import run

    path = _recipe(tmp_path, "def build_model(info):\n    return 42\n")
    config = PipelineConfig.model_validate({"recipe": str(path), "register": {"model_name": "x"}})
    with pytest.raises(
        OnnxflowError,
        match=r"recipe.py: build_model\(info\) returned "
        r"builtins.int",
    ):
        run(config=config, out_dir=tmp_path / "run")
    assert MlflowClient().search_registered_models() == []


@pytest.mark.integration
@pytest.mark.timeout(480)
def test_text_recipe_is_registered_served_and_answers_tritonclient(
    prefect_harness, mlflow_store, tmp_path
):
    """The text example (two int64 inputs) on a tiny slice: registered with parity and
    accuracy tags, served, and answering V2 requests from tritonclient and /invocations."""
    import importlib.util

    from mlflow import MlflowClient

    from onnxflow.flows.pipeline import run

    spec = importlib.util.spec_from_file_location("text_recipe", TEXT_RECIPE)
    text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(text)
    data = text.generate(tmp_path / "tiny.npz", rows=240)
    config = with_recipe_defaults(
        PipelineConfig.model_validate(
            {
                "recipe": str(TEXT_RECIPE),
                "data": {"path": str(data)},
                "train": {"epochs": 2},
                "validate": {"latency_repeats": 3},
                "register": {"model_name": "tokens-tiny"},
            }
        )
    )
    started = time.perf_counter()
    result = run(config=config, out_dir=tmp_path / "run")
    chain = result.chains[0]
    tags = chain.version.tags
    assert chain.framework == "torch"
    assert float(tags["parity_max_abs"]) <= 1e-4
    assert tags["metric_name"] == "accuracy" and 0 <= float(tags["accuracy"]) <= 1
    assert tags["reference_device"] == "cpu" and tags["train_device"] == "cpu"
    assert tags["inputs"] == "ids int64 [batch, 24]; mask int64 [batch, 24]"
    assert tags["recipe"] == str(TEXT_RECIPE)
    assert result.promotion.decision == "promoted"
    assert (
        str(MlflowClient().get_model_version_by_alias("tokens-tiny", "champion").version)
        == chain.version.version
    )
    print(f"chain took {time.perf_counter() - started:.1f} s")

    with np.load(data) as npz:
        rows = {"ids": npz["ids"][:5], "mask": npz["mask"][:5]}
    meta = serve_and_ask("tokens-tiny", chain.simplified.path, rows, tmp_path)
    assert meta["inputs"] == [
        {"name": "ids", "datatype": "INT64", "shape": [-1, 24]},
        {"name": "mask", "datatype": "INT64", "shape": [-1, 24]},
    ]


def serve_and_ask(
    model_name: str, onnx_path: Path, rows: dict[str, np.ndarray], tmp_path: Path
) -> dict:
    """Serve ``model_name@champion``; tritonclient (binary V2) and /invocations must answer
    what onnxruntime computes from ``onnx_path``. Returns the V2 model metadata."""
    import httpx
    import onnxruntime as ort
    import tritonclient.http as triton

    from onnxflow.processes import free_port
    from onnxflow.serving.launcher import start_background, stop_background, wait_ready
    from onnxflow.serving.settings import ServingSettings

    datatypes = {"float32": "FP32", "int64": "INT64"}
    expected = ort.InferenceSession(str(onnx_path)).run(None, rows)[0]
    settings = ServingSettings(
        model=f"{model_name}@champion", port=free_port(), cache_dir=tmp_path / "cache"
    )
    info = start_background(settings, tmp_path / "endpoint")
    try:
        wait_ready(info, timeout_s=120)
        client = triton.InferenceServerClient(info.url.removeprefix("http://"))
        meta = client.get_model_metadata(model_name)
        inputs = []
        for name, array in rows.items():
            inputs.append(triton.InferInput(name, list(array.shape), datatypes[str(array.dtype)]))
            inputs[-1].set_data_from_numpy(array, binary_data=True)
        answer = client.infer(model_name, inputs).as_numpy("probabilities")
        np.testing.assert_allclose(answer, expected, atol=1e-6)
        response = httpx.post(
            f"{info.url}/invocations",
            timeout=30,
            json={"inputs": {k: v.tolist() for k, v in rows.items()}},
        )
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        if isinstance(predictions, dict):  # MLflow's format names the outputs
            predictions = predictions["probabilities"]
        np.testing.assert_allclose(np.asarray(predictions), expected, atol=1e-5)
        return meta
    finally:
        stop_background(tmp_path / "endpoint")


# -- the examples full size: the accuracy goal (make test-all) ----------------------------


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("example", ["images", "text", "keras_tabular"])
def test_example_full_size_reaches_90_percent_and_is_served(
    prefect_harness, mlflow_store, tmp_path, example
):
    from onnxflow.arrays import read_split
    from onnxflow.flows.pipeline import run

    recipe = ROOT / "examples" / example / "recipe.py"
    name = f"full-{example.replace('_', '-')}"
    config = with_recipe_defaults(
        PipelineConfig.model_validate({"recipe": str(recipe), "register": {"model_name": name}})
    )
    result = run(config=config, out_dir=tmp_path / "run")
    chain = result.chains[0]
    tags = chain.version.tags
    print(
        f"{example}: accuracy {tags['accuracy']}, parity {tags['parity_max_abs']}, "
        f"train {chain.trained.train_seconds:.0f} s"
    )
    assert float(tags["accuracy"]) >= 0.90
    assert float(tags["parity_max_abs"]) <= 1e-4
    assert tags["validation"] == "passed"
    from onnxflow.arrays import ArrayDataset, read_dataset_info

    data_dir = tmp_path / "run" / "data"
    dataset = ArrayDataset(path=data_dir / "splits.npz", info=read_dataset_info(data_dir))
    inputs, _ = read_split(dataset, "test")
    serve_and_ask(name, chain.simplified.path, {k: v[:4] for k, v in inputs.items()}, tmp_path)


def test_an_operator_the_onnx_exporter_cannot_handle_is_named_with_its_message(
    tmp_path, small_dataset
):
    """torch.export captures eigvalsh; the ONNX exporter has no translation for it: the error
    names the recipe, the function and carries the exporter's own message."""
    from onnxflow.config import ExportConfig
    from onnxflow.errors import ExportError
    from onnxflow.recipes.steps import export_recipe

    path = _recipe(
        tmp_path,
        HEAD
        + """
class Eigen(Net):
    def forward(self, a, b):
        x = torch.cat([a, b], dim=1)
        values = torch.linalg.eigvalsh(x[:, :4, None] * x[:, None, :4] + torch.eye(4))
        return self.linear(x) + values[:, :3]

def build_model(info):
    return Eigen()
""",
    )
    trained = train_recipe(str(path), small_dataset, TrainConfig(epochs=1), tmp_path / "train")
    with pytest.raises(
        ExportError,
        match=r"recipe.py: torch.onnx.export\(dynamo=True\) cannot "
        r"export the model from build_model\(info\): ConversionError",
    ) as caught:
        export_recipe(trained, small_dataset.info, ExportConfig(), tmp_path / "export")
    assert "eigh" in str(caught.value)  # the operator, in the exporter's own words
    assert not (tmp_path / "export" / "model.onnx").exists()


# -- sweeping a recipe, its own parameters included -----------------------------------------

SWEPT_RECIPE = """
import numpy as np
import torch

DEFAULTS = {"register": {"model_name": "swept"}}

def load_data(config):
    rng = np.random.default_rng(0)

    def split(rows):
        labels = np.arange(rows) % 3
        x = rng.normal(size=(rows, 6)).astype(np.float32) + labels[:, None] * 2.0
        return {"x": x.astype(np.float32), "label": labels}

    return {"train": split(90), "validation": split(30), "test": split(30),
            "classes": ["a", "b", "c"]}

def build_model(info, params):
    width = params.get("width", 8)
    return torch.nn.Sequential(
        torch.nn.Linear(6, width), torch.nn.ReLU(), torch.nn.Linear(width, info.n_classes)
    )
"""


def swept_recipe_config(tmp_path: Path, trials: int, **sweep) -> PipelineConfig:
    path = _recipe(tmp_path, SWEPT_RECIPE, "swept.py")
    config = PipelineConfig.model_validate(
        {
            "recipe": str(path),
            "train": {"epochs": 2, "batch_size": 16, "params": {"width": 8}},
            "validate": {"latency_repeats": 3, "max_accuracy_drop": 0.05},
            "sweep": {
                "trials": trials,
                "space": {
                    "params.width": {"choices": [4, 16]},
                    "learning_rate": {"low": 1e-3, "high": 3e-2, "log": True},
                },
                "pruning": False,
                **sweep,
            },
        }
    )
    return with_recipe_defaults(config)


def assert_best_trial_registered(chain, n_trials: int) -> None:
    from mlflow import MlflowClient

    outcome = chain.sweep
    assert len(outcome.trials) == n_trials and outcome.best is not None, outcome
    assert all(t.state == "complete" for t in outcome.trials), outcome.trials
    assert outcome.best.value == max(t.value for t in outcome.trials)
    client = MlflowClient()
    version = client.get_model_version("swept", chain.version.version)
    assert version.tags["validation"] == "passed" and version.tags["recipe"].endswith("swept.py")
    width = outcome.best.params["params.width"]
    assert version.tags["recipe_param.width"] == str(width), "the best trial's own parameter"
    assert chain.trained.path == outcome.best.trained.path
    parent = client.get_run(version.run_id)
    assert parent.data.params["best.params.width"] == str(width)
    assert parent.data.tags["source_framework"] == "recipe"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == n_trials
    for run in children:
        assert run.data.tags["trial_state"] == "complete" and run.info.status == "FINISHED"
        assert "train.params.width" in run.data.params
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert len(history) == 2, "one val_accuracy per epoch of every trial"


def test_a_recipe_sweep_registers_the_best_trial_with_its_parameters(
    prefect_harness, mlflow_store, tmp_path
):
    """The sweep's flow on Prefect's default (thread) runner, one trial at a time: the
    recipe's data loaded once, 3 trials through the recipe's training step, the best
    through the recipe's export → simplify → validate → register."""
    from onnxflow.flows.sweep import _tracking_uri, sweep_and_register
    from onnxflow.recipes.steps import prepare_recipe_data

    config = swept_recipe_config(tmp_path, 3, parallel=1)
    out = tmp_path / "art"
    started = time.perf_counter()
    dataset = prepare_recipe_data(config.recipe, config.data, out / "data")
    chain = sweep_and_register("recipe", config, out, dataset, _tracking_uri())
    took = time.perf_counter() - started
    assert_best_trial_registered(chain, 3)
    print(f"\nrecipe sweep of 3 trials without Dask: {took:.1f} s")


# -- the recipe contract: inputs by name, regression, progress --------------------------------

SWAPPED = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, b, a):  # not the data's order (a, b): bound by name
        return a[:, :3] * self.scale

def build_model(info):
    return Net()

def fit(model, data, config, on_epoch):
    on_epoch(1, {"noop": 0.0})
"""


def test_inputs_reach_forward_by_name_whatever_the_data_order(tmp_path, small_dataset, caplog):
    from onnxflow.recipes.steps import export_recipe, recipe_reference
    from onnxflow.runtime import open_session

    path = _recipe(tmp_path, SWAPPED)
    with caplog.at_level("INFO", logger="onnxflow.recipes.steps"):
        trained = train_recipe(str(path), small_dataset, TrainConfig(), tmp_path / "out")
    assert any("epoch 1/" in r.getMessage() and "noop" in r.getMessage() for r in caplog.records)
    from onnxflow.arrays import read_split

    inputs, _ = read_split(small_dataset, "test")
    want = np.exp(inputs["a"][:, :3]) / np.exp(inputs["a"][:, :3]).sum(axis=1, keepdims=True)
    (reference,) = recipe_reference(trained, small_dataset.info)(inputs)
    np.testing.assert_allclose(reference, want, rtol=1e-5)
    exported = export_recipe(trained, small_dataset.info, ExportConfig(), tmp_path / "export")
    (onnx_out,) = open_session(exported.path).run(None, inputs)
    np.testing.assert_allclose(onnx_out, want, rtol=1e-5)


def test_forward_parameters_that_are_not_the_data_inputs_are_an_error(tmp_path, small_dataset):
    path = _recipe(tmp_path, SWAPPED.replace("forward(self, b, a)", "forward(self, x, a)"))
    with pytest.raises(RecipeError) as caught:
        train_recipe(str(path), small_dataset, TrainConfig(), tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{path}: build_model(info) returned a model whose forward()")
    assert "takes (x, a)" in message and "the data's inputs are (a, b)" in message


REGRESSION = """
import numpy as np
import torch

def load_data(config):
    rng = np.random.default_rng(0)

    def split(rows):
        x = rng.normal(size=(rows, 3)).astype(np.float32)
        return {"x": x, "label": (x @ np.array([2.0, -1.0, 0.5]) + 10.0).astype(np.float64)}

    return {"train": split(96), "validation": split(16), "test": split(32)}

def build_model(info):
    assert info.task == "regression" and info.n_outputs == 1
    return torch.nn.Linear(3, 1)
"""


def test_a_regression_recipe_registers_with_rmse_and_parity(
    prefect_harness, mlflow_store, tmp_path
):
    from onnxflow.flows.pipeline import run

    path = _recipe(tmp_path, REGRESSION)
    config = PipelineConfig.model_validate(
        {
            "recipe": str(path),
            "register": {"model_name": "reg"},
            "train": {"epochs": 30, "learning_rate": 0.1, "batch_size": 16},
            "validate": {"latency_repeats": 3},
        }
    )
    result = run(config=config, out_dir=tmp_path / "run")
    (chain,) = result.chains
    tags = chain.version.tags
    assert tags["metric_name"] == "rmse" and float(tags["rmse"]) < 3.0
    assert float(tags["parity_max_abs"]) <= 1e-4 and tags["parity_checked"] == "true"
    report = (chain.validation.report_dir / "report.json").read_text()
    assert '"mae_onnx"' in report and "predictions.png" in report


def test_the_recipe_page_example_trains_exports_and_validates(tmp_path):
    """docs/guide/recipes.md's example recipe, as `onnxflow run --recipe` runs it, without
    Prefect and MLflow."""
    import re

    from onnxflow.config import ValidateConfig
    from onnxflow.recipes.steps import prepare_recipe_data
    from onnxflow.sources import RecipeSource, validate_sourced

    page = (ROOT / "docs" / "guide" / "recipes.md").read_text()
    (block,) = re.findall(r"```python\n(# my_recipe\.py\n.*?)```", page, flags=re.S)
    recipe = _recipe(tmp_path, block, "my_recipe.py")
    dataset = prepare_recipe_data(str(recipe), DataConfig(), tmp_path / "data")
    source = RecipeSource(recipe=str(recipe), dataset=dataset, train_config=TrainConfig(epochs=3))
    model = source.export(source.train(tmp_path / "train"), tmp_path / "source")
    path = model.exported.path
    summary = validate_sourced(source, model, path, ValidateConfig(), tmp_path / "v")
    assert summary.passed and summary.metric_name == "accuracy" and summary.onnx_metric > 0.8

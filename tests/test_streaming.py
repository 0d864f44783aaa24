"""Streamed data (image folders, Parquet, a recipe's torch datasets) and the torch loop's
precision: splits, shuffling, lazy reads, and a streamed recipe through the chain, with a
torch model and with a Keras one."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from onnxflow.arrays import LABEL, load_arrays, read_split
from onnxflow.config import DataConfig, PipelineConfig, TrainConfig, ValidateConfig
from onnxflow.errors import DataError, RecipeError, TrainingError
from onnxflow.stream_plan import stream_data
from onnxflow.streaming import ParquetRows, open_split

ROOT = Path(__file__).resolve().parents[1]

TINY_CNN = """
import torch

DEFAULTS = {"data": {"image_size": 16, "stream": True}}

def build_model(info):
    (image,) = info.inputs
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, info.n_classes),
    )
"""


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """90 PNGs of 24x24 in three class folders (the images example's generator)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("shapes", ROOT / "examples/images/recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate(tmp_path_factory.mktemp("img") / "shapes", per_class=30, size=24)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """A Parquet table of 400 rows in row groups of 50: two numeric columns, a list column."""
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": rng.integers(0, 5, n),
            "ids": [list(rng.integers(0, 9, 4)) for _ in range(n)],
            "y": np.array(["x", "y", "z"])[rng.integers(0, 3, n)],
        }
    )
    path = tmp_path_factory.mktemp("pq") / "table.parquet"
    frame.to_parquet(path, row_group_size=50)
    return path


def test_streamed_splits_are_disjoint_and_match_the_in_memory_split(shapes, tmp_path):
    config = DataConfig(path=shapes, stream=True, image_size=16, sample_rows=32)
    dataset = stream_data(shapes, config, tmp_path / "data", "test")
    files = {s: set(open_split(dataset, s).files) for s in ("train", "validation", "test")}
    assert files["train"].isdisjoint(files["test"]) and files["train"].isdisjoint(
        files["validation"]
    )
    assert files["validation"].isdisjoint(files["test"])
    assert (
        sum(map(len, files.values()))
        == 90
        == sum((dataset.info.n_train, dataset.info.n_val, dataset.info.n_test))
    )
    # the same seeded split and the same decoding as the in-memory loader
    memory = load_arrays(config.model_copy(update={"stream": False}))
    inputs, labels = read_split(dataset, "test")  # the validation sample: bounded
    assert len(labels) == min(32, dataset.info.n_test)
    np.testing.assert_array_equal(labels, memory.test[LABEL][: len(labels)])
    np.testing.assert_array_equal(inputs["image"], memory.test["image"][: len(labels)])
    assert dataset.info.preprocessing["image_size"] == "16x16"


def test_shuffling_is_seeded_per_epoch_and_covers_every_row(shapes, tmp_path):
    from onnxflow.recipes.torch_data import BatchRows, make_loader, set_epoch

    dataset = stream_data(
        shapes, DataConfig(path=shapes, stream=True, image_size=8), tmp_path / "d", "test"
    )
    reader = open_split(dataset, "train")
    positions = {f: i for i, f in enumerate(reader.files)}

    def order(seed: int, epoch: int, workers: int) -> list[int]:
        loader = make_loader(
            BatchRows(reader, ("image",)), 16, shuffle=True, seed=seed, workers=workers
        )
        set_epoch(loader, epoch)
        return [int(v) for _, y in loader for v in y]

    first = order(1, 1, workers=0)
    assert order(1, 1, workers=2) == first  # workers change nothing
    assert order(1, 2, workers=0) != first and order(2, 1, workers=0) != first
    assert sorted(first) == sorted(int(v) for v in reader.labels)
    assert len(positions) == len(first)


def test_parquet_is_read_one_row_group_at_a_time(table, tmp_path):
    import pandas as pd

    from onnxflow.recipes.torch_data import BatchRows, make_loader

    config = DataConfig(path=table, target="y", stream=True)
    dataset = stream_data(table, config, tmp_path / "d", "test")
    assert [s.name for s in dataset.info.inputs] == ["features", "ids"]
    assert dataset.info.class_names == ("x", "y", "z")
    reader = open_split(dataset, "train")
    frame = pd.read_parquet(table)
    rows = reader.rows([0, 5, 7])
    ids = reader.row_ids[[0, 5, 7]]
    np.testing.assert_allclose(rows["features"][:, 0], frame["a"].to_numpy()[ids], rtol=1e-6)
    np.testing.assert_array_equal(rows["ids"], np.stack(frame["ids"].to_numpy()[ids]))

    class Counting(ParquetRows):
        reads = 0

        def _group(self, group):
            if self._cached is None or self._cached[0] != group:
                Counting.reads += 1
            return super()._group(group)

    counting = Counting(
        **{k: getattr(reader, k) for k in ("path", "row_ids", "labels")},
        scalars=reader.scalars,
        lists=reader.lists,
    )
    loader = make_loader(BatchRows(counting, ("features", "ids")), 16, shuffle=True, seed=3)
    seen = [int(v) for _, y in loader for v in y]
    assert len(seen) == len(reader)
    assert Counting.reads == 8  # 400 rows in 8 row groups, each read once in the epoch


def test_a_parquet_column_of_text_is_refused_before_training(tmp_path):
    import pandas as pd

    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1.0] * 12, "s": ["x"] * 12, "y": [0, 1, 2] * 4}).to_parquet(path)
    with pytest.raises(DataError, match=r"Column 's' .* neither numeric nor a column of lists"):
        stream_data(path, DataConfig(path=path, target="y", stream=True), tmp_path / "d", "t")


def _recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "recipe.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_streamed_recipe_trains_on_cpu_in_fp32_and_bf16_and_validates(
    shapes, tmp_path, precision
):
    from onnxflow.recipes.steps import prepare_recipe_data
    from onnxflow.sources import RecipeSource, validate_sourced

    recipe = _recipe(tmp_path, TINY_CNN)
    data = DataConfig(path=shapes, stream=True, image_size=16)
    dataset = prepare_recipe_data(str(recipe), data, tmp_path / "data")
    assert dataset.stream == "images"
    train = TrainConfig(epochs=2, batch_size=16, precision=precision, loader_workers=1)
    source = RecipeSource(recipe=str(recipe), dataset=dataset, train_config=train)
    epochs = []
    trained = source.train(tmp_path / "train", on_epoch=lambda e, m: epochs.append(m))
    assert trained.params["train_precision"] == precision
    assert trained.params["data_streamed"] == "images"
    assert len(epochs) == 2 and epochs[-1]["train_samples_per_second"] > 0
    model = source.export(trained, tmp_path / "source")
    summary = validate_sourced(
        source, model, model.exported.path, ValidateConfig(latency_repeats=2), tmp_path / "v"
    )
    assert summary.passed  # parity against the fp32 CPU reference


def test_loader_workers_default_to_none_on_cpu_and_some_on_cuda():
    """On CPU every core trains, so decoding stays in the training process unless asked;
    on CUDA the CPU is free for loader workers. A figure given is kept on both."""
    from onnxflow.config import TrainConfig

    assert TrainConfig().on_device("cpu").loader_workers == 0
    assert 1 <= TrainConfig().on_device("cuda").loader_workers <= 4
    resolved = TrainConfig(loader_workers=3).on_device("cpu")
    assert (resolved.loader_workers, resolved.device) == (3, "cpu")


def test_fp16_on_cpu_is_refused_with_what_to_use(shapes, tmp_path):
    from onnxflow.recipes.steps import prepare_recipe_data, train_recipe

    recipe = _recipe(tmp_path, TINY_CNN)
    data = DataConfig(path=shapes, stream=True, image_size=16)
    dataset = prepare_recipe_data(str(recipe), data, tmp_path / "data")
    with pytest.raises(TrainingError, match="fp16 needs a CUDA device .* use bf16 or fp32"):
        train_recipe(str(recipe), dataset, TrainConfig(epochs=1, precision="fp16"), tmp_path / "t")


TORCH_DATASETS = """
import numpy as np
import torch

class Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, 4)).astype(np.float32)
        self.y = (self.x[:, 0] > 0).astype(np.int64)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": torch.from_numpy(self.x[i])}, int(self.y[i])

class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        rows = Rows(40, 2)
        for i in range(len(rows)):
            yield rows[i]

def load_data(config):
    return {"train": Rows(200, 0), "validation": Stream(), "test": Rows(50, 1),
            "classes": ["neg", "pos"], "name": "rows"}

def build_model(info):
    return torch.nn.Linear(4, 2)
"""


def test_load_data_may_return_torch_datasets(tmp_path):
    from onnxflow.recipes.steps import prepare_recipe_data
    from onnxflow.sources import RecipeSource, read_sample

    recipe = _recipe(tmp_path, TORCH_DATASETS)
    dataset = prepare_recipe_data(str(recipe), DataConfig(sample_rows=32), tmp_path / "data")
    assert dataset.stream == "recipe" and dataset.info.n_train == 200
    assert dataset.info.n_val == -1  # an IterableDataset has no length
    assert dataset.info.class_names == ("neg", "pos")
    source = RecipeSource(
        recipe=str(recipe),
        dataset=dataset,
        train_config=TrainConfig(epochs=3, batch_size=16, learning_rate=0.05),
    )
    epochs = []
    trained = source.train(tmp_path / "t", on_epoch=lambda e, m: epochs.append(m))
    assert epochs[-1]["val_accuracy"] > 0.8
    sample = read_sample(source.export(trained, tmp_path / "s").sample)
    assert sample.inputs["x"].shape == (32, 4)  # the first sample_rows rows of the test split


def test_a_keras_model_on_a_recipes_torch_datasets_is_refused_before_training(tmp_path):
    from onnxflow.recipes.steps import prepare_recipe_data, train_recipe

    keras_model = """
def build_model(info):
    import keras
    x = keras.Input((4,), name="x")
    return keras.Model(x, keras.layers.Dense(info.n_classes)(x))
"""
    recipe = _recipe(tmp_path, TORCH_DATASETS.split("def build_model")[0] + keras_model)
    dataset = prepare_recipe_data(str(recipe), DataConfig(sample_rows=32), tmp_path / "data")
    assert dataset.stream == "recipe"
    with pytest.raises(RecipeError) as refused:
        train_recipe(str(recipe), dataset, TrainConfig(epochs=1), tmp_path / "t")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{recipe}: load_data(config) returned torch")
    assert (
        "keras model, which trains on an image folder or a Parquet table with data.stream, "
        "or on arrays in memory" in message
    )
    assert not (tmp_path / "t").exists()  # nothing trained or saved


KERAS_IMAGES = """
import keras

DEFAULTS = {"data": {"image_size": 16, "stream": True}}

def build_model(info):
    image = keras.Input((3, 16, 16), name="image")
    x = keras.layers.Permute((2, 3, 1))(image)  # NCHW in, channels last for the CPU
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(image, keras.layers.Dense(info.n_classes)(x))
"""

KERAS_TABLE = """
import keras

def build_model(info):
    features = keras.Input((2,), name="features")
    ids = keras.Input((4,), dtype="int64", name="ids")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(9, 3)(ids))
    x = keras.layers.Dense(16, activation="relu")(
        keras.layers.Concatenate()([features, embedded])
    )
    return keras.Model([features, ids], keras.layers.Dense(info.n_classes)(x))
"""


@pytest.fixture(scope="module")
def signal_table(tmp_path_factory) -> Path:
    """A Parquet table of 400 rows in row groups of 50 whose class is the sign of ``a``."""
    import pandas as pd

    rng = np.random.default_rng(1)
    a = rng.normal(size=400)
    frame = pd.DataFrame(
        {
            "a": a,
            "b": rng.integers(0, 5, 400),
            "ids": [list(rng.integers(0, 9, 4)) for _ in range(400)],
            "y": np.where(a > 0, "pos", "neg"),
        }
    )
    path = tmp_path_factory.mktemp("signal") / "signal.parquet"
    frame.to_parquet(path, row_group_size=50)
    return path


@pytest.mark.parametrize(
    ("kind", "workers", "tag"), [("images", 2, "2 threads"), ("parquet", None, "1 thread")]
)
def test_a_keras_recipe_trains_on_streamed_data_and_validates(
    shapes, signal_table, tmp_path, kind, workers, tag
):
    """A Keras model on a streamed image folder (two reading threads) and Parquet table
    (the default on CPU: tf.data's one generator thread) trains, exports and passes the
    validation gate; the version's tags say how it read."""
    from onnxflow.recipes.steps import prepare_recipe_data
    from onnxflow.sources import RecipeSource, validate_sourced

    if kind == "images":
        recipe = _recipe(tmp_path, KERAS_IMAGES)
        data = DataConfig(path=shapes, stream=True, image_size=16)
    else:
        recipe = _recipe(tmp_path, KERAS_TABLE)
        data = DataConfig(path=signal_table, target="y", stream=True, sample_rows=32)
    dataset = prepare_recipe_data(str(recipe), data, tmp_path / "data")
    assert dataset.stream == kind
    train = TrainConfig(epochs=3, batch_size=16, learning_rate=0.02, loader_workers=workers)
    source = RecipeSource(recipe=str(recipe), dataset=dataset, train_config=train)
    epochs = []
    trained = source.train(tmp_path / "train", on_epoch=lambda e, m: epochs.append(m))
    assert trained.framework == "keras" and len(epochs) == 3
    assert trained.params["data_streamed"] == kind
    assert trained.params["train_loader_workers"] == tag
    model = source.export(trained, tmp_path / "source")
    summary = validate_sourced(
        source, model, model.exported.path, ValidateConfig(latency_repeats=2), tmp_path / "v"
    )
    assert summary.passed and summary.parity_max_abs < 1e-4
    assert summary.onnx_metric == pytest.approx(summary.framework_metric, abs=1e-6)
    if kind == "parquet":  # the class is the sign of a column: learnt in three epochs
        assert epochs[-1]["val_accuracy"] > 0.85 and summary.framework_metric > 0.85


def test_keras_batches_read_every_row_once_per_epoch_in_the_seeded_order(table, tmp_path):
    """Keras's streamed batches read :func:`epoch_order`: the same order for the same seed
    and epoch (torch's EpochShuffle's order), another for another epoch or seed, every row
    once, a row group's rows together; ``model.fit`` reads them epoch by epoch."""
    from onnxflow.recipes import keras_recipe, load_recipe
    from onnxflow.recipes.keras_data import SplitBatches
    from onnxflow.recipes.torch_data import EpochShuffle
    from onnxflow.streaming import StreamedSplits

    config = DataConfig(path=table, target="y", stream=True)
    dataset = stream_data(table, config, tmp_path / "d", "test")
    reader = open_split(dataset, "train")

    class Recording(ParquetRows):
        calls: list[np.ndarray] = []
        reads = 0

        def rows(self, indices):
            Recording.calls.append(np.asarray(indices))
            return super().rows(indices)

        def _group(self, group):
            if self._cached is None or self._cached[0] != group:
                Recording.reads += 1
            return super()._group(group)

    recording = Recording(
        **{k: getattr(reader, k) for k in ("path", "row_ids", "labels", "scalars", "lists")}
    )

    def order(seed: int, epoch: int) -> np.ndarray:
        batches = SplitBatches(reader, 16, shuffle=True, seed=seed)
        batches.set_epoch(epoch)
        return batches.order()

    first = order(1, 1)
    assert np.array_equal(order(1, 1), first)
    assert not np.array_equal(order(1, 2), first) and not np.array_equal(order(2, 1), first)
    assert sorted(first.tolist()) == list(range(len(reader)))
    torch_order = EpochShuffle(len(reader), 1, reader.blocks())
    torch_order.set_epoch(1)
    assert list(torch_order) == first.tolist()  # one ordering for both frameworks
    groups = np.searchsorted(reader._offsets, reader.row_ids[first], side="right") - 1
    runs = 1 + np.count_nonzero(np.diff(groups))
    assert runs == len(reader.blocks()) == 8  # each row group's rows in one run

    info = dataset.info
    net = load_recipe(str(_recipe(tmp_path, KERAS_TABLE))).call("build_model", info)
    data = StreamedSplits(recording, open_split(dataset, "validation"), reader)
    train = TrainConfig(epochs=2, batch_size=16, seed=1).on_device("cpu")
    keras_recipe.fit(net, data, info, train, "cpu", None)
    n_batches = len(SplitBatches(reader, 16, shuffle=True, seed=1))
    epochs = Recording.calls[-2 * n_batches :]
    assert len(Recording.calls) <= 2 * n_batches + 2  # and the first batches, for the spec
    np.testing.assert_array_equal(np.concatenate(epochs[:n_batches]), order(1, 1))
    np.testing.assert_array_equal(np.concatenate(epochs[n_batches:]), order(1, 2))
    assert Recording.reads <= 2 * 8 + 1  # each row group read once an epoch


def test_streaming_needs_a_folder_or_parquet(tmp_path):
    from onnxflow.recipes.steps import prepare_recipe_data

    recipe = _recipe(tmp_path, "def build_model(info):\n    return None\n")
    with pytest.raises(RecipeError, match="data.stream needs data.path"):
        prepare_recipe_data(str(recipe), DataConfig(stream=True), tmp_path / "d")


def _register_streamed(tmp_path: Path, recipe: Path, data: dict, train: dict, name: str):
    """The whole flow, with a Prefect test server, on a streamed recipe: its one chain."""
    from prefect.testing.utilities import prefect_test_harness

    from onnxflow.flows.pipeline import run

    config = PipelineConfig.model_validate(
        {
            "recipe": str(recipe),
            "data": {"stream": True, **data},
            "train": train,
            "register": {"model_name": name},
            "validate": {"latency_repeats": 2},
        }
    )
    with prefect_test_harness(server_startup_timeout=60):
        result = run(config=config, out_dir=tmp_path / "run")
    (chain,) = result.chains
    return chain


@pytest.mark.slow  # a minute: the whole flow with a Prefect test server
def test_a_streamed_recipe_registers_what_training_used(shapes, tmp_path, mlflow_store):
    chain = _register_streamed(
        tmp_path,
        _recipe(tmp_path, TINY_CNN),
        {"path": str(shapes), "image_size": 16},
        {"epochs": 1, "batch_size": 16, "precision": "bf16", "loader_workers": 1},
        "streamed",
    )
    tags = chain.version.tags
    assert tags["train_precision"] == "bf16" and tags["data_streamed"] == "images"
    assert tags["train_loader_workers"] == "1" and tags["train_device"] == "cpu"
    assert tags["validation"] == "passed"


@pytest.mark.slow  # half a minute: the whole flow with a Prefect test server
def test_a_streamed_keras_recipe_registers_what_training_used(signal_table, tmp_path, mlflow_store):
    chain = _register_streamed(
        tmp_path,
        _recipe(tmp_path, KERAS_TABLE),
        {"path": str(signal_table), "target": "y", "sample_rows": 32},
        {"epochs": 3, "batch_size": 16, "learning_rate": 0.02, "loader_workers": 2},
        "streamed-keras",
    )
    tags = chain.version.tags
    assert chain.trained.framework == "keras" and tags["data_streamed"] == "parquet"
    assert tags["train_loader_workers"] == "2 threads" and tags["train_device"] == "cpu"
    assert tags["validation"] == "passed" and float(tags["accuracy"]) > 0.85


#: The slow test's memory bound (README): peak PSS of `onnxflow run` and every process it
#: starts (loader workers, the temporary Prefect server), and the largest process's RSS.
RSS_BOUND_MB = 2000
BIG_SIZE, BIG_PER_CLASS = 512, 900  # 2,700 PNGs: 8.5 GB as float32, 4.2x the bound

BIG_RECIPE = f"""
import torch

DEFAULTS = {{
    "data": {{"stream": True, "image_size": {BIG_SIZE}, "sample_rows": 32}},
    "train": {{"epochs": 1, "batch_size": 16, "loader_workers": 2}},
    "validate": {{"latency_repeats": 2, "batch_size": 8}},
    "register": {{"model_name": "big"}},
}}

def build_model(info):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 16, stride=16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, info.n_classes),
    )
"""


def write_big_folder(folder: Path, per_class: int, size: int, unique: int = 20) -> int:
    """Three class folders of ``per_class`` PNGs (a bright disc, square or bar on a dark
    noisy background); returns the bytes written. ``unique`` images per class are drawn
    and encoded, the rest are byte copies of them (encoding a 512x512 PNG takes a good
    part of a second on a busy machine): the memory measured is the same."""
    import shutil

    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    written = 0
    for name in ("disc", "square", "bar"):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            path = folder / name / f"{i:05d}.png"
            if i >= unique:
                shutil.copyfile(folder / name / f"{i % unique:05d}.png", path)
                written += path.stat().st_size
                continue
            (cx, cy), r = rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.1, 0.25) * size
            if name == "disc":
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            elif name == "square":
                mask = (abs(xx - cx) < r) & (abs(yy - cy) < r)
            else:
                mask = (abs(xx - cx) < r / 3) & (abs(yy - cy) < r * 1.5)
            pixels = rng.integers(0, 24, (size, size, 3), dtype=np.uint8)
            pixels[mask] += np.asarray(rng.integers(150, 220, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, compress_level=1)
            written += path.stat().st_size
    return written


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_folder_several_times_the_memory_bound_trains_validates_and_registers(tmp_path):
    """`onnxflow run` on an image folder whose float32 size is 4x the bound: streamed, it
    trains, validates and registers with its whole process tree under the bound."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    sys.path.insert(0, str(ROOT))
    from bench._common import PeakMemory

    folder = tmp_path / "big"
    on_disk = write_big_folder(folder, BIG_PER_CLASS, BIG_SIZE)
    float32 = 3 * BIG_PER_CLASS * 3 * BIG_SIZE * BIG_SIZE * 4
    assert float32 >= 4 * RSS_BOUND_MB * 2**20
    recipe = _recipe(tmp_path, BIG_RECIPE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [str(Path(sys.executable).parent / "onnxflow"), "run", "--recipe", str(recipe)]
    proc = subprocess.Popen(
        [*command, "--data", str(folder)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with PeakMemory(proc.pid, interval=0.05) as peak:
        output, _ = proc.communicate()
    summary = (
        f"{3 * BIG_PER_CLASS} PNGs {BIG_SIZE}x{BIG_SIZE} ({on_disk / 2**30:.2f} GB on disk, "
        f"{float32 / 2**30:.1f} GB as float32): peak PSS of the run's processes "
        f"{peak.pss_mb:.0f} MB, largest process RSS {peak.rss_mb:.0f} MB, bound {RSS_BOUND_MB} MB"
    )
    print(summary)
    assert proc.returncode == 0, output[-4000:]
    client = MlflowClient(tracking_uri=uri)
    (version,) = client.search_model_versions("name='big'")
    assert version.tags["validation"] == "passed" and version.tags["data_streamed"] == "images"
    assert peak.pss_mb < RSS_BOUND_MB and peak.rss_mb < RSS_BOUND_MB, summary

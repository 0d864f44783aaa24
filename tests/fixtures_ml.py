"""Tiny real models shared by the framework, simplify and validate tests.

Each (framework, task) model is trained and exported once per test session, whichever
test module asks first: the builders are memoised here rather than declared as fixtures
in a conftest, so the session-scoped fixtures in several modules share one build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from onnxflow.config import DataConfig, ExportConfig, TrainConfig
from onnxflow.data import load_splits, prepare_data
from onnxflow.frameworks import get_adapter
from onnxflow.results import DatasetArtifact, ExportedModel, TrainedModel

FRAMEWORKS = ("torch", "keras")
TINY = TrainConfig(epochs=2, hidden_sizes=(16,), batch_size=32, learning_rate=1e-2, seed=7)
TINY_REGRESSION = TrainConfig(
    epochs=15, hidden_sizes=(16,), batch_size=16, learning_rate=1e-2, seed=7
)


@dataclass(frozen=True)
class Built:
    dataset: DatasetArtifact
    trained: TrainedModel
    exported: ExportedModel
    epochs_seen: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def X_test(self) -> np.ndarray:
        return load_splits(self.dataset)["X_test"]


_datasets: dict[str, DatasetArtifact] = {}
_models: dict[tuple[str, str], Built] = {}


def dataset(task: str, factory: pytest.TempPathFactory) -> DatasetArtifact:
    """The bundled digits (classification) or a synthetic table (regression)."""
    if task not in _datasets:
        out = factory.mktemp(f"data_{task}")
        if task == "classification":
            _datasets[task] = prepare_data(DataConfig(), out)
        else:
            _datasets[task] = prepare_data(
                DataConfig(path=regression_csv(out / "houses.csv"), target="price"), out
            )
    return _datasets[task]


def regression_csv(path: Path, rows: int = 240) -> Path:
    """A linear-ish target far from zero mean and unit scale, so that a model without the
    folded target de-standardisation would be off by ~the target's mean."""
    import pandas as pd

    rng = np.random.default_rng(3)
    X = rng.normal(size=(rows, 4)) * [1.0, 10.0, 0.1, 5.0] + [0.0, 50.0, 1.0, -3.0]
    price = 200.0 + 30 * X[:, 0] + 2 * X[:, 1] - 40 * X[:, 2] + rng.normal(0, 3, rows)
    frame = pd.DataFrame(X, columns=["rooms", "area", "age", "distance"])
    frame["price"] = price
    frame.to_csv(path, index=False)
    return path


def built(framework: str, task: str, factory: pytest.TempPathFactory) -> Built:
    """A trained and exported tiny model (opset 18)."""
    key = (framework, task)
    if key not in _models:
        data = dataset(task, factory)
        adapter = get_adapter(framework)
        out = factory.mktemp(f"{framework}_{task}")
        epochs_seen: list[tuple[int, dict[str, float]]] = []
        config = TINY if task == "classification" else TINY_REGRESSION
        trained = adapter.train(
            data, config, out / "train", on_epoch=lambda e, m: epochs_seen.append((e, m))
        )
        exported = adapter.export(trained, data.info, ExportConfig(opset=18), out / "export")
        _models[key] = Built(data, trained, exported, epochs_seen)
    return _models[key]


def onnx_session(model_path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

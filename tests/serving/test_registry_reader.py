"""The endpoint's registry readers give MLflow's answers without MLflow in the endpoint.

On a real SQLite store: the direct read-only reader and the helper process (MLflow's own
client) agree with MLflow's client on every alias move, pinned version, ``latest``,
deleted version and missing name/alias; an unknown schema goes to the helper.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from onnxflow.errors import RegistryError
from onnxflow.registration import register_onnx, set_alias
from onnxflow.serving.registry_reader import (
    HelperRegistry,
    MlflowRegistry,
    SqliteRegistry,
    registry_for,
)
from tests.conftest import make_linear_onnx

EXAMPLE = np.ones((1, 64), np.float32)


@pytest.fixture
def store(mlflow_store, tmp_path):
    """digits v1 (champion), v2 (challenger), v3 deleted; other v1 with a None tag."""
    from mlflow import MlflowClient

    for seed in (1, 2, 3):
        register_onnx(
            make_linear_onnx(tmp_path / f"m{seed}" / "model.onnx", seed=seed),
            model_name="digits",
            input_example=EXAMPLE,
            aliases=("champion",) if seed == 1 else ("challenger",),
        )
    MlflowClient().delete_model_version("digits", "3")
    set_alias("digits", "challenger", "2")
    register_onnx(
        make_linear_onnx(tmp_path / "o" / "model.onnx", seed=4),
        model_name="other",
        input_example=EXAMPLE,
        tags={"note": ""},
    )
    return mlflow_store


QUESTIONS = [
    ("digits", "champion", None),
    ("digits", "challenger", None),
    ("digits", None, "1"),
    ("digits", None, "2"),
    ("digits", "latest", None),
    ("other", "challenger", None),
    ("other", None, "1"),
]
REFUSED = [
    ("digits", "nope", None),
    ("nope", "champion", None),
    ("digits", None, "3"),
    ("digits", None, "9"),
]


def test_sqlite_reader_answers_as_mlflow(store):
    reader, mlflow_client = SqliteRegistry(store), MlflowRegistry()
    assert isinstance(registry_for(store), SqliteRegistry)
    for question in QUESTIONS:
        assert reader.resolve(*question) == mlflow_client.resolve(*question), question
    for question in REFUSED:
        with pytest.raises(RegistryError):
            reader.resolve(*question)
    set_alias("digits", "champion", "2")  # moves are seen at once
    assert reader.resolve("digits", "champion", None)[0] == "2"
    version, tags = reader.resolve("digits", "champion", None)
    assert tags["onnx_sha256"] and tags == mlflow_client.resolve("digits", "champion", None)[1]


def test_sqlite_reader_never_writes_and_never_imports_mlflow(store, tmp_path):
    """In a fresh interpreter with heavy imports blocked, as in the endpoint."""
    code = (
        "import sys; from onnxflow.serving import block_heavy_imports; block_heavy_imports()\n"
        "from onnxflow.serving.registry_reader import registry_for\n"
        f"r = registry_for({store!r})\n"
        "print(r.resolve('digits', 'champion', None)[0])\n"
        "assert 'mlflow' not in sys.modules and 'sqlalchemy' not in sys.modules\n"
    )
    db = tmp_path / "mlflow.db"
    before = db.stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    assert db.stat().st_mtime_ns == before


def test_helper_process_answers_as_mlflow(store):
    helper = HelperRegistry()
    assert isinstance(registry_for("databricks"), HelperRegistry)
    assert helper.resolve("digits", "challenger", None) == MlflowRegistry().resolve(
        "digits", "challenger", None
    )
    with pytest.raises(RegistryError, match="alias nope"):
        helper.resolve("digits", "nope", None)


def test_unknown_schema_goes_to_the_helper(store, tmp_path, caplog):
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("ALTER TABLE model_version_tags RENAME COLUMN value TO tag_value")
    reader = SqliteRegistry(store)
    with pytest.raises(RegistryError, match="registry helper"):  # MLflow itself fails too
        reader.resolve("digits", "champion", None)
    assert "not a registry schema this reader knows" in caplog.text
    assert isinstance(reader._fallback, HelperRegistry)

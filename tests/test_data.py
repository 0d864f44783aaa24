"""data: the bundled digits, user tables, and every way a table can be unusable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from onnxflow.config import DataConfig
from onnxflow.data import load_splits, prepare_data
from onnxflow.errors import DataError


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return prepare_data(DataConfig(), tmp_path_factory.mktemp("digits"))


def _table(n=60, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])
    frame["label"] = np.arange(n) % 3
    frame["price"] = frame["a"] * 10 + 100
    return frame


def test_digits_default_split_and_lineage(digits):
    info = digits.info
    assert (info.name, info.task, info.n_features, info.class_names) == (
        "digits",
        "classification",
        64,
        tuple(str(i) for i in range(10)),
    )
    assert info.n_train + info.n_val + info.n_test == 1797
    splits = load_splits(digits)
    assert splits["X_test"].dtype == np.float32 and splits["y_test"].dtype == np.int64
    assert set(np.unique(splits["y_test"])) == set(range(10)), "stratified: every class in test"
    assert len(info.digest) >= 8 and (digits.path.parent / "dataset.json").exists()


def test_split_is_deterministic_and_seeded(digits, tmp_path):
    again = prepare_data(DataConfig(), tmp_path / "again")
    other = prepare_data(DataConfig(seed=7), tmp_path / "other")
    a, b, c = load_splits(digits), load_splits(again), load_splits(other)
    assert np.array_equal(a["X_test"], b["X_test"]) and again.info.digest == digits.info.digest
    assert not np.array_equal(a["X_test"], c["X_test"])
    assert other.info.digest == digits.info.digest, "digest is of the table, not the split"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_user_table_classification(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    frame = _table().drop(columns=["price"])
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    ds = prepare_data(DataConfig(path=path, target="label"), tmp_path / "out")
    assert ds.info.task == "classification" and ds.info.class_names == ("0", "1", "2")
    assert ds.info.feature_names == ("a", "b", "c") and ds.info.name == "t"


def test_user_table_regression_is_detected(tmp_path):
    path = tmp_path / "houses.csv"
    _table().drop(columns=["label"]).to_csv(path, index=False)
    ds = prepare_data(DataConfig(path=path, target="price"), tmp_path / "out")
    assert ds.info.task == "regression" and ds.info.class_names == ()
    assert ds.info.target_std > 0 and abs(ds.info.target_mean - 100) < 5


def test_string_labels_are_classes(tmp_path):
    path = tmp_path / "t.csv"
    frame = _table().drop(columns=["price"])
    frame["label"] = frame["label"].map({0: "cat", 1: "dog", 2: "eel"})
    frame.to_csv(path, index=False)
    assert prepare_data(DataConfig(path=path, target="label"), tmp_path / "o").info.class_names == (
        "cat",
        "dog",
        "eel",
    )


def _write(tmp_path, frame, name="t.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _touch(path, text):
    path.write_text(text)
    return path


BAD_TABLES = {
    "missing file": (lambda tmp: tmp / "nope.csv", "label", "not found"),
    "unknown column": (lambda tmp: _write(tmp, _table()), "colour", "'colour' is not in"),
    "non-numeric feature": (
        lambda tmp: _write(tmp, _table().assign(city=["x"] * 60)),
        "label",
        "not numeric: city",
    ),
    "NaN labels": (
        lambda tmp: _write(tmp, _table().assign(label=[np.nan] + [1.0] * 59)),
        "label",
        "1 missing (NaN) label",
    ),
    "too few rows in a class": (
        lambda tmp: _write(tmp, _table().assign(label=[0] * 30 + [1] * 28 + [2] * 2)),
        "label",
        "'2' (2 rows)",
    ),
    "empty table": (lambda tmp: _write(tmp, _table().iloc[:0]), "label", "no rows"),
    "empty file": (lambda tmp: _touch(tmp / "e.csv", ""), "label", "empty"),
    "NaN feature": (
        lambda tmp: _write(tmp, _table().assign(b=[np.nan] + [0.0] * 59)),
        "label",
        "NaN or infinite",
    ),
    "unsupported format": (lambda tmp: _touch(tmp / "t.xlsx", "x"), "label", "expected .csv"),
    "only the target column": (
        lambda tmp: _write(tmp, _table()[["label"]]),
        "label",
        "no feature columns",
    ),
}


@pytest.mark.parametrize("case", BAD_TABLES)
def test_bad_tables_fail_early_with_a_named_problem(tmp_path, case):
    make_path, target, message = BAD_TABLES[case]
    path = make_path(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(path=path, target=target), tmp_path / "out")
    assert message in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists(), "nothing is written for bad data"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "the input is left alone"


def test_target_needs_data_and_data_needs_target(tmp_path):
    with pytest.raises(DataError, match="without --data"):
        prepare_data(DataConfig(target="label"), tmp_path)
    with pytest.raises(DataError, match="needs --target"):
        prepare_data(DataConfig(path=_write(tmp_path, _table())), tmp_path / "o")

"""Named-array datasets for recipes: the image-folder, .npz and table loaders, and checks."""

from __future__ import annotations

import numpy as np
import pytest

from onnxflow.arrays import (
    LABEL,
    NamedArrays,
    as_named_arrays,
    load_arrays,
    prepare_arrays,
    read_split,
)
from onnxflow.config import DataConfig
from onnxflow.errors import DataError


def _image_folder(root, per_class=10, size=20, classes=("cat", "dog", "eel")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size, size + 4, 3), 40 * (c + 1), np.uint8)
            pixels[..., c] = rng.integers(100, 255)
            suffix = ".png" if i % 2 else ".JPG"  # both kinds, any case
            Image.fromarray(pixels).save(
                root / name / f"{i}{suffix}", format="PNG" if i % 2 else "JPEG"
            )
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_is_resized_nchw_float32_split_seeded_and_stratified(tmp_path):
    folder = _image_folder(tmp_path / "pets")
    config = DataConfig(path=folder, image_size=12, test_size=0.2, val_size=0.2, seed=3)
    data = load_arrays(config)
    assert data.classes == ("cat", "dog", "eel")
    for split, rows in (("train", 18), ("validation", 6), ("test", 6)):
        arrays = data.split(split)
        assert arrays["image"].shape == (rows, 3, 12, 12)
        assert arrays["image"].dtype == np.float32
        assert 0.0 <= arrays["image"].min() and arrays["image"].max() <= 1.0
        assert np.bincount(arrays[LABEL]).tolist() == [rows // 3] * 3  # stratified
    # the class shows in its channel: the pixels were read in RGB order, channels first
    cat = data.train["image"][data.train[LABEL] == 0]
    assert cat[:, 0].mean() > cat[:, 2].mean()
    again = load_arrays(config)
    assert np.array_equal(again.test["image"], data.test["image"])  # seeded
    other = load_arrays(config.model_copy(update={"seed": 4}))
    assert not np.array_equal(other.test["image"], data.test["image"])
    assert data.preprocessing["image_size"] == "12x12"


def test_image_folder_problems_name_the_folder(tmp_path):
    folder = _image_folder(tmp_path / "pets", per_class=3)
    for image in list((folder / "dog").iterdir())[:2]:
        image.unlink()
    with pytest.raises(DataError, match=r"dog has 1 PNG/JPEG image"):
        load_arrays(DataConfig(path=folder))
    broken = _image_folder(tmp_path / "broken")
    (broken / "eel" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"Cannot read image .*bad.png"):
        load_arrays(DataConfig(path=broken))
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match="one subfolder per class"):
        load_arrays(DataConfig(path=tmp_path / "one"))


def test_npz_keeps_names_shapes_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    path = tmp_path / "tokens.npz"
    np.savez(
        path,
        ids=rng.integers(0, 100, (n, 16)),
        mask=rng.random((n, 16)) > 0.5,
        scale=rng.random((n, 2, 3)),
        label=np.array(["no", "yes"] * (n // 2)),
    )
    data = load_arrays(DataConfig(path=path))
    assert data.classes == ("no", "yes")
    assert data.train["ids"].dtype == np.int64 and data.train["ids"].shape[1:] == (16,)
    assert data.train["mask"].dtype == np.bool_
    assert data.train["scale"].dtype == np.float32  # float64 becomes float32
    dataset = prepare_arrays(data, DataConfig(path=path), tmp_path / "out")
    assert [(s.name, s.shape, s.dtype) for s in dataset.info.inputs] == [
        ("ids", (16,), "int64"),
        ("mask", (16,), "bool"),
        ("scale", (2, 3), "float32"),
    ]
    inputs, labels = read_split(dataset, "test")
    assert np.array_equal(inputs["ids"], data.test["ids"]) and len(labels) == dataset.info.n_test


def test_npz_problems(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, ids=np.zeros((10, 4), np.int64), label=np.zeros(9, np.int64))
    with pytest.raises(DataError, match="every array needs 9 rows"):
        load_arrays(DataConfig(path=path))
    np.savez(path, ids=np.zeros((10, 4), np.int64))
    with pytest.raises(DataError, match="no label array 'label'"):
        load_arrays(DataConfig(path=path))


def test_parquet_list_column_becomes_a_fixed_length_input(tmp_path):
    import pandas as pd

    n = 30
    frame = pd.DataFrame(
        {
            "age": np.arange(n, dtype=np.float64),
            "score": np.linspace(0, 1, n),
            "tokens": [list(range(i, i + 5)) for i in range(n)],
            "embedding": [np.full(3, i / n) for i in range(n)],
            "y": ["a", "b", "c"] * (n // 3),
        }
    )
    frame.to_parquet(tmp_path / "t.parquet")
    data = load_arrays(DataConfig(path=tmp_path / "t.parquet", target="y"))
    assert set(data.train) == {"features", "tokens", "embedding", LABEL}
    assert data.train["features"].shape[1:] == (2,) and data.train["features"].dtype == np.float32
    assert data.train["tokens"].shape[1:] == (5,) and data.train["tokens"].dtype == np.int64
    assert data.train["embedding"].shape[1:] == (3,)
    row = data.train["features"][0]
    tokens = data.train["tokens"][0]
    assert tokens[0] == row[0]  # rows stay together through the split

    frame["tokens"] = [list(range(i % 4 + 1)) for i in range(n)]
    frame.to_parquet(tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match=r"List column 'tokens' .* lengths \[1, 2, 3, 4\]"):
        load_arrays(DataConfig(path=tmp_path / "ragged.parquet", target="y"))


def test_load_data_results_are_checked(tmp_path):
    with pytest.raises(DataError, match="expected NamedArrays or a dict"):
        as_named_arrays([1, 2], "r.py: load_data(config)")
    split = {"x": np.zeros((6, 2), np.float32), LABEL: np.array([0, 1] * 3)}
    bad = {**split, "x": np.zeros((6, 3), np.float32)}
    data = as_named_arrays({"train": split, "validation": split, "test": bad}, "r.py")
    with pytest.raises(
        DataError,
        match=r"test.x is float32 \[3\] per row, train has float32 "
        r"\[2\]",
    ):
        prepare_arrays(data, DataConfig(), tmp_path)
    floats = NamedArrays(train={**split, LABEL: np.zeros(6)}, validation=split, test=split)
    with pytest.raises(DataError, match="expected 1-d integer class indices"):
        prepare_arrays(floats, DataConfig(task="classification"), tmp_path)


def test_float_labels_are_a_regression_and_data_errors_name_where(tmp_path):
    split = {"x": np.zeros((6, 2), np.float32), LABEL: np.linspace(0, 1, 6)}
    data = NamedArrays(train=split, validation=split, test=split)
    dataset = prepare_arrays(data, DataConfig(), tmp_path / "ok")
    assert dataset.info.task == "regression" and dataset.info.n_outputs == 1
    strings = {**split, LABEL: np.array(["a"] * 6)}
    bad = NamedArrays(train=split, validation=strings, test=split)
    with pytest.raises(DataError, match=r"^r.py: load_data\(config\): the data .* numeric targets"):
        prepare_arrays(
            bad, DataConfig(task="regression"), tmp_path / "bad", "r.py: load_data(config)"
        )

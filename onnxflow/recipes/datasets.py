"""A recipe's own torch datasets, streamed: ``load_data`` returning ``{"train": Dataset,
"validation": ..., "test": ..., "classes": [...]}``.

The data step (:func:`stream_recipe`) checks their first rows and digests their first
``data.sample_rows`` rows and lengths; it writes a plan of kind ``recipe`` naming the
recipe, and training asks ``load_data`` again, once per process
(:func:`open_recipe_split`, which :func:`onnxflow.streaming.open_folder` calls for that
kind). Each split is read as a :class:`RecipeRows`, an
:class:`onnxflow.streaming.SplitRows` reader. torch is imported only for a recipe's own
datasets.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxflow.arrays import LABEL, SPLITS, ArrayDataset
from onnxflow.config import DataConfig
from onnxflow.errors import DataError
from onnxflow.recipes import load_recipe
from onnxflow.stream_plan import PROBE_ROWS, StreamPlan, checked_info
from onnxflow.streaming import MANIFEST_FILE, STREAM_FILE, SplitRows, row_count


@dataclass
class RecipeRows:
    """A split the recipe's ``load_data`` gave as a torch ``Dataset`` (indexable) or
    ``IterableDataset`` (read in its own order): each item a dict of named inputs with
    the label under ``"label"``, or a pair ``(inputs, label)``."""

    dataset: Any
    names: tuple[str, ...] | None = None

    @property
    def iterable(self) -> bool:
        import torch

        return isinstance(self.dataset, torch.utils.data.IterableDataset)

    def __len__(self) -> int:
        return len(self.dataset)  # TypeError for an iterable without a length

    def item(self, value: Any) -> dict[str, np.ndarray]:
        return recipe_item(value)

    def first(self, n: int) -> Iterator[dict[str, np.ndarray]]:
        source = (
            iter(self.dataset) if self.iterable else (self.dataset[i] for i in range(len(self)))
        )
        for count, value in enumerate(source):
            if count >= n:
                return
            yield self.item(value)

    def rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        index = list(np.asarray(indices, dtype=np.int64))
        if self.iterable:
            if index != list(range(len(index))):
                raise DataError("an IterableDataset is read in its own order, not by index")
            items = list(self.first(len(index)))
        else:
            items = [self.item(self.dataset[int(i)]) for i in index]
        return stack_items(items)


def recipe_item(value: Any) -> dict[str, np.ndarray]:
    """One item of a recipe's torch dataset as named numpy values (inputs and label)."""
    if isinstance(value, tuple | list) and len(value) == 2 and isinstance(value[0], Mapping):
        inputs, label = value
        value = {**inputs, LABEL: label}
    if not isinstance(value, Mapping) or LABEL not in value:
        raise DataError(
            f"an item of the recipe's dataset is {type(value).__name__}; expected a dict of "
            f"named inputs with the label under {LABEL!r}, or (dict of inputs, label)"
        )
    return {str(k): np.asarray(_numpy(v)) for k, v in value.items()}


def stack_items(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not items:
        raise DataError("the recipe's dataset gave no items")
    return {k: np.stack([item[k] for item in items]) for k in items[0]}


def _numpy(value: Any) -> Any:
    return value.numpy() if hasattr(value, "numpy") and hasattr(value, "detach") else value


def recipe_datasets(value: Any) -> bool:
    """Whether a recipe's ``load_data`` returned torch datasets (not named arrays)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, Mapping):
        return False
    return all(isinstance(value.get(s), torch.utils.data.Dataset) for s in SPLITS)


def stream_recipe(
    recipe_ref: str, value: Mapping[str, Any], config: DataConfig, out_dir: Path, where: str
) -> ArrayDataset:
    """A recipe's torch datasets: checked on their first rows, digested over their first
    ``data.sample_rows`` rows of each split and their lengths (and the recipe's own
    ``digest``, when it gives one); the training step asks ``load_data`` for them again."""
    splits = {s: RecipeRows(value[s]) for s in SPLITS}
    probe = {s: stack_items(list(r.first(PROBE_ROWS))) for s, r in splits.items()}
    labels = probe["train"][LABEL]
    classes = tuple(str(c) for c in value.get("classes", ()))
    if labels.dtype.kind in "iu" and config.task != "regression" and not classes:
        raise DataError(
            f"{where} returned torch datasets with class labels but no 'classes': give "
            "the class names (their number is not read from a whole streamed split)"
        )
    digest = hashlib.sha256(str(value.get("digest", "")).encode())
    for split, reader in splits.items():
        digest.update(f"{split}:{row_count(reader)}".encode())
        for item in reader.first(config.sample_rows):
            for key in sorted(item):
                digest.update(np.ascontiguousarray(item[key]).tobytes())
    plan = StreamPlan(
        kind="recipe",
        source=str(value.get("source", recipe_ref)),
        name=str(value.get("name", "data")),
        labels=np.zeros(0),
        classes=classes,
        settings={"recipe": recipe_ref, "data": config.model_dump(mode="json")},
        items=np.zeros(0),
        digest=digest.hexdigest(),
        preprocessing={str(k): str(v) for k, v in dict(value.get("preprocessing", {})).items()},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STREAM_FILE).write_text(json.dumps({"kind": plan.kind, **plan.settings}))
    np.savez(out_dir / MANIFEST_FILE)
    sizes = {s: _count(r) for s, r in splits.items()}
    info = checked_info(plan, probe, sizes, config, where)
    (out_dir / "dataset.json").write_text(info.model_dump_json(indent=2))
    return ArrayDataset(
        path=out_dir / MANIFEST_FILE, info=info, stream="recipe", sample_rows=config.sample_rows
    )


def _count(reader: SplitRows) -> int:
    count = row_count(reader)
    return -1 if count is None else count


def open_recipe_split(description: Mapping[str, Any], split: str) -> RecipeRows:
    """The reader of one split of a plan of kind ``recipe`` (its ``stream.json``)."""
    splits = _recipe_splits(description["recipe"], json.dumps(description["data"]))
    return RecipeRows(splits[split])


@functools.lru_cache(maxsize=4)
def _recipe_splits(recipe_ref: str, data: str) -> Mapping[str, Any]:
    """The recipe's ``load_data`` once per process (the train step opens three splits)."""
    recipe = load_recipe(recipe_ref)
    value = recipe.call("load_data", DataConfig.model_validate(json.loads(data)))
    if not recipe_datasets(value):
        raise DataError(f"{recipe.ref}: load_data(config) no longer returns torch datasets")
    return value

"""Configuration layering: the YAML file, then the command line on top, validated once."""

from __future__ import annotations

import pytest

from onnxflow.config import layered_config
from onnxflow.errors import ConfigError


def test_the_command_line_wins_over_the_file_field_by_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 16\nrecipe: a.py\n")
    cfg = layered_config(path, {"train": {"epochs": 2, "batch_size": None}, "recipe": None})
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.recipe) == (2, 16, "a.py")
    assert layered_config(None, {"recipe": "b.py"}).recipe == "b.py"


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "config file not found"),
        ("- a list\n", "must hold a mapping of sections"),
        ("train:\n  epochz: 3\n", "invalid configuration in"),
    ],
)
def test_a_config_that_cannot_be_used_is_one_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        layered_config(path, {})
    assert str(path) in str(caught.value)

"""Text: a small transformer encoder classifying token-id sequences (two inputs).

``ids`` (int64 token ids) and ``mask`` (int64 attention mask, 1 = real token) come from an
``.npz`` read by onnxflow's .npz loader. Each sequence holds one marker token (1, 2 or 3) in
its real part, which is its class; the padding after it is filled with random tokens,
markers included, so the model must use the mask to get it right.

    onnxflow run --recipe examples/text/recipe.py

Its own parameter ``width`` (the encoder's, a multiple of 4) is ``train.params.width``; a
sweep can search it: ``sweep: {space: {params.width: {choices: [16, 32, 64]}}}``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

VOCAB = 64
LENGTH = 24
CLASSES = ("one", "two", "three")
ROWS = 3000

#: The recipe's own defaults; the YAML config and command-line options win over them.
DEFAULTS = {
    "train": {"epochs": 3, "batch_size": 64, "learning_rate": 2e-3, "params": {"width": 32}},
    "register": {"model_name": "tokens"},
}


def generate(path: Path, rows: int = ROWS, seed: int = 0) -> Path:
    """Write ``path`` (.npz): ids, mask and label for ``rows`` sequences."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), rows)
    lengths = rng.integers(8, LENGTH + 1, rows)
    ids = rng.integers(4, VOCAB, (rows, LENGTH))
    mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int64)
    for i in range(rows):
        ids[i, rng.integers(0, lengths[i])] = labels[i] + 1  # the marker, in the real part
        pad = np.flatnonzero(mask[i] == 0)
        if len(pad):  # decoys in the padding: a model that ignores the mask gets fooled
            ids[i, rng.choice(pad)] = rng.integers(1, 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.npz")
    np.savez(partial, ids=ids.astype(np.int64), mask=mask, label=np.asarray(CLASSES)[labels])
    partial.replace(path)
    return path


def load_data(config):
    from onnxflow.arrays import load_npz

    path = Path(config.path) if config.path else Path(__file__).parent / "data" / "tokens.npz"
    if not path.exists():
        generate(path)
    return load_npz(path, config)


class Encoder(torch.nn.Module):
    def __init__(self, vocab: int, length: int, n_classes: int, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Parameter(torch.randn(1, length, width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, n_classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask > 0
        x = self.encoder(self.embed(ids) + self.position, src_key_padding_mask=~keep)
        weights = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def build_model(info, params):
    ids = next(s for s in info.inputs if s.name == "ids")
    return Encoder(VOCAB, ids.shape[0], info.n_classes, width=int(params.get("width", 32)))

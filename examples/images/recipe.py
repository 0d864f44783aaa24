"""Images: torchvision's ResNet-18 (random init, no downloaded weights) on generated shapes.

Coloured circles, squares and triangles on noisy backgrounds, written as PNG files in one
folder per class and read back through onnxflow's image-folder loader (resized to
``data.image_size``, RGB, NCHW float32 in 0..1).

    onnxflow run --recipe examples/images/recipe.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle")
PER_CLASS = 600
SIZE = 32

#: The recipe's own defaults; the YAML config and command-line options win over them.
DEFAULTS = {
    "data": {"image_size": SIZE},
    "train": {"epochs": 3, "batch_size": 64, "learning_rate": 1e-3},
    "register": {"model_name": "shapes"},
}


def generate(folder: Path, per_class: int = PER_CLASS, size: int = SIZE, seed: int = 0) -> Path:
    """Write ``folder/<class>/<n>.png``: one random shape per image, noise on top."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    for name in CLASSES:
        (partial / name).mkdir(parents=True)
        for i in range(per_class):
            background = tuple(int(v) for v in rng.integers(0, 90, 3))
            colour = tuple(int(v) for v in rng.integers(120, 256, 3))
            image = Image.new("RGB", (size, size), background)
            draw = ImageDraw.Draw(image)
            r = rng.uniform(0.22, 0.42) * size
            cx, cy = rng.uniform(r, size - r, 2)
            if name == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif name == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            pixels = np.asarray(image, dtype=np.float32)
            pixels += rng.normal(0, 12, pixels.shape)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                partial / name / f"{i:05d}.png"
            )
    if folder.exists():
        shutil.rmtree(partial)  # another run wrote it first
    else:
        partial.rename(folder)
    return folder


def load_data(config):
    from onnxflow.arrays import load_image_folder

    folder = Path(config.path) if config.path else Path(__file__).parent / "data" / "shapes"
    if not folder.exists():
        generate(folder)
    return load_image_folder(folder, config)


def build_model(info):
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=info.n_classes)

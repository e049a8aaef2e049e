"""Shared fixtures: small generated image folders and a tiny, fast TrainingConfig."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# No test may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def write_images(folder, count, seed=0, solid=False):
    """Write `count` small RGB JPEG/PNG images of mixed sizes; with solid=True image i is one grey level."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        if solid:
            array = np.full((40, 40, 3), 8 * i + 4, dtype=np.uint8)
            Image.fromarray(array).save(os.path.join(folder, f"img_{i:03d}.png"))
            continue
        h, w = int(rng.integers(36, 80)), int(rng.integers(36, 80))
        y, x = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 256, size=3)
        array = (base + 80 * np.sin(x[..., None] / (3 + i % 5)) + 60 * np.cos(y[..., None] / 4)) % 256
        ext = "jpg" if i % 2 else "png"
        Image.fromarray(array.astype(np.uint8)).save(os.path.join(folder, f"img_{i:03d}.{ext}"))
    return folder


@pytest.fixture
def image_folder(tmp_path):
    return write_images(str(tmp_path / "images"), 24)


def tiny_config(output_dir, **overrides):
    """A TrainingConfig small enough to train in seconds on a CPU."""
    import helpers

    values = dict(
        image_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        train_batch_size=4,
        eval_batch_size=4,
        num_epochs=2,
        lr_warmup_steps=2,
        save_image_epochs=1,
        save_model_epochs=1,
        mixed_precision="no",
        output_dir=str(output_dir),
        eval_inference_steps=3,
        checkpointing_steps=4,
        checkpoints_total_limit=2,
        logging_steps=2,
    )
    values.update(overrides)
    return helpers.TrainingConfig(**values)

"""Synthetic codes for the GPT tests: each class has its own code pattern, so a tiny GPT learns it in steps.

K = 64 codes on a 4 x 4 grid: the shapes of the tiny tokenizer run (tests/conftest.py `tiny_run`), which
can therefore decode the samples.
"""

import pathlib

import numpy as np

from fvq_jax import config_lib
from tests.codes_dirs import write_codes_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]
K, GRID, CLASSES = 64, 4, 3


def pattern(label: int) -> np.ndarray:
    """The class's codes [GRID, GRID]: (16 c + t) mod K along the row-major positions t."""
    return ((16 * label + np.arange(GRID * GRID)) % K).reshape(GRID, GRID)


def write_synthetic_codes(directory, *, images: int = 48, views: int = 2, noise: float = 0.1,
                          tokenizer: dict | None = None) -> str:
    """`images` images (label i % CLASSES), each `views` noisy copies of its class pattern."""
    rng = np.random.default_rng(0)
    labels = [i % CLASSES for i in range(images)]
    grids = [np.where(rng.random((views, GRID, GRID)) < noise, rng.integers(0, K, (views, GRID, GRID)),
                      pattern(label)[None]) for label in labels]
    return write_codes_dir(directory, grids, labels, codebook_size=K, num_classes=CLASSES, shard_size=16,
                           tokenizer=tokenizer)


def gpt_config(codes_dir, **train):
    """configs/gpt.py with GPT-tiny on `codes_dir`, batch 8, fp32; `train` fields set."""
    config = config_lib.load_file(ROOT / "configs" / "gpt.py").get_config("model=GPT-tiny,batch=8,steps=40")
    config.codes.dir = str(codes_dir)
    config.optim.update(base_lr=3e-3, lr_ref_batch=8)
    config.train.update(log_every=1, checkpoint_every=20, sample_every=0)
    config.train.update(train)
    return config


def train_gpt(config, workdir):
    """What `tasks.run` does with a GPT config: resolve it once against its codes (on the devices present), then
    train."""
    import jax

    from fvq_jax.train import gpt

    return gpt.train_and_evaluate(gpt.resolve(config, jax.device_count(), jax.process_count()), workdir)

"""A CPU-sized tokenizer config for the training tests: 16 x 16 photos, 4 x 4 tokens (configs/tokenizer.py:tiny)."""

import pathlib

from fvq_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(**train):
    """configs/tokenizer.py:tiny with `train` fields set."""
    config = config_lib.load_file(ROOT / "configs" / "tokenizer.py").get_config("tiny")
    config.train.update(train)
    return config


def train(config, workdir):
    """What `tasks.run` does with a tokenizer config: resolve it once (on the devices present), then train."""
    import jax

    from fvq_jax.train import tokenizer

    return tokenizer.train_and_evaluate(tokenizer.resolve(config, jax.device_count(), jax.process_count()), workdir)

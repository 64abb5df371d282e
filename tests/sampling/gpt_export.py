"""Exports the sampling and serving tests load: a GPT with random weights whose codes the tiny tokenizer run
(tests/conftest.py `tiny_run`) decodes (GPT-tiny, K = 64 codes on a 4 x 4 grid, 10 classes), and tokenizers with
random weights. No training: these tests need models the job and the server load, not ones that have learnt."""

from __future__ import annotations

from flax import nnx

from fvq_jax import checkpointing, config_lib
from fvq_jax.conversion.gpt import model_config
from fvq_jax.models.factory import VQGANSpec, build_tokenizer
from fvq_jax.models.gpt import GPTConfig
from tests.codes_dirs import write_codes_dir
from tests.models.tiny_gpt import random_gpt
from tests.train.tiny import ROOT

K, GRID, CLASSES = 64, 4, 10
CLASS_NAMES = tuple(f"class {c} of ten" for c in range(CLASSES))


def write_gpt_export(directory, tokenizer: dict | None, *, codes_dir=None, seed: int = 0) -> str:
    """An export directory of a random GPT-tiny; `tokenizer` is recorded as its codes' tokenizer ({path, step,
    weights}) and `codes_dir` as its codes (the class names come from there)."""
    model = random_gpt(GPTConfig(preset="GPT-tiny", vocab_size=K, num_classes=CLASSES, grid=GRID), seed=seed)
    config = model_config(model.config)
    config.codes = dict(tokenizer=tokenizer, dir=None if codes_dir is None else str(codes_dir))
    checkpointing.save_export(directory, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)), "state": {}},
                              config.to_dict())
    return str(directory)


def write_codes_manifest(directory) -> str:
    """A codes directory of CLASSES named classes (one image each): what a GPT run records as `codes.dir`."""
    return write_codes_dir(directory, [[[[c] * GRID] * GRID] for c in range(CLASSES)], list(range(CLASSES)),
                           codebook_size=K, num_classes=CLASSES, class_names=CLASS_NAMES)


def write_tokenizer_export(directory, *, model: dict | None = None, quantizer: dict | None = None) -> str:
    """An export of configs/tokenizer.py:tiny's tokenizer (random weights) with `model` / `quantizer` fields
    changed."""
    config = config_lib.load_file(ROOT / "configs" / "tokenizer.py").get_config("tiny")
    config.model.update(model or {})
    config.quantizer.update(quantizer or {})
    model = build_tokenizer(VQGANSpec.from_config(config), rngs=nnx.Rngs(0))
    params, rest = nnx.state(model, nnx.Param, ...)
    checkpointing.save_export(directory, {"params": nnx.to_pure_dict(params), "state": nnx.to_pure_dict(rest)},
                              config.to_dict())
    return str(directory)

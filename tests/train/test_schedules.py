"""Learning annealing against closed-form values."""

import math

import numpy as np
import pytest

from fvq_jax import config_lib
from fvq_jax.train import schedules, tokenizer
from fvq_jax.train.optimizer import OptimSpec
from tests.train.tiny import tiny_config

TOTAL, WARM = 1001, 100  # progress s = (step - 100) / 900


def mult(step, kind, **kw):
    return float(schedules.annealing_multiplier(step, total_steps=TOTAL, warmup_steps=WARM, kind=kind, **kw))


@pytest.mark.parametrize("kind", ["lin", "cos", "const"])
def test_warmup_is_linear_from_0_005(kind):
    assert mult(0, kind) == pytest.approx(0.005)
    assert mult(50, kind) == pytest.approx(0.005 + 0.995 * 0.5)
    assert mult(99, kind) == pytest.approx(0.005 + 0.995 * 0.99)
    assert mult(100, kind) == pytest.approx(1.0)


def test_linear_annealing_closed_form():
    # s < T = 0.3 (step < 370): flat at 1.
    for step in (100, 200, 369):
        assert mult(step, "lin") == pytest.approx(1.0)
    for step in (370, 500, 777, 1000):
        s = (step - 100) / 900
        assert mult(step, "lin") == pytest.approx(0.01 + 0.99 * (1 - s) / 0.7, rel=1e-5)
    assert mult(1000, "lin") == pytest.approx(0.01)


def test_cosine_annealing_closed_form():
    for step in (370, 500, 685, 1000):
        s = (step - 100) / 900
        want = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - 0.3) / 0.7))
        assert mult(step, "cos") == pytest.approx(want, rel=1e-5)
    assert mult(1000, "cos") == pytest.approx(0.01)


def test_const_and_custom_decay_start():
    assert all(mult(s, "const") == pytest.approx(1.0) for s in (100, 600, 1000))
    assert mult(100, "lin", decay_start=0.0) == pytest.approx(1.0)
    assert mult(550, "lin", decay_start=0.0) == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-5)


OPTIM = dict(base_lr=1e-4, lr_ref_batch=128, warmup_steps=WARM, schedule="lin", warmup_start=0.005,
             decay_start=0.3, final_mult=0.01, b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0, ema_decay=0.0)


def test_learning_rate_scales_with_global_batch():
    optim = OptimSpec.from_config(OPTIM, "optim")
    lr = schedules.learning_rate_schedule(optim, total_steps=TOTAL, global_batch=512)
    np.testing.assert_allclose(float(lr(200)), 4e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(0)), 4e-4 * 0.005, rtol=1e-6)


@pytest.mark.parametrize("field,value", [("schedule", "step"), ("decay_start", 1.0), ("b2", 1.0), ("ema_decay", -0.1),
                                         ("base_lr", 0.0), ("warmup_steps", -1), ("grad_clip", -1.0)])
def test_bad_optim_values_name_the_field(field, value):
    with pytest.raises(config_lib.ConfigError, match=f"config field optim.{field}:"):
        OptimSpec.from_config(dict(OPTIM, **{field: value}), "optim")


def test_warmup_must_end_before_the_last_step():
    config = tiny_config(num_steps=12)
    config.optim.warmup_steps = 12
    with pytest.raises(config_lib.ConfigError, match="config field optim.warmup_steps: 12 must be below "
                                                     "train.num_steps=12"):
        tokenizer.resolve(config)
    config.optim.warmup_steps = 11
    assert tokenizer.resolve(config).optim.warmup_steps == 11

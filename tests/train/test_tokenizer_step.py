"""The tokenizer train step: its pieces against direct autodiff, and the non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax import sharding
from fvq_jax.train import schedules
from fvq_jax.train.optimizer import make_optimizer
from fvq_jax.train.tokenizer import build_trainer, resolve
from fvq_jax.train.tokenizer_step import last_layer_kernel_grad, make_train_step
from tests.train.tiny import tiny_config


def test_last_layer_kernel_grad_equals_autodiff():
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 3)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    graph, params = nnx.split(nnx.Conv(4, 3, (3, 3), rngs=nnx.Rngs(0)))

    def conv(k):
        pure = params.to_pure_dict()
        pure["kernel"] = k
        new = jax.tree.map(lambda x: x, params)
        nnx.replace_by_pure_dict(new, pure)
        return nnx.merge(graph, new)(feats)

    def loss_of_output(out):
        return jnp.sum(jnp.sin(out) * target)

    want = jax.grad(lambda k: loss_of_output(conv(k)))(kernel)
    out_grad = jax.grad(loss_of_output)(conv(kernel))
    np.testing.assert_allclose(last_layer_kernel_grad(feats, kernel, out_grad), want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def step_setup():
    config = tiny_config()
    config.loss.adaptive_weight = True
    config.loss.disc_start = 0
    spec = resolve(config)
    trainer = build_trainer(spec, sharding.make_mesh(spec.mesh))
    total, batch = spec.train.num_steps, spec.train.global_batch
    tx = make_optimizer(spec.optim, total_steps=total, global_batch=batch)
    lr = schedules.learning_rate_schedule(spec.optim, total_steps=total, global_batch=batch)
    # Jitted without donation: the tests compare the states before and after a step.
    step = jax.jit(make_train_step(trainer.graphs, trainer.lpips_graph, spec.loss, tx, tx, lr,
                                   ema_decay=spec.optim.ema_decay))
    init, lpips_state = trainer.init, trainer.lpips_state
    images = np.random.default_rng(0).integers(0, 256, size=(batch, 16, 16, 3), dtype=np.uint8)
    return config, init, step, lpips_state, {"image": images, "label": np.zeros(batch, np.int32)}


def test_step_updates_everything_and_reports(step_setup):
    config, init, step, lpips_state, batch = step_setup
    state = init()
    new, metrics = step(state, lpips_state, batch)
    assert int(new.step) == 1 and float(metrics["finite"]) == 1.0
    for name in ("loss", "pixel_loss", "perceptual_loss", "quantizer_loss", "disc_loss", "grad_norm", "usage"):
        assert np.isfinite(float(metrics[name])), name
    assert float(metrics["disc_factor"]) == 1.0 and float(metrics["adaptive_weight"]) > 0
    lr0 = config.optim.base_lr * config.optim.warmup_start  # lr_ref_batch == global_batch in the tiny config
    np.testing.assert_allclose(float(metrics["lr"]), lr0, rtol=1e-6)
    # The bridge head starts at zero, so the layers before it (and the raw codebook) get their
    # first gradient in the second step; after two steps every generator parameter has moved.
    newer, _ = step(new, lpips_state, batch)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), newer.params, state.params)
    assert all(jax.tree.leaves(changed)), "every generator parameter moves within two steps"
    head = new.params["quantizer"]["projector"]["head"]["kernel"][...]
    assert float(jnp.abs(head).max()) > 0
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.disc_params, state.disc_params)))
    # The usage window received this batch's 4 x 4 x 4 indices.
    positions = [x for x in jax.tree.leaves(new.model_state) if x.shape == ()]
    assert any(int(p) == 64 for p in positions)


def test_non_finite_step_leaves_state_unchanged(step_setup):
    _, init, step, lpips_state, batch = step_setup
    state = init()
    # Poison one decoder weight: every loss becomes NaN.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[(0,) * x.ndim].set(jnp.nan) if "conv_out" in jax.tree_util.keystr(path)
        and "decoder" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path) else x,
        state.params)
    state = state.replace(params=params)
    new, metrics = step(state, lpips_state, batch)
    assert float(metrics["finite"]) == 0.0
    assert not np.isfinite(float(metrics["pixel_loss"]))
    assert int(new.step) == 0
    same = jax.tree.map(lambda a, b: bool(jnp.all((a == b) | (jnp.isnan(a) & jnp.isnan(b)))), new, state)
    assert all(jax.tree.leaves(same))

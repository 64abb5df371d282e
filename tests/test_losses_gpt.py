"""The chunked cross-entropy equals the plain one (optax on full logits) in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fvq_jax.benchmarks.gpt_loss_memory import loss_grad_memory
from fvq_jax.losses_gpt import chunked_cross_entropy, full_cross_entropy

B, N, DIM, K = 2, 12, 32, 200  # 24 tokens


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(B, N, DIM)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(DIM, K)) / 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, K, (B, N)), jnp.int32)
    return hidden, kernel, targets


def optax_loss(hidden, kernel, targets):
    logits = hidden.reshape(-1, DIM) @ kernel
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets.reshape(-1)))


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 24, 100])  # 5 and 100 do not divide 24 tokens
def test_value_accuracy_and_gradients_equal_the_plain_loss(data, chunk_size):
    hidden, kernel, targets = data
    want, want_grads = jax.jit(jax.value_and_grad(optax_loss, argnums=(0, 1)))(hidden, kernel, targets)
    fn = jax.jit(jax.value_and_grad(lambda h, k: chunked_cross_entropy(h, k, targets, chunk_size=chunk_size),
                                    argnums=(0, 1), has_aux=True))
    (loss, accuracy), grads = fn(hidden, kernel)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    logits = np.asarray(hidden).reshape(-1, DIM) @ np.asarray(kernel)
    np.testing.assert_allclose(float(accuracy), np.mean(logits.argmax(-1) == np.asarray(targets).reshape(-1)))
    for got, ref in zip(grads, want_grads):
        assert got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)


def test_flat_tokens_and_an_accuracy_with_known_answer(data):
    hidden, kernel, targets = data
    loss = jax.jit(chunked_cross_entropy, static_argnames="chunk_size")
    flat = loss(hidden.reshape(-1, DIM), kernel, targets.reshape(-1), chunk_size=7)
    batched = loss(hidden, kernel, targets, chunk_size=7)
    np.testing.assert_allclose(np.asarray(flat), np.asarray(batched), rtol=1e-6)
    best = jnp.argmax(hidden.reshape(-1, DIM) @ kernel, axis=-1)
    hits = jnp.where(jnp.arange(best.shape[0]) < 6, best, (best + 1) % K)  # 6 of 24 correct
    assert float(loss(hidden, kernel, hits, chunk_size=7)[1]) == pytest.approx(0.25)


def test_bf16_hidden_matches_the_full_loss_in_the_same_precision(data):
    hidden, kernel, targets = data
    hidden = hidden.astype(jnp.bfloat16)
    full = jax.jit(jax.value_and_grad(lambda h, k: full_cross_entropy(h, k, targets)[0], argnums=(0, 1)))(
        hidden, kernel)
    chunked = jax.jit(jax.value_and_grad(lambda h, k: chunked_cross_entropy(h, k, targets, chunk_size=5)[0],
                                         argnums=(0, 1)))(hidden, kernel)
    np.testing.assert_allclose(float(chunked[0]), float(full[0]), rtol=1e-5)
    assert chunked[1][0].dtype == jnp.bfloat16 and chunked[1][1].dtype == jnp.float32
    for got, ref in zip(chunked[1], full[1]):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=1e-3)
    fp32 = jax.jit(optax_loss)(hidden.astype(jnp.float32), kernel, targets)
    np.testing.assert_allclose(float(chunked[0]), float(fp32), rtol=1e-2)


def test_chunking_removes_the_logits_from_the_peak_memory():
    """Compile only: 1024 tokens x K 8192 float32 logits are 32 MiB (and as much again for their gradient)."""
    full = loss_grad_memory(1024, 64, 8192, chunk_size=None, dtype=jnp.float32)
    chunked = loss_grad_memory(1024, 64, 8192, chunk_size=64, dtype=jnp.float32)
    assert full["temp_GiB"] * 2 ** 10 > 64  # both [T, K] buffers
    assert chunked["temp_GiB"] * 5 < full["temp_GiB"]
    assert chunked["arguments_GiB"] == full["arguments_GiB"]

"""The generator's next-token cross-entropy without materialising the [tokens, K] logits.

At GPT-XL scale with K = 262,144 codes the float32 logits of one batch (and their gradient) dwarf the
model's activations. `chunked_cross_entropy` applies the output layer to `chunk_size` tokens at a time
inside a lax.scan whose body is rematerialised (jax.checkpoint): the forward keeps only per-chunk sums,
and the backward recomputes one chunk's logits at a time, so peak memory holds one [chunk, K] block
instead of [tokens, K]. `full_cross_entropy` is the same loss over the whole logits matrix (the
baseline of benchmarks/gpt_loss_memory.py; fine for small K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_sums(kernel: jax.Array, hidden: jax.Array, targets: jax.Array, valid: jax.Array):
    """hidden: [C, dim], targets, valid: [C] -> (sum of the token losses, number correct), float32."""
    # Cast here, not once outside: the kernel's gradient then sums over chunks in float32.
    logits = jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)  # [C, K]
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    correct = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(jnp.where(valid, correct, 0)).astype(jnp.float32)


def _flatten(hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).astype(jnp.int32)


def full_cross_entropy(hidden: jax.Array, output_kernel: jax.Array,
                       targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`chunked_cross_entropy` with one chunk holding every token: materialises the [T, K] logits."""
    hidden, targets = _flatten(hidden, targets)
    nll, correct = _chunk_sums(output_kernel, hidden, targets, jnp.ones(targets.shape, bool))
    return nll / targets.shape[0], correct / targets.shape[0]


def chunked_cross_entropy(hidden: jax.Array, output_kernel: jax.Array, targets: jax.Array, *,
                          chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and token accuracy of logits = hidden @ output_kernel, `chunk_size` tokens at a time.

    hidden: [T, dim] or [B, N, dim] (compute dtype); output_kernel: [dim, K] (cast to hidden's dtype);
    targets: [T] or [B, N] int. Logits are float32 inside a chunk. A last partial chunk is zero-padded
    and masked. -> (loss, accuracy) float32 scalars, both means over all tokens.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden, targets = _flatten(hidden, targets)
    total, dim = hidden.shape
    chunks = -(-total // chunk_size)
    pad = chunks * chunk_size - total
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(chunks, chunk_size, dim)
    targets = jnp.pad(targets, (0, pad)).reshape(chunks, chunk_size)
    valid = (jnp.arange(chunks * chunk_size) < total).reshape(chunks, chunk_size)
    chunk_sums = jax.checkpoint(_chunk_sums)

    def body(carry, chunk):
        nll, correct = chunk_sums(output_kernel, *chunk)
        return (carry[0] + nll, carry[1] + correct), None

    (nll, correct), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), (hidden, targets, valid))
    return nll / total, correct / total

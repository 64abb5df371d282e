"""The tokenizer's reconstruction and adversarial losses as small pure functions (float32 scalars).

The adversarial terms follow taming-transformers / LlamaGen: the discriminator losses average
the real and the fake term (the factor 0.5); `logits_*` are the PatchGAN outputs [B, h, w, 1]
(any shape works: every term is a mean over all elements). The perceptual term is the mean of
`models.lpips.LPIPS`; the quantizer's losses live in `quantizers.ops`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


PIXEL_LOSSES = ("l2", "l1")  # the kinds of pixel_loss


def pixel_loss(x: jax.Array, y: jax.Array, kind: str = "l2") -> jax.Array:
    """mean((x - y)^2) ('l2') or mean(|x - y|) ('l1') over all elements."""
    diff = _f32(x) - _f32(y)
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    raise ValueError(f"pixel loss kind must be 'l2' or 'l1', got {kind!r}")


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))): 0 once real >= 1 and fake <= -1."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f32(logits_real))) + jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake))))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(softplus(-real)) + mean(softplus(fake))): the mean binary cross-entropy with
    label 1 for real and 0 for fake."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(logits_real))) + jnp.mean(jax.nn.softplus(_f32(logits_fake))))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean(fake): the generator loss taming uses with either discriminator loss."""
    return -jnp.mean(_f32(logits_fake))


def non_saturating_g_loss(logits_fake: jax.Array) -> jax.Array:
    """mean(softplus(-fake)) = BCE(fake, label 1). (LlamaGen's version passes the arguments of
    binary_cross_entropy_with_logits the other way round, which is linear in the logits.)"""
    return jnp.mean(jax.nn.softplus(-_f32(logits_fake)))


D_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}
G_LOSSES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "hinge": hinge_g_loss,
    "non_saturating": non_saturating_g_loss,
}


def d_loss_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The discriminator loss (logits_real, logits_fake) -> scalar called `name`."""
    if name not in D_LOSSES:
        raise ValueError(f"unknown discriminator loss {name!r}; choose from {list(D_LOSSES)}")
    return D_LOSSES[name]


def g_loss_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The generator loss logits_fake -> scalar called `name`."""
    if name not in G_LOSSES:
        raise ValueError(f"unknown generator loss {name!r}; choose from {list(G_LOSSES)}")
    return G_LOSSES[name]


def global_norm(tree) -> jax.Array:
    """L2 norm over every element of a pytree (or array), in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(x))) for x in jax.tree.leaves(tree)))


def adaptive_weight(nll_grads, g_grads, max_weight: float = 1e4) -> jax.Array:
    """||nll_grads|| / (||g_grads|| + 1e-4) clipped to [0, max_weight], without gradient.

    Both are gradients w.r.t. the decoder's last layer (its kernel, or a pytree of its
    parameters): of the reconstruction (pixel + perceptual) loss and of the generator loss.
    The GAN term is scaled by this times its configured weight, so it pulls about as hard as
    the reconstruction.
    """
    weight = global_norm(nll_grads) / (global_norm(g_grads) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def disc_factor(step: jax.Array | int, start: int) -> jax.Array:
    """1.0 from step `start` on, 0.0 before: switches the GAN terms on (works on traced steps)."""
    return jnp.where(jnp.asarray(step) >= start, 1.0, 0.0).astype(jnp.float32)

"""One FVQ tokenizer update: the generator step then the discriminator step, as one pure function.

generator loss = pixel_weight * pixel + perceptual_weight * LPIPS + codebook_weight * VQ losses
                 + disc_factor * disc_weight * [adaptive weight] * generator GAN loss
discriminator loss = disc_factor * GAN discriminator loss on (real, sg(reconstruction))
disc_factor is 0 before `disc_start` and 1 after, as in the reference.

A step whose losses or gradient norms are not finite leaves the state unchanged and reports
`finite = 0`; the loop then stops naming the step and the values (fvq_jax.train.update; the loop
also checks the new parameters' norms before the state can be saved).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fvq_jax import config_lib, losses
from fvq_jax.data.value_range import to_model_range
from fvq_jax.train.optimizer import ema_update
from fvq_jax.train.tokenizer_state import Graphs, TokenizerState
from fvq_jax.train.update import apply_gradients, keep_if_finite

# Values the step's guard checks (the loop checks the new parameters' norms after the step).
CHECKED = ("pixel_loss", "perceptual_loss", "quantizer_loss", "gen_gan_loss", "disc_loss", "grad_norm",
           "disc_grad_norm")


@dataclasses.dataclass(frozen=True)
class LossSpec(config_lib.Spec):
    """The tokenizer's `loss` block resolved (configs/tokenizer.py describes each field)."""

    pixel: str  # losses.PIXEL_LOSSES
    pixel_weight: float
    perceptual_weight: float
    codebook_weight: float  # scales the quantizer's total loss
    disc_weight: float
    disc_start: int  # the step the GAN terms switch on
    disc_loss: str  # losses.D_LOSSES
    gen_loss: str  # losses.G_LOSSES
    adaptive_weight: bool

    def __post_init__(self):
        config_lib.require_choice(self.pixel, "pixel", losses.PIXEL_LOSSES)
        for name in ("pixel_weight", "perceptual_weight", "codebook_weight", "disc_weight"):
            config_lib.require_number(getattr(self, name), name, strict=False)
        config_lib.require_number(self.disc_start, "disc_start", strict=False, integer=True)
        config_lib.require_choice(self.disc_loss, "disc_loss", tuple(losses.D_LOSSES))
        config_lib.require_choice(self.gen_loss, "gen_loss", tuple(losses.G_LOSSES))
        config_lib.require(isinstance(self.adaptive_weight, bool), "adaptive_weight",
                           f"must be true or false, got {self.adaptive_weight!r}")


def last_layer_kernel_grad(features: jax.Array, kernel: jax.Array, out_grad: jax.Array) -> jax.Array:
    """Gradient at the decoder's output-conv kernel given the gradient at its output.

    The conv is linear in its kernel, so this is one vjp of the conv alone.
    """
    def apply(k):
        return jax.lax.conv_general_dilated(features.astype(jnp.float32), k, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vjp(apply, kernel)[1](out_grad)[0]


def make_train_step(graphs: Graphs, lpips_graph: nnx.GraphDef, loss_cfg: LossSpec,
                    tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation,
                    lr_schedule: Callable, *, ema_decay: float) -> Callable:
    """train_step(state, lpips_state, batch) -> (state, metrics); jit it with shardings. ema_decay: optim.ema_decay
    (used when the state keeps an EMA)."""
    pixel = lambda x, y: losses.pixel_loss(x, y, loss_cfg.pixel)  # noqa: E731
    d_loss_fn = losses.d_loss_fn(loss_cfg.disc_loss)
    g_loss_fn = losses.g_loss_fn(loss_cfg.gen_loss)

    def train_step(state: TokenizerState, lpips_state: nnx.State, batch: dict):
        images = to_model_range(batch["image"])
        disc_factor = losses.disc_factor(state.step, loss_cfg.disc_start)
        lpips = nnx.merge(lpips_graph, lpips_state)

        def perceptual(recon):
            return jnp.mean(lpips(recon, images))

        def generator_loss(params):
            # copy=True: fresh Variables at this trace level, which the modules may then update
            # (usage window, BatchNorm statistics) without touching the caller's state.
            model = nnx.merge(graphs.generator, params, state.model_state, copy=True)
            disc = nnx.merge(graphs.discriminator, state.disc_params, state.disc_state, copy=True)
            z_q, _, q = model.encode(images, train=True)
            features = model.decode_features(z_q)
            recon = model.last_layer()(features).astype(jnp.float32)
            pixel_loss = pixel(recon, images)
            perceptual_loss = perceptual(recon)
            gen_gan_loss = g_loss_fn(disc(recon, train=True))
            if loss_cfg.adaptive_weight:
                kernel = model.last_layer().kernel[...]
                nll_grad = jax.grad(lambda r: loss_cfg.pixel_weight * pixel(r, images)
                                    + loss_cfg.perceptual_weight * perceptual(r))(jax.lax.stop_gradient(recon))
                gan_grad = jax.grad(lambda r: g_loss_fn(nnx.merge(
                    graphs.discriminator, state.disc_params, state.disc_state, copy=True)(r, train=True)))(
                    jax.lax.stop_gradient(recon))
                feats = jax.lax.stop_gradient(features)
                adaptive = losses.adaptive_weight(last_layer_kernel_grad(feats, kernel, nll_grad),
                                                  last_layer_kernel_grad(feats, kernel, gan_grad))
            else:
                adaptive = jnp.ones((), jnp.float32)
            total = (loss_cfg.pixel_weight * pixel_loss + loss_cfg.perceptual_weight * perceptual_loss
                     + loss_cfg.codebook_weight * q["loss"]
                     + disc_factor * loss_cfg.disc_weight * adaptive * gen_gan_loss)
            metrics = {
                "loss": total, "pixel_loss": pixel_loss, "perceptual_loss": perceptual_loss,
                "quantizer_loss": q["loss"], "codebook_loss": q["codebook_loss"],
                "commitment_loss": q["commitment_loss"], "entropy_loss": q["entropy_loss"],
                "gen_gan_loss": gen_gan_loss, "adaptive_weight": adaptive, "perplexity": q["perplexity"],
                "usage": q["usage"],
            }
            metrics.update({k: q[k] for k in ("pull_loss", "pulled_codes") if k in q})  # quantizer.restart 'pull' / 'claim'
            return total, (metrics, nnx.state(model, nnx.Not(nnx.Param)), recon)

        (_, (metrics, model_state, recon)), grads = jax.value_and_grad(generator_loss, has_aux=True)(state.params)
        params, opt_state, norms = apply_gradients(tx, grads, state.opt_state, state.params)

        def discriminator_loss(disc_params):
            disc = nnx.merge(graphs.discriminator, disc_params, state.disc_state, copy=True)
            logits_real = disc(images, train=True)
            logits_fake = disc(jax.lax.stop_gradient(recon), train=True)
            loss = disc_factor * d_loss_fn(logits_real, logits_fake)
            return loss, (nnx.state(disc, nnx.Not(nnx.Param)), jnp.mean(logits_real), jnp.mean(logits_fake))

        (disc_loss, (disc_state, logits_real, logits_fake)), disc_grads = jax.value_and_grad(
            discriminator_loss, has_aux=True)(state.disc_params)
        disc_params, disc_opt_state, disc_norms = apply_gradients(disc_tx, disc_grads, state.disc_opt_state,
                                                                  state.disc_params, prefix="disc_")
        ema_params = state.ema_params if state.ema_params is None else ema_update(state.ema_params, params, ema_decay)

        metrics.update(norms, **disc_norms, disc_loss=disc_loss, logits_real=logits_real, logits_fake=logits_fake,
                       disc_factor=disc_factor, lr=lr_schedule(state.step))
        new_state = state.replace(
            step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
            ema_params=ema_params, disc_params=disc_params, disc_state=disc_state, disc_opt_state=disc_opt_state)
        new_state, metrics["finite"] = keep_if_finite(new_state, state, {k: metrics[k] for k in CHECKED})
        return new_state, metrics

    return train_step

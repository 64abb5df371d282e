"""Shared by the quantizer-variant tests: a tiny VQ-GAN, a few Adam steps, and jitted round trips.

The jitted functions live at module level so that tests building the same model structure
reuse one compilation.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.models.vqgan import VQGAN, VQGANArch
from fvq_jax.quantizers.factory import QuantizerSpec, build_quantizer

TINY = VQGANArch(ch=16, ch_mult=(1, 2), enc_blocks=1, dec_blocks=1, z_channels=16, norm_groups=4)
IMAGE_SIZE = 16  # -> 8 x 8 tokens
GRID = IMAGE_SIZE // TINY.downsample_factor
TINY_SCALES = (1, 2, 3, 5, 8)  # 3 and 5 do not divide 8: overlapping area boxes

_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def tokenizer_config(arg: str = ""):
    """configs/tokenizer.py's get_config(arg)."""
    return config_lib.load_file(_CONFIGS / "tokenizer.py").get_config(arg)


def quantizer_config(**fields) -> QuantizerSpec:
    """The default config's quantizer block at test size (K = 64, D = 8), with `fields` set, resolved."""
    cfg = tokenizer_config().quantizer.to_dict()
    cfg.update(dict(codebook_size=64, code_dim=8, projector="XS/2", scales=TINY_SCALES, residual_depth=3,
                    usage_window=256))
    cfg.update(fields)
    return QuantizerSpec.from_config(cfg, "quantizer")


def tiny_vqgan(seed=0, **quantizer_fields) -> VQGAN:
    quantizer = build_quantizer(quantizer_config(**quantizer_fields), rngs=nnx.Rngs(seed + 1))
    return VQGAN(TINY, quantizer, rngs=nnx.Rngs(seed))


def randomize_bridge_head(model: VQGAN, seed=2, scale=0.05) -> None:
    """Non-zero VQBridge head, so the bridged codes differ from the start (it is zero-initialised)."""
    head = model.quantizer.projector.head
    head.kernel[...] = scale * jax.random.normal(jax.random.key(seed), head.kernel.shape)
    head.bias[...] = scale * jax.random.normal(jax.random.key(seed + 1), head.bias.shape)


def smooth_images(seed=0, batch=2) -> jax.Array:
    """[B, 16, 16, 3] in [-1, 1], smooth enough for a tiny model to fit in a few steps."""
    coarse = jax.random.uniform(jax.random.key(seed), (batch, 4, 4, 3), minval=-1, maxval=1)
    return jax.image.resize(coarse, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), "bilinear")


def train(model: VQGAN, images: jax.Array, steps: int = 20, lr: float = 1e-3) -> list[float]:
    """Adam on the nnx.Params (MSE + quantizer loss); non-parameter state (usage window, EMA
    statistics) is carried from step to step and written back into `model`. Returns the losses."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, rest, opt_state):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            recon, aux = m(images, train=True)
            return jnp.mean(jnp.square(recon - images)) + aux["loss"], nnx.state(m, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    losses = []
    for _ in range(steps):
        params, rest, opt_state, loss = step(params, rest, opt_state)
        losses.append(float(loss))
    nnx.update(model, params, rest)
    return losses


@nnx.jit
def reconstruct(model: VQGAN, images: jax.Array):
    """(reconstruction, indices) of the eval-mode forward pass."""
    recon, aux = model(images)
    return recon, aux["indices"]


decode_codes = nnx.jit(lambda model, indices: model.decode_codes(indices))


def decode_error(model: VQGAN, images: jax.Array) -> tuple[float, np.ndarray]:
    """max |decode_codes(indices) - forward reconstruction|, and the indices."""
    recon, indices = reconstruct(model, images)
    decoded = decode_codes(model, indices)
    return float(jnp.max(jnp.abs(decoded - recon))), np.asarray(indices)

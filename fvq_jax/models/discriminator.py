"""The PatchGAN discriminator of taming-transformers / LlamaGen ("NLayerDiscriminator"), NHWC.

4x4 convs with padding 1: `num_layers` stride-2 convs, then two stride-1 convs, the last to a
single logit per patch. A 256 x 256 image gives 30 x 30 logits with the default 3 layers (each
logit sees a 70 x 70 patch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# The reference init (taming's `weights_init`): conv kernels N(0, 0.02), BatchNorm scale
# N(1, 0.02) and bias 0. Conv biases start at zero here (taming keeps torch's default).
kernel_init = nnx.initializers.normal(0.02)


def scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def logits_size(image_size: int, num_layers: int) -> int:
    """Side of the logit grid for a square input: halve (floor) num_layers times, minus 2."""
    return image_size // 2 ** num_layers - 2


def conv4x4(in_ch: int, out_ch: int, *, stride: int, use_bias: bool, dtype, rngs) -> nnx.Conv:
    return nnx.Conv(in_ch, out_ch, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                    use_bias=use_bias, kernel_init=kernel_init, dtype=dtype, rngs=rngs)


class ConvNormAct(nnx.Module):
    """4x4 conv without bias, BatchNorm (torch BatchNorm2d defaults), LeakyReLU(0.2)."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, dtype, rngs: nnx.Rngs):
        self.conv = conv4x4(in_ch, out_ch, stride=stride, use_bias=False, dtype=dtype, rngs=rngs)
        # torch momentum 0.1 == flax momentum 0.9. Flax tracks the biased batch variance where
        # torch tracks the unbiased one: a factor n / (n - 1) with n = B * H * W.
        self.norm = nnx.BatchNorm(out_ch, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                                  scale_init=scale_init, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return jax.nn.leaky_relu(self.norm(self.conv(x), use_running_average=not train), 0.2)


class PatchDiscriminator(nnx.Module):
    """conv(stride 2) + LeakyReLU; num_layers - 1 x [conv(stride 2) + BN + LeakyReLU];
    conv(stride 1) + BN + LeakyReLU; conv(stride 1) to one channel. Channels: filters x
    min(2**n, 8) at layer n."""

    def __init__(self, in_channels: int = 3, filters: int = 64, num_layers: int = 3, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if num_layers < 1 or filters < 1:
            raise ValueError(f"PatchDiscriminator needs num_layers >= 1 and filters >= 1, got {num_layers}, {filters}")
        self.num_layers = num_layers
        self.dtype = dtype
        self.conv_in = conv4x4(in_channels, filters, stride=2, use_bias=True, dtype=dtype, rngs=rngs)
        blocks, ch = [], filters
        for n in range(1, num_layers + 1):
            out_ch = filters * min(2 ** n, 8)
            blocks.append(ConvNormAct(ch, out_ch, stride=2 if n < num_layers else 1, dtype=dtype, rngs=rngs))
            ch = out_ch
        self.blocks = nnx.List(blocks)
        self.conv_out = conv4x4(ch, 1, stride=1, use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x: [B, H, W, C] -> logits [B, h, w, 1] float32 (h = logits_size(H, num_layers)).

        train=True normalises with batch statistics and updates the running averages;
        train=False uses the running averages.
        """
        h_out, w_out = (logits_size(s, self.num_layers) for s in x.shape[1:3])
        if h_out < 1 or w_out < 1:
            raise ValueError(f"PatchDiscriminator with {self.num_layers} layers needs inputs of at least "
                             f"{3 * 2 ** self.num_layers} pixels a side, got {x.shape[1]}x{x.shape[2]}")
        h = jax.nn.leaky_relu(self.conv_in(x.astype(self.dtype)), 0.2)
        for block in self.blocks:
            h = block(h, train=train)
        return self.conv_out(h).astype(jnp.float32)

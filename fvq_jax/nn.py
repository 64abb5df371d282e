"""Layer helpers below both models/ and quantizers/: PyTorch's default initialisers and the conv they build.

The reference tokenizers (and the ablation projectors the paper compares with) keep PyTorch's default
init for convs and Linear layers: kernel Kaiming-uniform with a = sqrt(5), i.e. gain^2 = 2 / (1 + a^2) = 1/3
and bound sqrt(3 gain^2 / fan_in) = 1 / sqrt(fan_in); bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (a bias init sees only its own shape, so the fan-in comes in here)."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding="SAME", dtype, rngs) -> nnx.Conv:
    """A square conv with PyTorch's default init (NHWC)."""
    # The non-zero biases matter: at step 0 FVQ's codes are all zero, and with zero biases the decoder would
    # see an all-zero input, whose GroupNorm gradients (1/sqrt(eps) per layer) overflow.
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=padding,
                    kernel_init=torch_kernel_init, bias_init=torch_bias_init(in_ch * kernel * kernel),
                    dtype=dtype, rngs=rngs)

"""fvq_jax: FVQ tokenizers (VQ-GAN + VQBridge, 100% codebook usage) in JAX / Flax NNX."""

__version__ = "0.1.0"

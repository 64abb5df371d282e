"""Peak memory of the GPT loss + gradient: chunked vs full cross-entropy, compile only (nothing runs).

  python -m fvq_jax.benchmarks.gpt_loss_memory                  # K = 262,144, dim 1280 (GPT-XL), 8,192 tokens
  python -m fvq_jax.benchmarks.gpt_loss_memory --tokens=32768 --chunk=2048

What is compiled is value_and_grad of the loss w.r.t. the hidden states [T, dim] (compute dtype) and the
float32 output kernel [dim, K]. Memory is XLA's buffer assignment for one call; arguments and outputs
(hidden, kernel and their gradients) are the same for both, so the temporaries are what differ.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from fvq_jax.benchmarks.common import describe_device, emit
from fvq_jax.losses_gpt import chunked_cross_entropy, full_cross_entropy


def loss_grad_memory(num_tokens: int, dim: int, vocab_size: int, *, chunk_size: int | None,
                     dtype=jnp.bfloat16) -> dict[str, float]:
    """GiB of the compiled loss + gradient (chunk_size None: the full logits): temp, arguments, outputs, total."""
    loss = full_cross_entropy if chunk_size is None else functools.partial(chunked_cross_entropy,
                                                                           chunk_size=chunk_size)
    fn = jax.jit(jax.value_and_grad(lambda h, k, t: loss(h, k, t)[0], argnums=(0, 1)))
    args = (jax.ShapeDtypeStruct((num_tokens, dim), dtype), jax.ShapeDtypeStruct((dim, vocab_size), jnp.float32),
            jax.ShapeDtypeStruct((num_tokens,), jnp.int32))
    stats = fn.lower(*args).compile().memory_analysis()
    gib = {"temp_GiB": stats.temp_size_in_bytes, "arguments_GiB": stats.argument_size_in_bytes,
           "outputs_GiB": stats.output_size_in_bytes}
    gib = {k: v / 2 ** 30 for k, v in gib.items()}
    gib["total_GiB"] = sum(gib.values()) - stats.alias_size_in_bytes / 2 ** 30
    return gib


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per device step (32 images x 16 x 16)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    common = dict(tokens=args.tokens, dim=args.dim, K=args.vocab, dtype=args.dtype, device=describe_device())
    full = loss_grad_memory(args.tokens, args.dim, args.vocab, chunk_size=None, dtype=jnp.dtype(args.dtype))
    emit(dict(what="gpt_loss_grad_memory", mode="full", **full, **common), args.out)
    chunked = loss_grad_memory(args.tokens, args.dim, args.vocab, chunk_size=args.chunk, dtype=jnp.dtype(args.dtype))
    emit(dict(what="gpt_loss_grad_memory", mode="chunked", chunk=args.chunk, **chunked, **common), args.out)
    emit(dict(what="gpt_loss_grad_memory_ratio", full_over_chunked_total=full["total_GiB"] / chunked["total_GiB"],
              full_over_chunked_temp=full["temp_GiB"] / chunked["temp_GiB"], **common), args.out)


if __name__ == "__main__":
    main()

"""Quantizer forward+backward: tiled vs naive nearest-code search, same run, same inputs.

  python -m fvq_jax.benchmarks.quantizer                       # K in {16k, 65k, 262k}, tokens {2048, 8192}
  python -m fvq_jax.benchmarks.quantizer --codebooks=16384 --tokens=2048 --iters=3   # CPU-sized

What is timed is the whole quantizer as training runs it: VQBridge (L/4 below K = 65,536,
L/8 from there, the reference recipes) on the raw codebook, nearest-code search for `tokens`
D = 256 vectors, gather, codebook + commitment losses, a downstream loss on z_q, and the
backward pass to the raw codebook, the bridge and z. Memory is XLA's buffer assignment for
one call (arguments + outputs + temporaries). On a GPU the bare N x K x D product (the floor
for any exact search) is timed too.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from fvq_jax.benchmarks.common import compiled_memory_gib, describe_device, emit, time_fn
from fvq_jax.quantizers.vq import SearchOptions, VectorQuantizer


def bridge_for(codebook_size: int) -> str:
    return "L/4" if codebook_size < 65_536 else "L/8"


def quantizer_step(codebook_size: int, dim: int, search: SearchOptions, bridge: str):
    """(jitted fwd+bwd of the quantizer, its arguments)."""
    quantizer = VectorQuantizer(codebook_size, dim, projector=bridge, search=search, rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(quantizer, nnx.Param, ...)
    # A trained-looking bridge: random head weights, so codes differ and the search has work to do.
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)

    def loss(params, z, w):
        out = nnx.merge(graph, params, rest)(z)
        return out["loss"] + jnp.mean(w * out["z_q"])

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def run(codebook_size: int, tokens: int, dim: int, tile: int, precision: str, iters: int, out=None) -> dict:
    bridge = bridge_for(codebook_size)
    key_z, key_w = jax.random.split(jax.random.key(0))
    z = jax.random.normal(key_z, (1, tokens, 1, dim))
    w = jax.random.normal(key_w, z.shape)
    results = {}
    for mode, search in (("naive", SearchOptions(precision=precision)),
                         ("tiled", SearchOptions(precision=precision, tile_size=tile))):
        fn, params = quantizer_step(codebook_size, dim, search, bridge)
        memory = compiled_memory_gib(fn, params, z, w)
        timing = time_fn(fn, params, z, w, iters=iters)
        results[mode] = dict(timing, memory_GiB=memory)
        emit(dict(what="quantizer_fwd_bwd", mode=mode, K=codebook_size, tokens=tokens, D=dim, bridge=bridge,
                  precision=precision, tile=tile if mode == "tiled" else None, **timing, memory_GiB=memory,
                  device=describe_device()), out)
    ratio = dict(what="quantizer_ratio", K=codebook_size, tokens=tokens, precision=precision,
                 speedup_tiled_vs_naive=results["naive"]["median_ms"] / results["tiled"]["median_ms"],
                 memory_naive_over_tiled=results["naive"]["memory_GiB"] / results["tiled"]["memory_GiB"])
    emit(ratio, out)
    return ratio


def matmul_floor(codebook_size: int, tokens: int, dim: int, iters: int, out=None) -> None:
    """The N x K x D product alone (and with the row argmin), bf16 and fp32."""
    for dtype in (jnp.bfloat16, jnp.float32):
        z = jax.random.normal(jax.random.key(0), (tokens, dim), dtype)
        e = jax.random.normal(jax.random.key(1), (codebook_size, dim), dtype)
        product = jax.jit(lambda z, e: jnp.dot(z, e.T, preferred_element_type=jnp.float32))
        with_argmin = jax.jit(lambda z, e: jnp.argmin(jnp.dot(z, e.T, preferred_element_type=jnp.float32), -1))
        t = time_fn(product, z, e, iters=iters)
        ta = time_fn(with_argmin, z, e, iters=iters)
        emit(dict(what="floor_matmul", K=codebook_size, tokens=tokens, dtype=jnp.dtype(dtype).name,
                  matmul_ms=t["median_ms"], matmul_plus_argmin_ms=ta["median_ms"],
                  tflops=2 * tokens * codebook_size * dim / t["median_ms"] / 1e9, device=describe_device()), out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codebooks", default="16384,65536,262144")
    parser.add_argument("--tokens", default="2048,8192")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tile", type=int, default=8192, help="codes per tile of the tiled search")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    print(f"# device: {describe_device()}")
    for k in (int(x) for x in args.codebooks.split(",")):
        for n in (int(x) for x in args.tokens.split(",")):
            run(k, n, args.dim, args.tile, args.precision, args.iters, args.out)
            if jax.default_backend() == "gpu":
                matmul_floor(k, n, args.dim, args.iters, args.out)


if __name__ == "__main__":
    main()

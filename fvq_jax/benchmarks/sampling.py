"""GPT sampling: the KV-cache sampler against the naive one that recomputes the whole prefix every step.

  python -m fvq_jax.benchmarks.sampling                                    # GPT-B, 16x16 tokens, K 16384, CFG
  python -m fvq_jax.benchmarks.sampling --preset=GPT-L --batch=64 --cfg=1.75
  python -m fvq_jax.benchmarks.sampling --preset=GPT-S --batch=8 --grid=8 --iters=2    # CPU-sized

Both samplers are one jitted lax loop over the N positions (prefill + decode); the naive one runs
the full causal forward over all N positions at every step (the baseline in the same run). Prints
codes/s and sequences/s for each, and the speedup. Weights are random (the output layer too, so
the logits are not all equal); decoding to pixels is not timed. Target on an H100-class GPU:
>= 20x the naive sampler at 256 tokens.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvq_jax.benchmarks.common import describe_device, emit, time_fn
from fvq_jax.models.gpt import GPT, GPTConfig
from fvq_jax.sampling.sampler import SamplingConfig, generation_fn, sample_keys


def random_weights(model: GPT, seed: int = 0) -> GPT:
    """Every parameter N(0, 0.02) (init leaves the output layer at zero: constant logits)."""
    graph, params = nnx.split(model)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype), params)
    return nnx.merge(graph, params)


def random_model(preset: str, *, vocab: int, classes: int, grid: int, precision: str) -> GPT:
    """A GPT of `preset` with random weights (`random_weights`), built without a real init."""
    config = GPTConfig(preset=preset, vocab_size=vocab, num_classes=classes, grid=grid)
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    return random_weights(nnx.eval_shape(lambda: GPT(config, dtype=dtype, rngs=nnx.Rngs(0))))


def measure(model: GPT, batch: int, sampling: SamplingConfig, *, use_cache: bool, iters: int) -> dict:
    graph, params = nnx.split(model)
    generate = jax.jit(generation_fn(graph, guided=sampling.guided, use_cache=use_cache))
    labels = jnp.arange(batch, dtype=jnp.int32) % model.config.num_classes
    keys = sample_keys(0, 0, batch)
    timing = time_fn(generate, params, labels, keys, sampling.rows(batch), warmup=1, iters=iters)
    seconds = timing["median_ms"] / 1e3
    return dict(timing, sequences_per_sec=batch / seconds, codes_per_sec=batch * model.config.seq_len / seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="GPT-B")
    parser.add_argument("--batch", type=int, default=32, help="sequences (each doubled by CFG)")
    parser.add_argument("--grid", type=int, default=16, help="token grid side: N = grid^2 positions")
    parser.add_argument("--vocab", type=int, default=16384, help="K, the tokenizer's codebook size")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--cfg", type=float, default=1.75, help="CFG scale (1 = off)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--baseline", default="naive", choices=["naive", "none"])
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)

    device = describe_device()
    print(f"# device: {device}")
    model = random_model(args.preset, vocab=args.vocab, classes=args.classes, grid=args.grid, precision=args.precision)
    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=args.cfg)
    common = dict(preset=args.preset, batch=args.batch, positions=model.config.seq_len, vocab=args.vocab, cfg=args.cfg,
                  precision=args.precision, device=device)
    ours = measure(model, args.batch, sampling, use_cache=True, iters=args.iters)
    emit(dict(what="sampling_kv_cache", **common, **ours), args.out)
    if args.baseline == "naive":
        base = measure(model, args.batch, sampling, use_cache=False, iters=args.iters)
        emit(dict(what="sampling_naive", **common, **base), args.out)
        emit(dict(what="sampling_ratio", **common, speedup=ours["codes_per_sec"] / base["codes_per_sec"]), args.out)


if __name__ == "__main__":
    main()

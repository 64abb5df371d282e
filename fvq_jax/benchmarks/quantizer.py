"""Quantizer forward+backward: today's program against the memory and search options, same run.

  python -m fvq_jax.benchmarks.quantizer                        # K in {16k, 65k, 262k}, tokens {2048, 8192}
  python -m fvq_jax.benchmarks.quantizer --codebooks=262144 --tokens=8192 --iters=0   # memory only (compile)
  python -m fvq_jax.benchmarks.quantizer --cpu_scheduler=memory --iters=0             # CPU: memory-minimising schedule
  python -m fvq_jax.benchmarks.quantizer --agreement --codebooks=16384 --tokens=4096  # bf16 vs fp32 bridge indices
  python -m fvq_jax.benchmarks.quantizer --agreement --run=RUN_DIR                       # ... on a trained run
  python -m fvq_jax.benchmarks.quantizer --codebooks=256 --tokens=128 --dim=16 --projector=XS/2 --tile=64 \
      --token_chunk=32 --bridge_chunks=2 --variants=baseline,chunks+tokens --iters=1   # CPU sizes (the tests)

What is measured is the whole quantizer as training runs it: VQBridge (L/4 below K = 65,536,
L/8 from there, the reference recipes) on the raw codebook, nearest-code search for `tokens`
D = 256 vectors, gather, codebook + commitment losses, a downstream loss on z_q, and the backward
pass to the raw codebook, the bridge and z. Each variant is the paper config's quantizer block
with some switches flipped (`--variants`, '+'-joined):

  baseline  today's program: fp32 bridge in one piece, XLA search tiled at --tile codes
  bf16      quantizer.bridge_dtype = bf16
  chunks    quantizer.bridge_chunks = --bridge_chunks
  tokens    quantizer.search_token_chunk = --token_chunk (the XLA search's tile of distances shrinks)
  pallas    quantizer.search_impl = pallas (the fused kernel: no distances in memory)
  naive     quantizer.search_tile = 0 (the whole [tokens, K] distance matrix)

Memory is XLA's buffer assignment for one call (arguments + outputs + temporaries), available on
every backend. On the CPU two caveats hold: XLA:CPU's default scheduler orders work for
concurrency, not memory (`--cpu_scheduler=memory` switches to its memory-minimising one, nearer
to what a GPU compiler does), and it runs bf16 matmuls in float32 with float32 copies of their
operands, which a GPU does not. Pallas runs in interpret mode off GPUs and TPUs: its memory is the
interpreter's and it is never timed there. On a GPU the bare N x K x D product (the floor for any
exact search) is timed too.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.benchmarks.common import compiled_memory, describe_device, emit, time_fn
from fvq_jax.quantizers import ops
from fvq_jax.quantizers.factory import QuantizerSpec, build_quantizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_VARIANTS = "baseline,bf16,chunks,chunks+bf16,chunks+tokens,chunks+pallas,chunks+bf16+pallas"
SWITCHES = ("baseline", "bf16", "chunks", "tokens", "pallas", "naive")

# PyTorch reference on one H100 80GB (anchors: h100-official-fvq.json): quantizer fwd+bwd by (K, tokens)
# as (ms, peak GiB), and the bare tokens x K x 256 product by (K, tokens, dtype) as ms (TF32 for float32).
REFERENCE_H100 = {
    (16384, 2048): (8.0, 0.8),
    (16384, 8192): (10.84, 2.68),
    (262144, 2048): (32.87, 10.89),
    (262144, 8192): (96.65, 40.59),
}
FLOOR_H100 = {
    (262144, 2048, "bfloat16"): 0.578,
    (262144, 2048, "float32"): 1.033,
    (262144, 8192, "bfloat16"): 2.391,
    (262144, 8192, "float32"): 4.596,
}


def bridge_for(codebook_size: int) -> str:
    return "L/4" if codebook_size < 65_536 else "L/8"


def quantizer_config(codebook_size: int, dim: int, variant: str, *, precision: str = "fp32", tile: int = 8192,
                     token_chunk: int = 2048, bridge_chunks: int = 8, projector: str | None = None):
    """The paper config's quantizer block at (K, D) with the variant's switches flipped; the switches'
    sizes (tile, token_chunk, bridge_chunks) as the CLI flags of the same names. projector: None =
    the reference's bridge for K (`bridge_for`); a smaller one for CPU-sized runs."""
    switches = variant.split("+")
    unknown = [s for s in switches if s not in SWITCHES]
    if unknown:
        raise ValueError(f"unknown variant switches {unknown} in {variant!r}; choose from {SWITCHES}")
    cfg = config_lib.load_file(ROOT / "configs" / "tokenizer.py").get_config("paper").quantizer
    cfg.update(codebook_size=codebook_size, code_dim=dim, projector=projector or bridge_for(codebook_size),
               search_precision=precision, search_tile=0 if "naive" in switches else tile,
               search_token_chunk=token_chunk if "tokens" in switches else 0,
               search_impl="pallas" if "pallas" in switches else "xla",
               bridge_dtype="bf16" if "bf16" in switches else "fp32",
               bridge_chunks=bridge_chunks if "chunks" in switches else 1)
    return QuantizerSpec.from_config(cfg, "quantizer")


def variant_options(args) -> dict:
    """The keyword arguments of `quantizer_config` that the CLI flags set."""
    return dict(precision=args.precision, tile=args.tile, token_chunk=args.token_chunk,
                bridge_chunks=args.bridge_chunks, projector=args.projector)


def quantizer_step(cfg, *, abstract: bool):
    """(jitted fwd+bwd of the quantizer, its parameters); abstract: shapes only, for compiling."""
    if abstract:
        quantizer = nnx.eval_shape(lambda: build_quantizer(cfg, rngs=nnx.Rngs(0)))
    else:
        quantizer = build_quantizer(cfg, rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(quantizer, nnx.Param, ...)
    if not abstract:
        # A trained-looking bridge: random head weights, so codes differ and the search has work to do.
        params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)

    def loss(params, z, w):
        out = nnx.merge(graph, params, rest)(z)
        return out["loss"] + jnp.mean(w * out["z_q"])

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def measure(cfg, tokens: int, *, iters: int) -> dict:
    """XLA memory of the quantizer `cfg`'s fwd+bwd for `tokens` vectors and, when iters > 0, its
    time (iters = 0: compiled from shapes only, nothing allocated or run)."""
    shape = (1, tokens, 1, cfg.code_dim)
    abstract = iters == 0
    if abstract:
        z = w = jax.ShapeDtypeStruct(shape, jnp.float32)
    else:
        key_z, key_w = jax.random.split(jax.random.key(0))
        z, w = jax.random.normal(key_z, shape), jax.random.normal(key_w, shape)
    fn, params = quantizer_step(cfg, abstract=abstract)
    record = dict(what="quantizer_fwd_bwd", K=cfg.codebook_size, tokens=tokens, D=cfg.code_dim,
                  bridge=cfg.projector, bridge_dtype=cfg.bridge_dtype, bridge_chunks=cfg.bridge_chunks,
                  search=cfg.search_impl, precision=cfg.search_precision, tile=cfg.search_tile,
                  token_chunk=cfg.search_token_chunk, **compiled_memory(fn.lower(params, z, w).compile()))
    if not abstract:
        record.update(time_fn(fn, params, z, w, iters=iters))
    return record


def pallas_interpreted() -> bool:
    """Pallas runs in interpret mode off GPUs and TPUs: the interpreter's memory and time, not the kernel's."""
    return jax.default_backend() not in ("gpu", "tpu")


def run(codebook_size: int, tokens: int, dim: int, variants: list[str], args, out=None) -> None:
    """Memory (and time, where it means something) of each variant; ratios against the first."""
    first = None
    for variant in variants:
        cfg = quantizer_config(codebook_size, dim, variant, **variant_options(args))
        interpreted = cfg.search_impl == "pallas" and pallas_interpreted()
        record = dict(measure(cfg, tokens, iters=0 if interpreted else args.iters), variant=variant)
        if interpreted:
            record["note"] = "Pallas interpret mode: memory of the interpreter's program, no timing"
        if first is None:
            first = record
        else:
            record["memory_vs_" + first["variant"]] = first["memory_GiB"] / record["memory_GiB"]
            if "median_ms" in record and "median_ms" in first:
                record["speedup_vs_" + first["variant"]] = first["median_ms"] / record["median_ms"]
        emit(dict(record, device=describe_device(), cpu_scheduler=args.cpu_scheduler if pallas_interpreted() else None),
             out)


def matmul_floor(codebook_size: int, tokens: int, dim: int, iters: int) -> list[dict]:
    """The N x K x D product alone (and with the row argmin), bf16 and fp32 (TF32 on NVIDIA GPUs at
    default precision): the floor for any exact search."""
    records = []
    for dtype in (jnp.bfloat16, jnp.float32):
        z = jax.random.normal(jax.random.key(0), (tokens, dim), dtype)
        e = jax.random.normal(jax.random.key(1), (codebook_size, dim), dtype)
        product = jax.jit(lambda z, e: jnp.dot(z, e.T, preferred_element_type=jnp.float32))
        with_argmin = jax.jit(lambda z, e: jnp.argmin(jnp.dot(z, e.T, preferred_element_type=jnp.float32), -1))
        t = time_fn(product, z, e, iters=iters)
        ta = time_fn(with_argmin, z, e, iters=iters)
        records.append(dict(what="floor_matmul", K=codebook_size, tokens=tokens, dtype=jnp.dtype(dtype).name,
                            matmul_ms=t["median_ms"], matmul_plus_argmin_ms=ta["median_ms"],
                            tflops=2 * tokens * codebook_size * dim / t["median_ms"] / 1e9))
    return records


def search_alone(codebook_size: int, tokens: int, dim: int, impl: str, precision: str, *, tile: int = 8192,
                 token_chunk: int | None = 2048, iters: int) -> dict:
    """The nearest-code search alone (`ops.nearest_code`, forward: no bridge, no losses) on random
    z [tokens, D] and codes [K, D]: what `matmul_floor` bounds. tile / token_chunk: the XLA search's
    (the Pallas kernel picks its own blocks)."""
    z = jax.random.normal(jax.random.key(0), (tokens, dim))
    e = jax.random.normal(jax.random.key(1), (codebook_size, dim))
    search = jax.jit(lambda z, e: ops.nearest_code(z, e, precision=precision, tile_size=tile, token_chunk=token_chunk,
                                                   impl=impl))
    return dict(what="search_alone", K=codebook_size, tokens=tokens, D=dim, search=impl, precision=precision,
                **time_fn(search, z, e, iters=iters))


def agreement(codebook_size: int, tokens: int, dim: int, args, out=None) -> None:
    """How many indices a bf16 bridge changes: the same (trained-looking, random) bridge and raw
    codebook in fp32 and bf16, searched in fp32 for random tokens drawn like the fp32 codebook
    (its per-dimension mean and spread). Not realistic encoder outputs: `agreement_on_run` uses a
    trained model's."""
    codebooks = {}
    for dtype in ("fp32", "bf16"):
        cfg = quantizer_config(codebook_size, dim, "chunks+bf16" if dtype == "bf16" else "chunks",
                               **variant_options(args))
        quantizer = build_quantizer(cfg, rngs=nnx.Rngs(0))
        graph, params, rest = nnx.split(quantizer, nnx.Param, ...)
        params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
        codebooks[dtype] = jax.jit(lambda p: nnx.merge(graph, p, rest).codebook(None))(params)
    reference = codebooks["fp32"]
    mean, std = jnp.mean(reference, axis=0), jnp.std(reference, axis=0)
    z = mean + std * jax.random.normal(jax.random.key(2), (tokens, dim))
    emit(dict(what="bridge_bf16_vs_fp32_indices", K=codebook_size, tokens=tokens, D=dim, bridge=cfg.projector,
              data="random tokens shaped like the fp32 codebook, random bridge",
              **compare_indices(z, codebooks, args), device=describe_device()), out)


def compare_indices(z: jax.Array, codebooks: dict[str, jax.Array], args) -> dict:
    """Search z [N, D] in fp32 against the fp32 and bf16 bridges' codebooks: the fraction of indices
    that differ and, for those, how much farther (squared, by the fp32 codes) the bf16 choice is than
    the nearest code, i.e. how far from a tie the flips are."""
    reference = codebooks["fp32"]
    search = jax.jit(lambda z, e: ops.nearest_code(z, e, precision=args.precision, tile_size=args.tile))
    idx = {k: np.asarray(search(z, e)) for k, e in codebooks.items()}
    differ = idx["fp32"] != idx["bf16"]
    d = {k: np.asarray(jnp.sum(jnp.square(z - reference[i]), axis=-1), np.float64) for k, i in idx.items()}
    excess = (d["bf16"] - d["fp32"])[differ] / d["fp32"][differ]
    return dict(fraction_differing=float(np.mean(differ)),
                excess_distance_median=float(np.median(excess)) if differ.any() else 0.0,
                excess_distance_max=float(np.max(excess)) if differ.any() else 0.0,
                codes_relative_error=float(jnp.linalg.norm(codebooks["bf16"].astype(jnp.float32) - reference)
                                           / jnp.linalg.norm(reference)))


def agreement_on_run(run: str, args, out=None) -> None:
    """`agreement` on a trained tokenizer: its encoder outputs for the held-out images of its own
    data config, its trained bridge and codebook (EMA weights), the bridge evaluated once in fp32 and
    once with bf16 activations (the same parameters)."""
    from fvq_jax.data import pipeline
    from fvq_jax.data.spec import DataSpec
    from fvq_jax.data.value_range import to_model_range
    from fvq_jax.models.load import load_tokenizer

    loaded = load_tokenizer(run)
    model, cfg = loaded.model, loaded.config
    encode = jax.jit(lambda images: model.quant_conv(model.encoder(to_model_range(images).astype(model.dtype))))
    batches = pipeline.eval_batches(DataSpec.from_config(cfg.data, "data"), batch_size=args.run_batch,
                                    num_images=args.run_images)
    z = np.concatenate([np.asarray(encode(b["image"]), np.float32)[b["mask"]] for b in batches])
    z = jnp.asarray(z.reshape(-1, z.shape[-1]))
    graph, params, rest = nnx.split(model.quantizer, nnx.Param, ...)
    codebooks = {}
    for dtype in ("fp32", "bf16"):
        q_cfg = QuantizerSpec.from_config(cfg.quantizer, "quantizer", bridge_dtype=dtype)
        variant_graph = nnx.graphdef(nnx.eval_shape(lambda: build_quantizer(q_cfg, rngs=nnx.Rngs(0))))
        codebooks[dtype] = jax.jit(lambda p, r: nnx.merge(variant_graph, p, r).codebook(None))(params, rest)
    emit(dict(what="bridge_bf16_vs_fp32_indices", K=cfg.quantizer.codebook_size, tokens=int(z.shape[0]),
              D=int(z.shape[-1]), bridge=cfg.quantizer.projector, run=str(run), step=loaded.step,
              data=f"encoder outputs of {cfg.data.source} ({cfg.data.eval_split}), trained bridge",
              **compare_indices(z, codebooks, args), device=describe_device()), out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codebooks", default="16384,65536,262144")
    parser.add_argument("--tokens", default="2048,8192")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated; the first is the baseline")
    parser.add_argument("--tile", type=int, default=8192, help="codes per tile of the XLA search (paper config)")
    parser.add_argument("--token_chunk", type=int, default=2048, help="tokens per chunk for the 'tokens' switch")
    parser.add_argument("--bridge_chunks", type=int, default=8, help="bands for the 'chunks' switch")
    parser.add_argument("--projector", default=None,
                        help="VQBridge preset (default: the reference's for K, L/4 or L/8; e.g. XS/2 on a CPU)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="search products")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per variant; 0 = memory only")
    parser.add_argument("--cpu_scheduler", default="default", choices=["default", "memory"],
                        help="XLA:CPU's instruction scheduler (memory: minimise memory, not maximise concurrency)")
    parser.add_argument("--agreement", action="store_true", help="measure bf16 vs fp32 bridge indices instead")
    parser.add_argument("--run", action="append", default=[],
                        help="with --agreement: a trained tokenizer run to measure on (repeatable); "
                             "replaces the random data")
    parser.add_argument("--run_batch", type=int, default=16, help="eval batch for --run")
    parser.add_argument("--run_images", type=int, default=0, help="held-out images for --run (0 = all)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.cpu_scheduler == "memory":
        # Read when the CPU backend starts, which has not happened yet.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
    print(f"# device: {describe_device()}")
    if args.agreement and args.run:
        for run_dir in args.run:
            agreement_on_run(run_dir, args, args.out)
        return
    for k in (int(x) for x in args.codebooks.split(",")):
        for n in (int(x) for x in args.tokens.split(",")):
            if args.agreement:
                agreement(k, n, args.dim, args, args.out)
                continue
            run(k, n, args.dim, args.variants.split(","), args, args.out)
            if jax.default_backend() == "gpu" and args.iters:
                for record in matmul_floor(k, n, args.dim, args.iters):
                    emit(dict(record, device=describe_device()), args.out)


if __name__ == "__main__":
    main()

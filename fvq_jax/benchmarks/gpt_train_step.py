"""The GPT train step (forward, chunked cross-entropy, backward, AdamW, guard): tokens/s, memory, MFU.

  python -m fvq_jax.benchmarks.gpt_train_step                                   # GPT-L, 16x16 codes, K 16384, bf16
  python -m fvq_jax.benchmarks.gpt_train_step --preset=GPT-XL --batch=8 --vocab=262144 --chunk=4096
  python -m fvq_jax.benchmarks.gpt_train_step --preset=GPT-S --batch=4 --grid=8 --vocab=1024 --steps=3  # CPU

The step is the trainer's own (fvq_jax.train.gpt.build_trainer) on all devices (data parallel) with
random codes; the baseline in the same run is the same step in float32 (--baseline=fp32; `none`
skips it). Memory is XLA's buffer assignment of the compiled step (the same program on every
backend); MFU is XLA's FLOP count per device over the step time and the chip's dense peak for the
precision (common.PEAKS), with the analytic 6 N_params + attention FLOPs per token beside it.
Target on an H100-class GPU: GPT-L >= 40% MFU in bf16.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np

from fvq_jax import config_lib, sharding
from fvq_jax.benchmarks.common import compiled_flops, compiled_memory, describe_device, emit, mfu_fields, time_fn
from fvq_jax.models.gpt import REMAT_POLICIES, GPTConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]


def gpt_config(*, preset: str, batch: int, grid: int, vocab: int, precision: str, classes: int = 1000,
               chunk: int = 4096, remat: str = "none"):
    """configs/gpt.py:paper for the benchmark's model (batch: sequences per device), resolved as the
    trainer resolves it from codes."""
    config = config_lib.load_file(ROOT / "configs" / "gpt.py").get_config("paper")
    config.precision = precision
    config.model.update(preset=preset, vocab_size=vocab, num_classes=classes, grid=grid, remat=remat)
    config.loss.chunk_size = chunk
    config.train.global_batch = batch * jax.device_count()
    config.train.num_steps = 1000
    return config


def analytic_flops_per_token(config) -> float:
    """6 x (matmul parameters) + 6 x attention (2 N dim per layer, causal half) per trained token."""
    c = GPTConfig.from_config(config.model, "model")
    matmul_params = c.n_layer * (4 * c.dim * c.dim + 3 * c.dim * c.ffn_dim) + c.dim * c.vocab_size
    attention = c.n_layer * 2 * c.seq_len * c.dim / 2
    return 6.0 * (matmul_params + attention)


def measure(config, steps: int) -> dict:
    from fvq_jax.train.gpt import GPTRunSpec, build_trainer

    spec = GPTRunSpec.from_config(config)  # the model block filled in as the trainer fills it from codes
    mesh = sharding.make_mesh(spec.mesh)
    with jax.set_mesh(mesh):
        trainer = build_trainer(spec, mesh)
        state = trainer.layout.init()
        rng = np.random.default_rng(0)
        batch = {"codes": rng.integers(0, config.model.vocab_size, (config.train.global_batch, config.model.grid ** 2),
                                       dtype=np.int32),
                 "label": rng.integers(0, config.model.num_classes, (config.train.global_batch,), dtype=np.int32)}
        batch = jax.device_put(batch, trainer.batch_sharding)
        compiled = trainer.train_step.lower(state, batch).compile()
        holder = {"state": state}

        def step():
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics["loss"]

        timing = time_fn(step, warmup=2, iters=steps)
    seconds = timing["median_ms"] / 1e3
    tokens = config.train.global_batch * config.model.grid ** 2
    # XLA's cost analysis counts a loop's body once: a scanned GPT's count misses n_layer - 1 of its blocks, so
    # it is left out (the analytic count below stands) rather than reported n_layer-fold too low.
    scanned = spec.model.scan_layers
    xla_flops = None if scanned else compiled_flops(compiled)
    return dict(timing, tokens_per_sec=tokens / seconds, sequences_per_sec=config.train.global_batch / seconds,
                **compiled_memory(compiled), **mfu_fields(xla_flops, seconds, config.precision),
                xla_flops_note="scanned layers: XLA counts the loop body once" if scanned else "",
                analytic_tflop_per_step=analytic_flops_per_token(config) * tokens / 1e12)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="GPT-L")
    parser.add_argument("--batch", type=int, default=16, help="sequences per device")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=4096, help="loss.chunk_size (0 = the whole batch's logits)")
    parser.add_argument("--remat", default="none", choices=list(REMAT_POLICIES))
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--baseline", default="fp32", choices=["fp32", "none"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = describe_device()
    print(f"# device: {device}")
    common = dict(preset=args.preset, batch_per_device=args.batch, positions=args.grid ** 2, vocab=args.vocab,
                  chunk=args.chunk, remat=args.remat, device=device)
    sizes = dict(preset=args.preset, batch=args.batch, grid=args.grid, vocab=args.vocab, classes=args.classes,
                 chunk=args.chunk, remat=args.remat)
    ours = measure(gpt_config(**sizes, precision=args.precision), args.steps)
    emit(dict(what="gpt_train_step", precision=args.precision, **common, **ours), args.out)
    if args.baseline != "none" and args.baseline != args.precision:
        base = measure(gpt_config(**sizes, precision=args.baseline), args.steps)
        emit(dict(what="gpt_train_step_baseline", precision=args.baseline, **common, **base), args.out)
        emit(dict(what="gpt_train_step_ratio", ours=args.precision, baseline=args.baseline,
                  speedup=ours["tokens_per_sec"] / base["tokens_per_sec"],
                  memory_ratio=ours["memory_GiB"] / base["memory_GiB"]), args.out)


if __name__ == "__main__":
    main()

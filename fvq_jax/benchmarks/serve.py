"""Load benchmark of the sampling server (fvq_jax/serving): C concurrent clients against one server on loopback.

  python -m fvq_jax.benchmarks.serve                 # GPT-S, 16 x 16 codes, K 1,024, the local 64x64 tokenizer
  python -m fvq_jax.benchmarks.serve --tiny          # GPT-tiny, 4 x 4 codes, the tiny tokenizer: seconds (tests)
  python -m fvq_jax.benchmarks.serve --preset=GPT-B --grid=24 --vocab=16384 --tokenizer=VQ-16 \\
      --precision=bf16 --latency_images=8           # the accelerator bar (suite stage `serve`)

One server (configs/serve.py's defaults: batch sizes 1, 2, 4, 8, CFG 2.0) with random weights, on 127.0.0.1
with an ephemeral port, and three phases over the same compiled programs:
  1. one at a time: every request (clients x requests, one image each, its own class and seed) sent after the
     previous one answered: each runs alone (the baseline);
  2. batched: the same requests from `clients` threads at once, each sending its own back to back;
  3. with --latency_images=N: one request of N images with CFG, alone (LlamaGen's vLLM server samples GPT-B at
     384 px, 8 images with CFG, in 2.39 s on an A100; its plain sampler takes 7.80 s).
Prints images/s of phases 1 and 2 and their ratio, p50 / p99 latency, errors (responses other than 200),
whether every request of phase 2 got the images it got alone in phase 1, and peak memory (the process's RSS;
the device's peak where the backend reports it). Bounded: --requests per client, and each phase stops sending
after --time_limit seconds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import pathlib
import resource
import statistics
import time

import httpx
import jax
import numpy as np
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.benchmarks.common import describe_device, emit
from fvq_jax.benchmarks.sampling import random_model
from fvq_jax.models.factory import VQGANSpec, build_tokenizer
from fvq_jax.sampling.images import Painter
from fvq_jax.serving import server
from fvq_jax.serving.app import make_app

ROOT = pathlib.Path(__file__).resolve().parents[2]


def random_tokenizer(preset: str, vocab: int) -> nnx.Module:
    """A tokenizer of configs/tokenizer.py (`preset`: "tiny", "local", or a model such as "VQ-16") with K = vocab
    codes and its initial weights."""
    arg = preset if preset in ("tiny", "local") else f"paper,model={preset}"
    config = config_lib.load_file(ROOT / "configs" / "tokenizer.py").get_config(arg)
    config.quantizer.codebook_size = vocab
    return build_tokenizer(VQGANSpec.from_config(config), rngs=nnx.Rngs(0))


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _phase(client: httpx.Client, requests: list[list[dict]], time_limit: float) -> dict:
    """Each inner list runs on its own thread, request after request; -> latencies, responses by request key."""
    results, latencies, errors = {}, [], 0
    start = time.perf_counter()

    def run(mine):
        nonlocal errors
        for request in mine:
            if time.perf_counter() - start > time_limit:
                return
            t = time.perf_counter()
            response = client.post("/api/generate", json=request)
            latencies.append(time.perf_counter() - t)
            if response.status_code != 200:
                errors += 1
                continue
            body = response.json()
            results[(request["class"], request["seed"])] = (body["codes"], body["images"])

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        list(pool.map(run, requests))
    seconds = time.perf_counter() - start
    return dict(results=results, seconds=seconds, images_per_sec=len(results) / seconds, errors=errors,
                p50_s=percentile(latencies, 50), p99_s=percentile(latencies, 99), requests=len(latencies))


def measure(*, preset: str, grid: int, vocab: int, tokenizer: str, precision: str, clients: int, requests: int,
            time_limit: float, latency_images: int = 0, classes: int = 1000) -> dict:
    """Phases 1-3 (see the module docstring) on a server of a random `preset` GPT; one flat dict of figures."""
    serve_config = config_lib.load_file(ROOT / "configs" / "serve.py")
    spec = server.resolve(serve_config.get_config(f"port=0,max_images={max(latency_images, 1)}")).serve
    gpt = random_model(preset, vocab=vocab, classes=classes, grid=grid, precision=precision)
    painter = Painter(gpt, random_tokenizer(tokenizer, vocab), spec.sampling, guided=True)
    service = server.make_service(spec, painter)
    compile_s = service.warm_up()
    rng = np.random.default_rng(0)
    # One image each, its own class and seed; per client a list sent back to back.
    work = [[{"class": int(rng.integers(classes)), "n": 1, "seed": c * requests + r} for r in range(requests)]
            for c in range(clients)]
    background = server.BackgroundServer(make_app(service), "127.0.0.1", 0).start()
    try:
        limits = httpx.Limits(max_connections=clients + 2)
        with httpx.Client(base_url=background.url, timeout=600, limits=limits) as client:
            alone = _phase(client, [[r for mine in work for r in mine]], time_limit)
            batches_before = len(service.batcher.batches)
            batched = _phase(client, work, time_limit)
            batch_rows = service.batcher.batches[batches_before:]
            latency = None
            if latency_images:
                t = time.perf_counter()
                response = client.post("/api/generate", json={"class": 0, "n": latency_images, "seed": 0})
                latency = time.perf_counter() - t if response.status_code == 200 else float("nan")
    finally:
        background.stop()
        service.close()
    compared = [key for key in batched["results"] if key in alone["results"]]
    differ = sum(batched["results"][key] != alone["results"][key] for key in compared)
    device_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return dict(
        preset=preset, grid=grid, vocab=vocab, tokenizer=tokenizer, precision=precision, clients=clients,
        cfg_scale=spec.sampling.cfg_scale, batch_sizes=list(spec.batch_sizes), compile_s=compile_s,
        alone_images_per_sec=alone["images_per_sec"], batched_images_per_sec=batched["images_per_sec"],
        speedup=batched["images_per_sec"] / alone["images_per_sec"],
        alone_p50_s=alone["p50_s"], alone_p99_s=alone["p99_s"], batched_p50_s=batched["p50_s"],
        batched_p99_s=batched["p99_s"], requests=alone["requests"] + batched["requests"],
        errors=alone["errors"] + batched["errors"], compared=len(compared), differ=differ,
        mean_batch=statistics.mean(batch_rows) if batch_rows else float("nan"),
        latency_images=latency_images, latency_s=latency,
        peak_rss_GiB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        device_peak_GiB=None if device_peak is None else device_peak / 2 ** 30)


TINY = dict(preset="GPT-tiny", grid=4, vocab=64, tokenizer="tiny", precision="fp32", clients=4, requests=2,
            latency_images=2, classes=10)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="GPT-S")
    parser.add_argument("--grid", type=int, default=16, help="token grid side")
    parser.add_argument("--vocab", type=int, default=1024, help="K, the tokenizer's codebook size")
    parser.add_argument("--tokenizer", default="local", help="configs/tokenizer.py: tiny, local, or a model (VQ-16)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="per client, one image each")
    parser.add_argument("--time_limit", type=float, default=600.0, help="seconds per phase, at most")
    parser.add_argument("--latency_images", type=int, default=0, help="then one request of this many images")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU seconds: " + ", ".join(f"{k}={v}" for k, v in TINY.items()))
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    args = parser.parse_args(argv)
    sizes = dict(TINY) if args.tiny else dict(
        preset=args.preset, grid=args.grid, vocab=args.vocab, tokenizer=args.tokenizer, precision=args.precision,
        clients=args.clients, requests=args.requests, latency_images=args.latency_images)
    device = describe_device()
    print(f"# device: {device}", flush=True)
    result = measure(**sizes, time_limit=args.time_limit)
    emit(dict(what="serve", device=device, **result), args.out)
    print(f"# {result['clients']} clients: batched {result['batched_images_per_sec']:.2f} images/s vs one at a time "
          f"{result['alone_images_per_sec']:.2f} = {result['speedup']:.2f}x; p50/p99 {result['batched_p50_s']:.2f}/"
          f"{result['batched_p99_s']:.2f} s (alone {result['alone_p50_s']:.2f}/{result['alone_p99_s']:.2f} s); "
          f"errors {result['errors']}; {result['differ']} of {result['compared']} requests differ from alone; "
          f"peak RSS {result['peak_rss_GiB']:.2f} GiB", flush=True)
    return result


if __name__ == "__main__":
    main()

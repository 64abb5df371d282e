"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import json
import statistics
import time

import jax


def time_fn(fn, *args, warmup: int = 1, iters: int = 5) -> dict:
    """Median / min wall time in ms of `fn(*args)` (compiled first, blocked on the result)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - t))
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def compiled_memory_gib(jitted, *args) -> float:
    """XLA's buffer assignment for one call: arguments + outputs + temporaries, in GiB.

    Available on every backend (CPU included), so CPU and GPU figures are comparable; aliased
    (donated) outputs are not counted twice.
    """
    stats = jitted.lower(*args).compile().memory_analysis()
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)
    return total / 2 ** 30


def compiled_flops(jitted, *args) -> float | None:
    """FLOPs XLA counts for one call (None where the backend gives no cost analysis)."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else None
    return None if not analysis else analysis.get("flops")


def device_peak_gib() -> float | None:
    """The allocator's peak since process start (GPUs/TPUs), or None (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


def describe_device() -> str:
    d = jax.devices()[0]
    return f"{jax.device_count()} x {d.device_kind} ({d.platform}), jax {jax.__version__}"


def emit(record: dict, out=None) -> None:
    """Print one JSON line (and append it to `out` when given)."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")

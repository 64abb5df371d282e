"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import dataclasses
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


def compiled_memory(compiled) -> dict:
    """XLA's buffer assignment for one call of a compiled program, in GiB: arguments, outputs,
    temporaries and their total (aliased, i.e. donated, outputs are not counted twice).

    Available on every backend (CPU included), so CPU and accelerator figures come from the same
    program; they differ only where the backends' compilers schedule and fuse differently.
    """
    stats = compiled.memory_analysis()
    gib = 2 ** 30
    return dict(memory_GiB=(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                            - stats.alias_size_in_bytes) / gib,
                arguments_GiB=stats.argument_size_in_bytes / gib, outputs_GiB=stats.output_size_in_bytes / gib,
                temps_GiB=stats.temp_size_in_bytes / gib)


def compiled_flops(compiled) -> float | None:
    """FLOPs XLA's cost analysis counts for one call of a compiled program (a multiply-add is 2),
    per device for a program partitioned over several; None where the backend gives none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else None
    return None if not analysis else analysis.get("flops")


@dataclasses.dataclass(frozen=True)
class Peak:
    """Dense matmul peak of one chip in TFLOP/s: bf16, and float32 as the step's matmuls run it."""

    name: str
    bf16: float
    fp32: float


# Matched in order against jax.Device.device_kind (first substring that occurs). Dense figures,
# without the 2:4 sparsity that NVIDIA's headline numbers assume (those are twice these).
# fp32 on NVIDIA is the TF32 tensor-core peak: XLA runs float32 matmuls at default precision as
# TF32 there. On TPUs the MXU runs default-precision float32 matmuls as one bf16 pass, so the bf16
# peak applies to both.
PEAKS = (
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper (dense / sparse): SXM5 989.4 / 1,978.9 BF16,
    # 494.7 / 989.4 TF32; PCIe 756.5 / 1,513 BF16, 378 / 756 TF32. NVL: the H100 datasheet
    # (nvidia.com/en-us/data-center/h100), 1,671 BF16 and 835 TF32 with sparsity.
    ("H100 PCIe", Peak("H100 PCIe", 756.5, 378.0)),
    ("H100 NVL", Peak("H100 NVL", 835.5, 417.5)),
    ("H100", Peak("H100 SXM", 989.4, 494.7)),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM 1,979 / 989 TFLOPS BF16 / TF32
    # with sparsity, the H100 SXM's tensor cores.
    ("H200", Peak("H200 SXM", 989.4, 494.7)),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 312 / 156 TFLOPS BF16 / TF32 dense
    # (624 / 312 with sparsity), SXM and PCIe alike.
    ("A100", Peak("A100", 312.0, 156.0)),
    # Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
    # peak bf16 compute per chip. v5e reports as "TPU v5 lite", v6e as "TPU v6 lite".
    ("TPU v4", Peak("TPU v4", 275.0, 275.0)),
    ("TPU v5 lite", Peak("TPU v5e", 197.0, 197.0)),
    ("TPU v5e", Peak("TPU v5e", 197.0, 197.0)),
    ("TPU v5", Peak("TPU v5p", 459.0, 459.0)),
    ("TPU v6", Peak("TPU v6e", 918.0, 918.0)),
)


def device_peak(device_kind: str | None = None) -> Peak | None:
    """The PEAKS entry for `device_kind` (default: this process's first device), None if unknown."""
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    return next((peak for key, peak in PEAKS if key in kind), None)


def mfu_fields(flops_per_device: float | None, seconds: float, precision: str, device_kind: str | None = None) -> dict:
    """Model FLOP utilisation of a step: XLA's FLOPs per device / step time / the chip's peak for
    `precision` ('bf16' | 'fp32'). MFU is 'n/a' off the PEAKS table (e.g. on a CPU) or without a FLOP count
    (the peak is still given, for an analytic count)."""
    peak = device_peak(device_kind)
    achieved = None if flops_per_device is None else flops_per_device / seconds / 1e12
    fields = dict(xla_tflop_per_device_step=None if flops_per_device is None else flops_per_device / 1e12,
                  achieved_tflops=achieved)
    if peak is None:
        return dict(fields, peak_tflops=None, mfu="n/a")
    peak_tflops = peak.bf16 if precision == "bf16" else peak.fp32
    return dict(fields, peak_device=peak.name, peak_tflops=peak_tflops,
                mfu="n/a" if achieved is None else achieved / peak_tflops)


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

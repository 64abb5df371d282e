"""Benchmark helpers: the peak table, MFU and the compiled program's memory and FLOPs."""

import jax
import jax.numpy as jnp
import pytest

from fvq_jax.benchmarks import common


@pytest.mark.parametrize("kind,name", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA A100-SXM4-80GB", "A100"), ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"),
    ("TPU v5", "TPU v5p"), ("TPU v6 lite", "TPU v6e"),
])
def test_device_kinds_find_their_peak(kind, name):
    assert common.device_peak(kind).name == name


def test_mfu_is_flops_over_time_over_the_precisions_peak():
    fields = common.mfu_fields(989.4e12 * 0.5, 2.0, "bf16", "NVIDIA H100 80GB HBM3")
    assert fields["peak_tflops"] == 989.4 and fields["mfu"] == pytest.approx(0.25)
    assert common.mfu_fields(494.7e12, 1.0, "fp32", "NVIDIA H200")["mfu"] == pytest.approx(1.0)


def test_cpu_prints_flops_and_no_mfu():
    fields = common.mfu_fields(2e9, 0.5, "fp32", "cpu")
    assert fields["mfu"] == "n/a" and fields["peak_tflops"] is None
    assert fields["achieved_tflops"] == pytest.approx(4e-3) and fields["xla_tflop_per_device_step"] == 2e-3


def test_compiled_memory_and_flops_of_a_matmul():
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    compiled = jax.jit(lambda a: a @ a.T).lower(x).compile()
    memory = common.compiled_memory(compiled)
    assert memory["arguments_GiB"] * 2 ** 30 == 64 * 128 * 4 and memory["outputs_GiB"] * 2 ** 30 == 64 * 64 * 4
    assert common.compiled_flops(compiled) == pytest.approx(2 * 64 * 64 * 128, rel=0.01)

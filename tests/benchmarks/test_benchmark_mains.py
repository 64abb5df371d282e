"""Every benchmark's command line, driven through its `main` at CPU sizes: it runs, measures its baseline in the
same run, and what it prints agrees with what it measured and with sizes computed here."""

import json
import re

import jax
import numpy as np
import pytest

from fvq_jax.benchmarks import gpt_loss_memory, gpt_train_step, input_pipeline, quantizer, sampling, train_step

# The quantizer at the suite's CPU stand-in sizes (a bridge small enough to compile in seconds).
TINY_QUANTIZER = ["--codebooks=256", "--tokens=128", "--dim=16", "--projector=XS/2", "--tile=64", "--token_chunk=32",
                  "--bridge_chunks=2"]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quantizer_variants_against_the_first(tmp_path):
    out = tmp_path / "q.jsonl"
    quantizer.main([*TINY_QUANTIZER, "--variants=baseline,chunks+tokens", "--iters=1", f"--out={out}"])
    base, chunked = records(out)
    for record in (base, chunked):
        assert (record["what"], record["K"], record["tokens"], record["D"], record["bridge"]) == (
            "quantizer_fwd_bwd", 256, 128, 16, "XS/2")
        # Arguments: the parameters, z and the downstream weights w, both [1, 128, 1, 16] float32.
        assert record["arguments_GiB"] * 2 ** 30 > 2 * 128 * 16 * 4 and record["median_ms"] > 0
    assert (base["bridge_chunks"], base["token_chunk"]) == (1, 0)
    assert (chunked["bridge_chunks"], chunked["token_chunk"]) == (2, 32)
    assert chunked["memory_vs_baseline"] == pytest.approx(base["memory_GiB"] / chunked["memory_GiB"])
    assert chunked["speedup_vs_baseline"] == pytest.approx(base["median_ms"] / chunked["median_ms"])


def test_quantizer_bf16_agreement_on_random_tokens(tmp_path):
    out = tmp_path / "a.jsonl"
    quantizer.main([*TINY_QUANTIZER, "--agreement", f"--out={out}"])
    (record,) = records(out)
    assert record["what"] == "bridge_bf16_vs_fp32_indices" and record["tokens"] == 128
    # bf16 activations move the codes by about bf16's precision (2^-8), not by nothing and not by much.
    assert 1e-4 < record["codes_relative_error"] < 2 ** -5
    assert 0.0 <= record["fraction_differing"] <= 1.0 and record["excess_distance_median"] >= 0.0


def test_quantizer_bf16_agreement_on_a_trained_run(tiny_run, tmp_path):
    workdir, _ = tiny_run
    out = tmp_path / "r.jsonl"
    quantizer.main(["--agreement", f"--run={workdir}", "--run_batch=8", "--run_images=12", f"--out={out}"])
    (record,) = records(out)
    # Every token of the first 12 held-out images (the padding of the second batch left out): 4 x 4 per image.
    assert (record["run"], record["step"], record["K"]) == (workdir, 2, 64)
    assert record["tokens"] == 12 * 4 * 4
    assert 0.0 <= record["fraction_differing"] <= 1.0


def test_train_step_at_the_suites_cpu_sizes(tmp_path):
    """The suite's stand-in (its compiled program is shared through the compilation cache); the tiny config is
    float32, so the float32 baseline is the step itself and is not measured twice (gpt_train_step's test runs
    a baseline)."""
    out = tmp_path / "t.jsonl"
    train_step.main(["--config_arg=tiny", "--batch=2", "--steps=1", f"--out={out}"])
    (ours,) = records(out)
    assert (ours["what"], ours["precision"], ours["K"], ours["res"]) == ("train_step", "fp32", 64, 16)
    assert ours["images_per_sec"] == pytest.approx(2 * jax.device_count() / (ours["median_ms"] / 1e3))
    assert ours["mfu"] == "n/a" and ours["xla_tflop_per_image"] > 0  # no CPU peak; the FLOPs are still counted


def test_gpt_train_step_measures_the_fp32_baseline_in_the_same_run(tmp_path):
    out = tmp_path / "g.jsonl"
    gpt_train_step.main(["--preset=GPT-tiny", "--batch=2", "--grid=4", "--vocab=64", "--classes=10", "--steps=1",
                         f"--out={out}"])
    ours, base, ratio = records(out)
    assert (ours["precision"], base["precision"], ours["positions"]) == ("bf16", "fp32", 16)
    tokens = 2 * jax.device_count() * 16
    for record in (ours, base):
        assert record["tokens_per_sec"] == pytest.approx(tokens / (record["median_ms"] / 1e3))
    # 6 x (matmul parameters + attention) per token, GPT-tiny: dim 64, 2 layers, FFN 4 x 64 x 2/3 rounded up
    # to 256's multiple (LlamaGen), vocabulary 64; per layer and token, attention's two products over 16
    # positions x 64, halved (causal).
    matmuls = 2 * (4 * 64 * 64 + 3 * 64 * 256) + 64 * 64
    attention = 2 * (2 * 16 * 64 / 2)
    assert ours["analytic_tflop_per_step"] == pytest.approx(6 * (matmuls + attention) * tokens / 1e12)
    assert ratio["speedup"] == pytest.approx(ours["tokens_per_sec"] / base["tokens_per_sec"])


def test_a_scanned_gpt_steps_flops_are_not_taken_from_xla():
    """XLA's cost analysis counts a scanned loop's body once: the scanned GPT-tiny step (2 layers) counts far
    fewer FLOPs than the same step looped, so the benchmark gives no XLA MFU for it (the analytic one stands)."""
    sizes = dict(preset="GPT-tiny", batch=2, grid=4, vocab=64, classes=10, precision="fp32")
    records = {}
    for scan in (False, True):
        config = gpt_train_step.gpt_config(**sizes)
        config.model.scan_layers = scan
        records[scan] = gpt_train_step.measure(config, steps=1)
    looped, scanned = records[False], records[True]
    assert looped["xla_tflop_per_device_step"] > 0 and looped["xla_flops_note"] == ""
    assert scanned["xla_tflop_per_device_step"] is None and "loop body once" in scanned["xla_flops_note"]
    assert scanned["analytic_tflop_per_step"] == looped["analytic_tflop_per_step"]


def test_without_a_flop_count_the_peak_is_still_given():
    from fvq_jax.benchmarks import common
    fields = common.mfu_fields(None, 1.0, "bf16", "NVIDIA H100 80GB HBM3")
    assert fields["mfu"] == "n/a" and fields["peak_tflops"] == 989.4


def test_gpt_loss_memory_full_against_chunked(tmp_path):
    out = tmp_path / "m.jsonl"
    gpt_loss_memory.main(["--tokens=64", "--dim=16", "--vocab=256", "--chunk=16", f"--out={out}"])
    full, chunked, ratio = records(out)
    gib = 2 ** 30
    for record in (full, chunked):
        # bf16 hidden [64, 16], float32 kernel [16, 256], int32 targets [64].
        assert record["arguments_GiB"] * gib == 64 * 16 * 2 + 16 * 256 * 4 + 64 * 4
    # The full loss holds the [64, 256] float32 logits; a chunk holds a quarter of them.
    assert full["temp_GiB"] * gib >= 64 * 256 * 4 > chunked["temp_GiB"] * gib
    assert ratio["full_over_chunked_total"] == pytest.approx(full["total_GiB"] / chunked["total_GiB"])


def test_sampling_kv_cache_against_the_naive_sampler(tmp_path):
    out = tmp_path / "s.jsonl"
    sampling.main(["--preset=GPT-tiny", "--batch=2", "--grid=4", "--vocab=64", "--classes=10", "--iters=1",
                   "--precision=fp32", f"--out={out}"])
    cached, naive, ratio = records(out)
    assert (cached["what"], naive["what"], cached["positions"]) == ("sampling_kv_cache", "sampling_naive", 16)
    for record in (cached, naive):
        assert record["codes_per_sec"] == pytest.approx(2 * 16 / (record["median_ms"] / 1e3))
    assert ratio["speedup"] == pytest.approx(cached["codes_per_sec"] / naive["codes_per_sec"])


def test_input_pipeline_against_the_plain_loop(capsys):
    input_pipeline.main(["--num_files=8", "--batches=1", "--image_size=32"])
    text = capsys.readouterr().out
    assert "8 JPEGs" in text and "random crop to 32 + flip; batch 32" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert len(rows) == 4 and rows[0].startswith("| baseline: plain PIL loop")
    per_core = [float(row.strip("|").split("|")[3]) for row in rows]
    ratios = [float(row.strip("|").split("|")[4]) for row in rows]
    np.testing.assert_allclose(ratios, np.array(per_core) / per_core[0], atol=0.006)  # printed to 2 decimals
    cores = float(re.search(r"needs ([\d.]+) cores", text).group(1))
    assert cores == pytest.approx(180.0 / max(per_core[1:]), rel=0.01, abs=0.06)

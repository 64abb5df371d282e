"""The Inception benchmark at --tiny sizes through its main: JAX and fid-helper's TorchScript Inception on the
same images agree, every figure is a positive rate, the ratio is the ratio of the times, and an XLA variant
runs in a process of its own."""

import pytest

from fvq_jax.benchmarks import inception
from tests.inception_weights import export_with_head


def test_tiny_run_compares_both_inceptions(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FVQ_INCEPTION_WEIGHTS", str(export_with_head(tmp_path)))
    records = inception.main(["--tiny", "--variants=onednn", f"--out={tmp_path / 'inception.jsonl'}"])
    assert [r["what"] for r in records] == ["inception_whole", "inception_stage", "inception_xla_variant"]
    whole, network, variant = records
    assert whole["max_abs_feature_diff"] <= inception.FEATURE_TOLERANCE and whole["batch"] == 2
    for record in (whole, network):
        assert record["jax_images_per_s"] > 0 and record["torch_images_per_s"] > 0
        assert record["jax_over_torch"] == pytest.approx(record["torch_ms"] / record["jax_ms"])
        assert record["jax_images_per_s"] == pytest.approx(2e3 / record["jax_ms"])
    # XLA counts Inception-v3 at ~5.7 G multiply-adds per 299x299 image (11.5 GFLOP), whatever the batch.
    assert network["stage"] == "network" and 10 < network["gflop"] / 2 < 13
    assert network["jax_gflops"] == pytest.approx(network["gflop"] / (network["jax_ms"] / 1e3))
    assert variant["variant_flags"] == "--xla_cpu_use_onednn=true" and variant["jax_images_per_s"] > 0, variant
    assert len((tmp_path / "inception.jsonl").read_text().splitlines()) == 3
    table = capsys.readouterr().out.split("| what |")[1]
    assert "| whole (pixels -> features) |" in table and "| whole, XLA onednn |" in table

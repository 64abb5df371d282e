"""The Inception benchmark at --tiny sizes through its main: JAX and fid-helper's TorchScript Inception on the
same images agree, every figure is a positive rate, the ratio is the ratio of the times, an XLA variant runs in
a process of its own, and three score-task runs show the feature caches at work."""

import pytest

from fvq_jax.benchmarks import inception
from tests.inception_weights import export_with_head


def test_tiny_run_compares_both_inceptions(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FVQ_INCEPTION_WEIGHTS", str(export_with_head(tmp_path)))
    records = inception.main(["--tiny", "--variants=eigen_conv", "--score_samples=4", "--score_reference=5",
                              f"--out={tmp_path / 'inception.jsonl'}"])
    assert [(r["what"], r.get("stage") or r.get("run")) for r in records] == [
        ("inception_whole", None), ("inception_stage", "preprocessing"), ("inception_torch_ops", None),
        ("inception_stage", "network"), ("inception_xla_variant", None), ("score_task", "first"),
        ("score_task", "same samples again"), ("score_task", "new samples")]
    whole, preprocessing, ops, network, variant, *score_runs = records
    assert whole["max_abs_feature_diff"] <= inception.FEATURE_TOLERANCE and whole["batch"] == 2
    for record in (whole, preprocessing, network):
        assert record["jax_images_per_s"] > 0 and record["torch_images_per_s"] > 0
        assert record["jax_over_torch"] == pytest.approx(record["torch_ms"] / record["jax_ms"])
        assert record["jax_images_per_s"] == pytest.approx(2e3 / record["jax_ms"])
    # XLA counts Inception-v3 at ~5.7 G multiply-adds per 299x299 image (11.5 GFLOP), whatever the batch.
    assert 10 < network["gflop"] / 2 < 13
    assert network["jax_gflops"] == pytest.approx(network["gflop"] / (network["jax_ms"] / 1e3))
    shares = ops["torch_op_shares"]
    assert set(shares) == set(inception.TORCH_OPS) and shares["mkldnn_convolution"] > 0.2 and sum(shares.values()) <= 1
    assert variant["variant"] == "eigen_conv" and variant["jax_images_per_s"] > 0
    assert variant["variant_flags"] == dict(inception.VARIANTS)["eigen_conv"]
    # The score task's caches: nothing the first time, both the second, the reference's with new samples.
    assert [run["cache_hits"] for run in score_runs] == [[], ["sample features", "reference features"],
                                                         ["reference features"]]
    assert score_runs[0]["ratio_to_first"] == 1 and all(run["seconds"] > 0 for run in score_runs)
    assert score_runs[1]["ratio_to_first"] == pytest.approx(score_runs[1]["seconds"] / score_runs[0]["seconds"])
    assert len((tmp_path / "inception.jsonl").read_text().splitlines()) == 8
    out = capsys.readouterr().out
    assert "| whole (pixels -> features) |" in out and "| whole, XLA eigen_conv |" in out
    assert "torch network time by op: mkldnn_convolution " in out and "score task, same samples again: " in out

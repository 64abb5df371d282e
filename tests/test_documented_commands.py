"""Every command the documentation shows runs in a tiny form in some test.

The commands are read from DOCUMENTS (`python -m fvq_jax...` lines, one entry point per module and, for
`fvq_jax.main`, per config file; every `launch/...` script), and ENTRY_POINTS names the tests (or the fixtures
they use) that drive each entry point through its own `main`, its config through `fvq_jax.main`, or the script
itself. A command documented without a test here fails `test_every_documented_command_has_a_driving_test`: write
a tiny-form test that calls its `main`, then add a row. The last test runs the README's own-folder walkthrough
(digits folder, tokenizer, its evaluation, extraction, GPT, samples, scores, CFG sweep) at CPU sizes through the
`main`s themselves.
"""

from __future__ import annotations

import ast
import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

DOCUMENTS = ("README.md", "launch/README.md", "fvq_jax/benchmarks/RESULTS.md")
THIS = "tests/test_documented_commands.py"

# Entry point -> "path::function" of the tests (or fixtures) that run it in a tiny form.
BENCH = "tests/benchmarks/test_benchmark_mains.py"
ENTRY_POINTS = {
    "fvq_jax.main": ("tests/train/test_distributed.py::test_two_processes_match_one",),
    "fvq_jax.main configs/tokenizer.py": (
        f"{THIS}::test_the_readme_chain_runs_through_main",
        "tests/train/test_run_safety.py::test_a_preempted_run_exits_with_its_own_status",
        "tests/train/test_run_safety.py::test_errors_in_the_config_argument_reach_the_user"),
    "fvq_jax.main configs/eval_tokenizer.py": (f"{THIS}::test_the_readme_chain_runs_through_main",),
    "fvq_jax.main configs/extract_codes.py": (
        f"{THIS}::test_the_readme_chain_runs_through_main",
        "tests/extraction/test_extract_codes.py::test_two_processes_write_what_one_does",),
    "fvq_jax.main configs/gpt.py": (f"{THIS}::test_the_readme_chain_runs_through_main",),
    "fvq_jax.main configs/sample.py": (f"{THIS}::test_the_readme_chain_runs_through_main",),
    "fvq_jax.main configs/score.py": (f"{THIS}::test_the_readme_chain_runs_through_main",),
    "fvq_jax.main configs/serve.py": (
        "tests/serving/test_serve_task.py::test_sigterm_finishes_the_request_in_flight_and_exits_0",),
    "fvq_jax.tools.fault_injection": (
        "tests/tools/test_fault_injection.py::test_a_killed_run_ends_where_an_uninterrupted_one_does",),
    "fvq_jax.tools.export_inception": ("tests/tools/test_export_inception.py::exported",),
    "fvq_jax.tools.export_vq": ("tests/tools/test_export_vq.py::exported",),
    "fvq_jax.tools.import_torch": (
        "tests/tools/test_import_torch.py::test_cli_import_reproduces_the_reference",
        "tests/tools/test_import_torch.py::test_gpt_cli_import_reproduces_the_reference"),
    "fvq_jax.tools.export_torch": (
        "tests/tools/test_export_torch.py::test_fvq_export_is_the_reference_file",
        "tests/tools/test_export_torch.py::test_gpt_goes_back_to_the_reference_file_and_returns_unchanged"),
    "fvq_jax.tools.cfg_sweep": ("tests/tools/test_cfg_sweep.py::test_cfg_sweep_samples_and_scores_each_scale",
                                f"{THIS}::test_the_readme_chain_runs_through_main"),
    "fvq_jax.tools.sweep_report": ("tests/tools/test_sweep_report.py::test_report_tables_the_runs_and_plots_usage",),
    "fvq_jax.tools.bridge_positions": (
        "tests/tools/test_bridge_positions.py::test_positions_of_the_saved_window_against_a_loop",),
    "fvq_jax.tools.sample_folder": ("tests/tools/test_sample_folder.py::test_the_command_writes_the_folder",
                                    "tests/tools/test_sample_folder.py::test_digits_folder_through_main",
                                    f"{THIS}::test_the_readme_chain_runs_through_main"),
    "fvq_jax.benchmarks.train_step": (f"{BENCH}::test_train_step_at_the_suites_cpu_sizes",),
    "fvq_jax.benchmarks.quantizer": (f"{BENCH}::test_quantizer_variants_against_the_first",
                                     f"{BENCH}::test_quantizer_bf16_agreement_on_random_tokens",
                                     f"{BENCH}::test_quantizer_bf16_agreement_on_a_trained_run"),
    "fvq_jax.benchmarks.input_pipeline": (f"{BENCH}::test_input_pipeline_against_the_plain_loop",),
    "fvq_jax.benchmarks.gpt_train_step": (f"{BENCH}::test_gpt_train_step_measures_the_fp32_baseline_in_the_same_run",),
    "fvq_jax.benchmarks.gpt_loss_memory": (f"{BENCH}::test_gpt_loss_memory_full_against_chunked",),
    "fvq_jax.benchmarks.sampling": (f"{BENCH}::test_sampling_kv_cache_against_the_naive_sampler",),
    "fvq_jax.benchmarks.inception": ("tests/benchmarks/test_inception.py::test_tiny_run_compares_both_inceptions",),
    "fvq_jax.benchmarks.gpt_compile": (
        "tests/benchmarks/test_gpt_compile.py::test_tiny_mode_compiles_and_steps_both_layouts",),
    "fvq_jax.benchmarks.extraction": (
        "tests/benchmarks/test_extraction.py::test_tiny_benchmark_runs_every_path_and_finds_the_same_codes",),
    "fvq_jax.benchmarks.serve": ("tests/benchmarks/test_serve_benchmark.py::test_the_tiny_load_benchmark",),
    "fvq_jax.benchmarks.suite": (
        "tests/benchmarks/test_suite.py::tiny_run",
        "tests/benchmarks/test_suite.py::test_device_sizes_are_refused_without_an_accelerator"),
    "launch/sweep.py": ("tests/launch/test_sweep.py::test_dry_run_prints_the_commands_and_marks_finished_runs",),
    "launch/xm_launch.py": ("tests/launch/test_xm_launch.py::test_dry_run_prints_the_jobs_the_experiment_gets",
                            "tests/launch/test_xm_launch.py::test_sweep_becomes_one_vertex_job_per_run"),
    "launch/tpu/train.sh": ("tests/launch/test_tpu.py::test_dry_run_prints_every_command_once_and_pasteable",
                            "tests/launch/test_tpu.py::test_gcloud_calls"),
    "launch/slurm/train.sbatch": ("tests/launch/test_slurm.py::test_dry_run_prints_the_srun_command",
                                  "tests/launch/test_slurm.py::test_srun_gets_the_flags_and_the_environment"),
    "launch/device_suite.sh": (
        "tests/launch/test_device_suite.py::test_dry_run_prints_the_commands_and_runs_nothing",
        "tests/launch/test_device_suite.py::test_run_installs_carried_wheels_and_runs_the_suite_into_out"),
}

MODULE = re.compile(r"python3? -m (fvq_jax(?:\.\w+)+)([^\n`]*)")
CONFIG = re.compile(r"--config=(configs/[\w/]+\.py)")
SCRIPT = re.compile(r"\b(launch/[\w/]+\.(?:py|sh|sbatch))\b")


def documented_entry_points(text: str) -> set[str]:
    """The entry points of the commands in `text` (continued lines joined): modules, `fvq_jax.main` with each
    config file, launch scripts."""
    text = text.replace("\\\n", " ")
    found = set(SCRIPT.findall(text))
    for module, rest in MODULE.findall(text):
        config = CONFIG.search(rest) if module == "fvq_jax.main" else None
        found.add(f"{module} {config[1]}" if config else module)
    return found


def driver_markers(entry: str) -> tuple[str, ...]:
    """Text the file of a test that drives `entry` must hold (any one of them): the module's `main(` call or its
    -m name; a config's file (fvq_jax.main is checked apart); a script's path or name."""
    if entry.startswith("launch/"):
        return (entry, entry.rsplit("/", 1)[1])
    module, _, config = entry.partition(" ")
    if config:
        return (config,)
    return (f"{module.rsplit('.', 1)[1]}.main(", module)


def test_the_extraction_reads_every_form_of_command():
    text = ("```bash\npython -m fvq_jax.main --config=configs/gpt.py:paper,model=GPT-L \\\n    --workdir=w\n"
            "python3 -m fvq_jax.tools.export_vq --workdir=RUN\n"
            "WORKDIR=x bash launch/slurm/train.sbatch --dry-run\n```\n"
            "`python -m fvq_jax.main --multihost ...` and `launch/xm_launch.py`; "
            "see [launch/README.md](launch/README.md)")
    assert documented_entry_points(text) == {"fvq_jax.main configs/gpt.py", "fvq_jax.tools.export_vq", "fvq_jax.main",
                                             "launch/slurm/train.sbatch", "launch/xm_launch.py"}


def test_every_documented_command_has_a_driving_test():
    documented = set().union(*(documented_entry_points((ROOT / doc).read_text()) for doc in DOCUMENTS))
    untested = sorted(documented - set(ENTRY_POINTS))
    assert not untested, f"documented in {DOCUMENTS} but driven by no test in ENTRY_POINTS: {untested}"
    stale = sorted(set(ENTRY_POINTS) - documented)
    assert not stale, f"ENTRY_POINTS rows for commands no document shows any more: {stale}"


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_each_driving_test_exists_and_runs_its_entry_point(entry):
    for node in ENTRY_POINTS[entry]:
        path, _, name = node.partition("::")
        source = (ROOT / path).read_text()
        functions = {f.name for f in ast.parse(source).body if isinstance(f, ast.FunctionDef)}
        assert name in functions, f"{node}: no function {name} in {path}"
        markers = driver_markers(entry)
        assert any(marker in source for marker in markers), f"{path} never mentions {markers}"
        if entry.startswith("fvq_jax.main "):
            assert "fvq_jax.main" in source or "run_main(" in source, f"{path} does not run fvq_jax.main"


def test_the_readme_chain_runs_through_main(tmp_path, monkeypatch, capsys):
    """The README's own-folder walkthrough ("Your own labelled folder") at CPU sizes, each step through its entry
    point's `main`: the digits folder (3 digits of each class in each split), a tokenizer on it
    (configs/tokenizer.py:tiny: 16 x 16 images, 4 x 4 codes, K = 64), its evaluation, ten-crop codes of every
    training image, a GPT whose step count follows from the epochs, samples with every class in grid.png, their
    scores against the folder's validation split, and a CFG sweep against the same folder in one command."""
    from absl import flags

    from fvq_jax.data import codes
    from fvq_jax.data.sources import FolderSource
    from fvq_jax.evaluation.feature_stats import load_image_set
    from fvq_jax.evaluation.reports import image_grid
    from fvq_jax.tools import cfg_sweep, sample_folder
    from tests.inception_weights import export_with_head
    from tests.main_runner import run_main

    folder, classes, per_class = tmp_path / "digits", 10, 3
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["sample_folder", "--kind=digits", "--variants=1", f"--per_class={per_class}", f"--out={folder}"])
    try:
        sample_folder.main([])
    finally:
        flags.FLAGS.unparse_flags()
    train, validation = FolderSource(str(folder), "train"), FolderSource(str(folder), "validation")
    for split in (train, validation):
        assert sorted(split[i]["label"] for i in range(len(split))) == sorted(list(range(classes)) * per_class)

    tokenizer_run = tmp_path / "fvq_digits"
    run_main("--config=configs/tokenizer.py:tiny,data=folder,steps=3", f"--config.data.folder={folder}",
             f"--workdir={tokenizer_run}")
    run_main("--config=configs/eval_tokenizer.py", f"--workdir={tokenizer_run}")
    evaluation = json.loads((tokenizer_run / "eval" / "step_3" / "metrics.json").read_text())
    assert evaluation["protocol"]["step"] == 3 and evaluation["num_images"] == 16  # the tiny config's eval.num_images

    codes_dir = tmp_path / "digit_codes"
    run_main(f"--config=configs/extract_codes.py:tokenizer={tokenizer_run}", f"--workdir={codes_dir}")
    dataset = codes.open_codes(codes_dir)
    assert dataset.num_classes == classes and dataset.class_names == tuple(map(str, range(classes)))
    records = sorted((dataset[i] for i in range(len(dataset))), key=lambda r: int(r["index"]))
    assert [int(r["index"]) for r in records] == list(range(len(train)))  # every training image, once
    assert [int(r["label"]) for r in records] == [train[i]["label"] for i in range(len(train))]
    assert all(r["codes"].shape == (10, 16) and 0 <= r["codes"].min() and r["codes"].max() < 64 for r in records)

    gpt_run, batch, epochs = tmp_path / "gpt_digits", 8, 1
    run_main(f"--config=configs/gpt.py:model=GPT-tiny,batch={batch},epochs={epochs},min_steps=0,codes={codes_dir}",
             f"--workdir={gpt_run}", "--config.train.sample_every=0", "--config.train.log_every=1")
    steps = [json.loads(line)["step"] for line in (gpt_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, -(-epochs * len(train) // batch) + 1))  # ceil(epochs x images / batch) steps

    run_main("--config=configs/sample.py:n=10,batch=10,cfg=2.0", f"--workdir={gpt_run}")
    (record,) = gpt_run.glob("samples/*/sampling.json")
    samples = record.parent
    batches = [np.load(f) for f in sorted(samples.glob("batch_*.npz"))]
    images, labels = (np.concatenate([b[name] for b in batches]) for name in ("arr_0", "arr_1"))
    assert images.shape == (10, 16, 16, 3) and sorted(labels) == list(range(classes))
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(classes)]  # one row per class, its first sample
    np.testing.assert_array_equal(np.asarray(Image.open(samples / "grid.png").convert("RGB")),
                                  image_grid(images[first], columns=1))

    monkeypatch.setenv("FVQ_INCEPTION_WEIGHTS", str(export_with_head(tmp_path)))
    reference = f"{folder},split=validation,crop=center"
    run_main(f"--config=configs/score.py:ref={reference},batch=6", f"--workdir={samples}")
    scores = json.loads((samples / "scores.json").read_text())
    assert scores["num_samples"] == 10 and np.isfinite(scores["gfid"])
    assert scores["classes"] == classes and scores["chance"] == pytest.approx(1 / classes)
    # Class consistency against the nearest reference image found here from the cached features (float64).
    (entry,) = (folder / ".fvq_cache").glob("folder-validation-center16-n30-*.npz")
    sample_set, reference_set = load_image_set(samples / "sample_features.npz")[0], load_image_set(entry)[0]
    np.testing.assert_array_equal(sample_set.labels, labels)
    assert sorted(reference_set.labels) == sorted(validation[i]["label"] for i in range(len(validation)))
    distances = ((sample_set.features[:, None].astype(np.float64) - reference_set.features[None]) ** 2).sum(-1)
    same = reference_set.labels[None] == labels[:, None]
    nearest_same, nearest_other = np.where(same, distances, np.inf).min(1), np.where(same, np.inf, distances).min(1)
    clear = np.abs(nearest_same - nearest_other) > 1e-4 * np.minimum(nearest_same, nearest_other)
    hits = nearest_same < nearest_other
    assert (hits & clear).mean() <= scores["class_consistency"] <= (hits | ~clear).mean()

    capsys.readouterr()
    sweep = tmp_path / "cfg_sweep"
    cfg_sweep.main([f"--workdir={gpt_run}", "--scales=1.0,2.0", "--num_samples=10", f"--out={sweep}",
                    "--sample_arg=batch=10", f"--reference={reference}", "--score_arg=batch=6"])
    log = capsys.readouterr().out
    assert f"reference features: cache hit {entry}" in log and "reference features 30/30" not in log
    np.testing.assert_array_equal(np.concatenate([np.load(f)["arr_0"] for f in sorted(
        (sweep / "cfg_2").glob("batch_*.npz"))]), images)  # the sample job's samples again
    rows = json.loads((sweep / "results.json").read_text())
    assert [row["cfg_scale"] for row in rows] == [1.0, 2.0] and rows[1]["gfid"] == pytest.approx(scores["gfid"])
    assert rows[1]["class_consistency"] == pytest.approx(scores["class_consistency"])
    table = (sweep / "table.md").read_text().splitlines()
    assert table[0] == "10 samples per scale against 30 reference images (folder/validation center crops)"
    assert table[4].startswith("| 1 | ") and table[5].startswith("| 2 | ") and table[5].endswith(" | 0.100 |")

"""The extraction benchmark through its main at --tiny sizes: every stage timed, today's extraction (run from its
own source tree) and this one end to end, their codes compared, verification timed."""

import json
import subprocess
import sys

from tests.conftest import ROOT, subprocess_env


def test_tiny_benchmark_runs_every_path_and_finds_the_same_codes():
    result = subprocess.run([sys.executable, "-m", "fvq_jax.benchmarks.extraction", "--tiny"], cwd=ROOT,
                            env=subprocess_env(1), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    names = list(record["stages_ms_per_image"])
    assert names[:6] == ["decode", "resize", "crops+flips", "to device", "encoder", "writing"]
    assert names[6:] and all(name.startswith("encoder, batch ") for name in names[6:])
    assert all(wall > 0 and cpu > 0 for wall, cpu in record["stages_ms_per_image"].values())
    assert record["encoder_images_per_s"] > 0 and record["verify_MB_per_s"] > 0
    # Today's extraction, from the commit before it moved, and this one, at the same batch: the same codes.
    today, this = record["end_to_end"]
    assert today["setting"].startswith("today (fvq_jax/tools/extract_codes.py at ") and today["batch"] == 8
    assert this["setting"] == "this (fvq_jax/extraction)" and this["batch"] == 8
    assert today["images_per_s"] > 0 and this["images_per_s"] > 0
    assert record["codes_identical"] == {"this and today at batch 8": [24, 24]}
    assert f"| {today['setting']}, batch 8 |" in result.stdout and "| this (fvq_jax/extraction), batch 8 |" in \
        result.stdout

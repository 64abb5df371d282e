"""launch/device_suite.sh with a fake python3 on PATH: the wheels it downloads and installs, the
suite command under a timeout, and the log and table it leaves in the output folder; --dry-run prints
those commands and runs nothing."""

import os
import shlex
import subprocess

from tests.conftest import ROOT

SCRIPT = ROOT / "launch" / "device_suite.sh"
FAKE_PYTHON = """#!/bin/sh
echo "python3 $* | PYTHONPATH=$PYTHONPATH" >> "$FAKE_LOG"
case "$*" in
  *fvq_jax.benchmarks.suite*) echo "| stage | figure |" > "$4/suite.md"; echo "suite ran" ;;
esac
"""


def script(tmp_path, *args, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if k != "OUT"}
    full_env.update(FAKE_LOG=str(tmp_path / "calls.log"), WHEEL_DIR=str(tmp_path / "wheels"), **env)
    full_env["PATH"] = os.pathsep.join([str(bin_dir), full_env["PATH"]])
    result = subprocess.run(["bash", str(SCRIPT), *args], env=full_env, text=True, capture_output=True, timeout=60)
    calls = (tmp_path / "calls.log").read_text().splitlines() if (tmp_path / "calls.log").exists() else []
    return result, calls


def test_download_fetches_the_pinned_cp312_wheels(tmp_path):
    result, calls = script(tmp_path, "download")
    assert result.returncode == 0, result.stderr
    (call,) = calls
    assert call.startswith("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12")
    assert f"-d {tmp_path / 'wheels'} grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0" in call


def test_run_installs_carried_wheels_and_runs_the_suite_into_out(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl").write_text("")
    out = tmp_path / "out"
    result, calls = script(tmp_path, "--tiny", OUT=str(out), SUITE_TIMEOUT="30")
    assert result.returncode == 0, result.stderr
    install, check, suite = calls
    assert install.startswith("python3 -m pip install -q --no-index --no-deps") and "--target /tmp/fvq_site" in install
    assert check.startswith("python3 -c import fvq_jax, grain, ml_collections, jax")
    assert suite.startswith(f"python3 -m fvq_jax.benchmarks.suite --out {out} --tiny | PYTHONPATH=/tmp/fvq_site:{ROOT}")
    assert "suite ran" in (out / "suite.log").read_text()
    assert "| stage | figure |" in result.stdout  # the table is printed at the end


def test_without_wheels_nothing_is_installed(tmp_path):
    result, calls = script(tmp_path, str(tmp_path / "dir"))
    assert result.returncode == 0, result.stderr
    assert [c.split()[1] for c in calls] == ["-c", "-m"]
    assert f"--out {tmp_path / 'dir'} | PYTHONPATH={ROOT}" in calls[1]


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    wheel = "grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl"
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / wheel).write_text("")
    out = tmp_path / "my out"
    result, calls = script(tmp_path, "--dry-run", str(out), "--only", "quantizer", SUITE_TIMEOUT="30",
                           JAX_COMPILATION_CACHE_DIR="/tmp/cache")
    assert result.returncode == 0, result.stderr
    assert calls == [] and not out.exists()
    install, env, suite = result.stdout.splitlines()
    assert shlex.split(install) == [
        "python3", "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
        "--upgrade", "--target", "/tmp/fvq_site", str(tmp_path / "wheels" / wheel)]
    export, pythonpath, cache = shlex.split(env)
    assert (export, cache) == ("export", "JAX_COMPILATION_CACHE_DIR=/tmp/cache")
    assert pythonpath.startswith(f"PYTHONPATH=/tmp/fvq_site:{ROOT}")
    assert shlex.split(suite) == ["timeout", "--signal=TERM", "--kill-after=15", "30", "python3", "-m",
                                  "fvq_jax.benchmarks.suite", "--out", str(out), "--only", "quantizer", "2>&1", "|",
                                  "tee", "-a", f"{out}/suite.log"]


def test_dry_run_download_prints_the_pip_command(tmp_path):
    result, calls = script(tmp_path, "--dry-run", "download")
    assert result.returncode == 0 and calls == [] and not (tmp_path / "wheels").exists()
    (line,) = result.stdout.splitlines()
    assert shlex.split(line)[-5:] == [str(tmp_path / "wheels"), "grain==0.2.18", "array_record==0.8.6",
                                      "portpicker==1.6.0", "ml_collections==1.1.0"]

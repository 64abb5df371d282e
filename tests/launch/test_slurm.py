"""launch/slurm/train.sbatch: syntax, directives sbatch will read, --dry-run, and the srun call
with a fake srun on PATH."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / "launch" / "slurm" / "train.sbatch"
ENV = dict(WORKDIR="/shared/runs/r1", CONFIG="configs/tokenizer.py:paper,codebook=262144", SLURM_CPUS_PER_TASK="16")
EXTRA = ["--config.train.log_every=50", "--config.data.folder=/my data/it's"]


def script(*args, path_dirs=(), **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_PYTHON_CLIENT"))}
    full_env.update(ENV, **env)
    full_env["PATH"] = os.pathsep.join([*map(str, path_dirs), full_env["PATH"]])
    return subprocess.run(["bash", str(SCRIPT), *args], env=full_env, text=True, capture_output=True, timeout=60)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_directives_come_before_the_first_command():
    """sbatch stops reading #SBATCH lines at the first command; one task per GPU needs 8 per node."""
    lines = SCRIPT.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line.split()[1] for line in lines if line.startswith("#SBATCH")]
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
    assert {"--ntasks-per-node=8", "--gpus-per-node=8", "--signal=TERM@300", "--requeue"} <= set(directives)


def test_dry_run_prints_the_srun_command():
    result = script("--dry-run", *EXTRA)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
        "srun --kill-on-bad-exit=1 python3 -m fvq_jax.main --multihost "
        "--config=configs/tokenizer.py:paper,codebook=262144 --workdir=/shared/runs/r1 "
        "--config.data.num_workers=8 --config.train.log_every=50 '--config.data.folder=/my data/it'\\''s'"]


def test_srun_gets_the_flags_and_the_environment(tmp_path):
    (tmp_path / "srun").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps(dict(argv=sys.argv[1:], mem=os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))))\n")
    (tmp_path / "srun").chmod(0o755)
    result = script(*EXTRA, path_dirs=[tmp_path], PYTHON="/envs/fvq/bin/python", DATA_WORKERS="3",
                    XLA_PYTHON_CLIENT_MEM_FRACTION="0.8")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == dict(mem="0.8", argv=[
        "--kill-on-bad-exit=1", "/envs/fvq/bin/python", "-m", "fvq_jax.main", "--multihost",
        "--config=configs/tokenizer.py:paper,codebook=262144", "--workdir=/shared/runs/r1",
        "--config.data.num_workers=3", *EXTRA])


def test_missing_workdir_is_an_error():
    result = script("--dry-run", WORKDIR="")
    assert result.returncode == 2 and "set WORKDIR" in result.stderr and not result.stdout


def test_a_preempted_run_requeues_its_job(tmp_path):
    """Status 75 (the trainer's "preempted, checkpoint saved") requeues the job; other failures do not."""
    for name, body in (("srun", "import sys, os; sys.exit(int(os.environ['FAKE_STATUS']))"),
                       ("scontrol", "import sys; print('scontrol', *sys.argv[1:])")):
        (tmp_path / name).write_text(f"#!{sys.executable}\n{body}\n")
        (tmp_path / name).chmod(0o755)
    preempted = script(path_dirs=[tmp_path], FAKE_STATUS="75", SLURM_JOB_ID="4242")
    assert preempted.returncode == 75 and "scontrol requeue 4242" in preempted.stdout
    failed = script(path_dirs=[tmp_path], FAKE_STATUS="1", SLURM_JOB_ID="4242")
    assert failed.returncode == 1 and "scontrol" not in failed.stdout
    finished = script(path_dirs=[tmp_path], FAKE_STATUS="0", SLURM_JOB_ID="4242")
    assert finished.returncode == 0 and "scontrol" not in finished.stdout

"""launch/tpu/train.sh: syntax, --dry-run lines, the remote command strings as the workers' shell
runs them, the gcloud calls with a fake gcloud on PATH, and errors."""

import os
import shlex
import subprocess
import time

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "launch" / "tpu" / "train.sh"
SETTINGS = dict(BUCKET="gs://bkt", REPO_URL="https://github.com/me/fvq_jax.git", TPU_NAME="pod1", ZONE="z1",
                PROJECT="proj")
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]
WHERE = ["--zone=z1", "--project=proj"]
INSTALL = ('cd fvq_jax_job && { [ -x "$HOME/.local/bin/uv" ] || curl -LsSf https://astral.sh/uv/install.sh | sh; } '
           '&& "$HOME/.local/bin/uv" venv --allow-existing --python 3.12 venv '
           '&& "$HOME/.local/bin/uv" pip install --python venv/bin/python --upgrade '
           "'jax[tpu]' 'fvq_jax @ git+https://github.com/me/fvq_jax.git@main'")
TRAIN = ("cd fvq_jax_job && venv/bin/python -m fvq_jax.main --multihost "
         "--config=configs/tokenizer.py:paper,codebook=262144 --workdir=gs://bkt/fvq_jax/r1 "
         "--config.train.log_every=50 '--config.data.folder=/my data/it'\\''s'")
ARGS = ["--run=r1", "--config=configs/tokenizer.py:paper,codebook=262144", "--",
        "--config.train.log_every=50", "--config.data.folder=/my data/it's"]


def script(*args, path_dirs=(), **env):
    full_env = dict(os.environ, **SETTINGS)
    full_env.update(env)
    full_env["PATH"] = os.pathsep.join([*map(str, path_dirs), full_env["PATH"]])
    return subprocess.run(["bash", str(SCRIPT), *args], env=full_env, text=True, capture_output=True, timeout=60)


def ssh(remote):
    return [*GCLOUD, "ssh", "pod1", *WHERE, "--worker=all", f"--command={remote}"]


def fake_gcloud(tmp_path):
    """A gcloud that logs its arguments; `describe` prints $FAKE_TPU_STATE (fails when empty)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        "#!/bin/bash\nprintf '%s\\0' \"$@\" >> \"$GCLOUD_LOG\"; printf '\\n' >> \"$GCLOUD_LOG\"\n"
        "if [[ $4 == describe ]]; then [[ -n $FAKE_TPU_STATE ]] && echo \"$FAKE_TPU_STATE\"; fi\n")
    (bin_dir / "gcloud").chmod(0o755)
    return bin_dir


def gcloud_calls(log):
    return [line.split("\0")[:-1] for line in log.read_text().split("\n")[:-1]]


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_prints_every_command_once_and_pasteable():
    result = script("--dry-run", "--create", *ARGS, SPOT="1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        "# if pod1 does not exist (a PREEMPTED or TERMINATED one is deleted first):",
        "gcloud compute tpus tpu-vm create pod1 --zone=z1 --project=proj --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot"]
    # Each remote command is shown as the workers' shell gets it, then the command line that runs
    # it: one shell line that splits back into the real arguments.
    assert len(lines) == 9
    assert [lines[2], lines[5], lines[7]] == [f"# on every worker: {remote}"
                                              for remote in ("mkdir -p fvq_jax_job", INSTALL, TRAIN)]
    assert [shlex.split(lines[i]) for i in (3, 4, 6, 8)] == [
        ssh("mkdir -p fvq_jax_job"),
        [*GCLOUD, "scp", "--recurse", f"{ROOT}/configs", "pod1:fvq_jax_job/", *WHERE, "--worker=all"],
        ssh(INSTALL), ssh(TRAIN)]


def test_remote_train_command_gives_the_workers_python_the_exact_flags(tmp_path):
    """The worker's shell runs the --command string: its python must get the flags unmangled."""
    python = tmp_path / "fvq_jax_job" / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/bash\nprintf '%s\\n' \"$@\" > \"$ARGV_LOG\"\n")
    python.chmod(0o755)
    remote = shlex.split(script("--dry-run", *ARGS).stdout.splitlines()[-1])[-1].removeprefix("--command=")
    subprocess.run(["bash", "-c", remote], cwd=tmp_path, env=dict(os.environ, ARGV_LOG=str(tmp_path / "argv")),
                   check=True)
    assert (tmp_path / "argv").read_text().splitlines() == [
        "-m", "fvq_jax.main", "--multihost", "--config=configs/tokenizer.py:paper,codebook=262144",
        "--workdir=gs://bkt/fvq_jax/r1", "--config.train.log_every=50", "--config.data.folder=/my data/it's"]


def test_detach_then_stop_sends_sigterm_to_the_job(tmp_path):
    python = tmp_path / "fvq_jax_job" / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/bash\ntrap 'kill $!; echo saved > got_sigterm; exit 0' TERM\necho running\n"
                      "sleep 30 & wait\n")
    python.chmod(0o755)
    detach = shlex.split(script("--dry-run", "--detach", *ARGS).stdout.splitlines()[-1])[-1]
    stop = shlex.split(script("--dry-run", "--stop").stdout.splitlines()[-1])[-1]
    subprocess.run(["bash", "-c", detach.removeprefix("--command=")], cwd=tmp_path, check=True, timeout=10)
    log = tmp_path / "fvq_jax_job" / "train.log"
    deadline = time.time() + 10
    while "running" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.05)
    subprocess.run(["bash", "-c", stop.removeprefix("--command=")], cwd=tmp_path, check=True, timeout=10)
    saved = tmp_path / "fvq_jax_job" / "got_sigterm"
    while not saved.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert saved.read_text() == "saved\n"


@pytest.mark.parametrize("state,expected", [
    ("READY", []),
    ("PREEMPTED", [["delete", "pod1", *WHERE, "--quiet"],
                   ["create", "pod1", *WHERE, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]),
    ("", [["create", "pod1", *WHERE, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]),
])
def test_gcloud_calls(tmp_path, state, expected):
    log = tmp_path / "gcloud.log"
    result = script("--create", *ARGS, path_dirs=[fake_gcloud(tmp_path)], GCLOUD_LOG=str(log), FAKE_TPU_STATE=state)
    assert result.returncode == 0, result.stderr
    made = [call[len(GCLOUD) - 1:] for call in gcloud_calls(log)]  # the log has no argv[0]
    assert made[0] == ["describe", "pod1", *WHERE, "--format=value(state)"]
    assert made[1:] == [*expected,
                        ["ssh", "pod1", *WHERE, "--worker=all", "--command=mkdir -p fvq_jax_job"],
                        ["scp", "--recurse", f"{ROOT}/configs", "pod1:fvq_jax_job/", *WHERE, "--worker=all"],
                        ssh(INSTALL)[len(GCLOUD):], ssh(TRAIN)[len(GCLOUD):]]


@pytest.mark.parametrize("args,env,message", [
    (["--dry-run"], {}, "--run=NAME is required"),
    (["--dry-run", "--run=r"], dict(BUCKET="my-bucket"), "set BUCKET=gs://your-bucket"),
    (["--dry-run", "--run=r"], dict(REPO_URL=""), "INSTALL=git needs REPO_URL"),
    (["--dry-run", "--run=r"], dict(INSTALL="conda"), "INSTALL must be git, wheel or skip"),
    (["--dry-run", "--runs=r"], {}, "unknown option --runs=r"),
])
def test_bad_settings_are_rejected(args, env, message):
    result = script(*args, **env)
    assert result.returncode == 2 and message in result.stderr and not result.stdout


def test_wheel_install_copies_the_wheel_of_this_version():
    result = script("--dry-run", "--run=r1", INSTALL="wheel")
    version = next(line.split("=")[1].strip() for line in (ROOT / "setup.cfg").read_text().splitlines()
                   if line.startswith("version"))
    wheel = f"fvq_jax-{version}-py3-none-any.whl"
    lines = result.stdout.splitlines()
    assert lines[0] == f"python3 -m pip wheel --no-deps --wheel-dir={ROOT}/dist {ROOT}"
    assert shlex.split(lines[3])[6:8] == [f"{ROOT}/configs", f"{ROOT}/dist/{wheel}"]
    assert lines[4].endswith(f"--upgrade 'jax[tpu]' ./{wheel}")

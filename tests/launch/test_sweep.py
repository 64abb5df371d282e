"""launch/sweep.py: expansion, names, flag quoting, dry runs, skipping finished runs, --only,
failures, SIGTERM forwarding, and errors for bad sweep files. Jobs are a fake `--main`."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from absl import flags
from ml_collections import config_flags

import sweep
from tests.conftest import ROOT, subprocess_env

EXAMPLE = "configs/sweeps/example.py"
EXAMPLE_NAMES = ["k1024_none", "k1024_S4", "k4096_none", "k4096_S4"]
LOCAL_STEPS = 360  # train.num_steps of configs/tokenizer.py:local

# Stands in for fvq_jax.main: records its argv and CUDA_VISIBLE_DEVICES in the workdir, then
# "finishes" (final eval + the last metrics step), fails (FAKE_FAIL names the run), or waits for
# SIGTERM (FAKE_MODE=wait) and records it.
FAKE_MAIN = textwrap.dedent("""
    import json, os, signal, sys, time
    args = sys.argv[1:]
    workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
    with open(os.path.join(workdir, "calls.jsonl"), "a") as f:
        f.write(json.dumps(dict(argv=args, cuda=os.environ.get("CUDA_VISIBLE_DEVICES"))) + "\\n")
    print("fake job", os.path.basename(workdir), flush=True)
    if os.path.basename(workdir) in os.environ.get("FAKE_FAIL", "").split(","):
        sys.exit(3)
    if os.environ.get("FAKE_MODE") == "wait":
        def stop(*_):
            open(os.path.join(workdir, "got_sigterm"), "w").close()
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        open(os.path.join(workdir, "started"), "w").close()
        time.sleep(60)
        sys.exit(4)
    os.makedirs(os.path.join(workdir, "eval", "final"), exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(dict(step=%d, loss=0.5)) + "\\n")
    with open(os.path.join(workdir, "eval", "final", "metrics.json"), "w") as f:
        json.dump(dict(psnr=20.0), f)
""" % LOCAL_STEPS)
FAKE = [sys.executable, "-c", FAKE_MAIN]


def cli(*args, main=FAKE, env=None, wait=True):
    command = [sys.executable, "launch/sweep.py", f"--main={shlex.join(main)}", *args]
    kwargs = dict(cwd=ROOT, env=subprocess_env(**(env or {})), text=True, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    return subprocess.run(command, timeout=120, **kwargs) if wait else subprocess.Popen(command, **kwargs)


def calls(workdir):
    path = workdir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fake_finished(workdir, step=LOCAL_STEPS):
    (workdir / "eval" / "final").mkdir(parents=True)
    (workdir / "eval" / "final" / "metrics.json").write_text("{}")
    (workdir / "metrics.jsonl").write_text(json.dumps(dict(step=step)) + "\n")


def write_sweep(tmp_path, body):
    path = tmp_path / "my_sweep.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_example_sweep_expands_to_named_runs_with_flags(monkeypatch):
    monkeypatch.chdir(ROOT)
    runs = sweep.load_sweep(EXAMPLE)
    assert [run.name for run in runs] == EXAMPLE_NAMES
    assert runs[1].args == {"config": "configs/tokenizer.py:local", "config.quantizer.codebook_size": "1024",
                            "config.quantizer.projector": "S/4"}
    assert all(run.num_steps == LOCAL_STEPS for run in runs)
    assert runs[1].command(["python", "-m", "fvq_jax.main"], "/w/k1024_S4", ["--multihost"]) == [
        "python", "-m", "fvq_jax.main", "--config=configs/tokenizer.py:local", "--workdir=/w/k1024_S4",
        "--config.quantizer.codebook_size=1024", "--config.quantizer.projector=S/4", "--multihost"]


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections
def test_default_names_and_flags_that_parse_back_to_the_sweep_values(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, """
        def get_sweep():
            return [
                {"config": "configs/tokenizer.py:local,codebook=4096,bridge=L/4"},
                {"config": "configs/tokenizer.py", "config.eval.metrics": ("psnr", "ssim"),
                 "config.data.flip": False, "config.optim.base_lr": 3e-4, "config.train.num_steps": 50,
                 "config.data.folder": "/data/my images/it's"},
                {"config": "configs/tokenizer.py"},
            ]
    """)
    runs = sweep.load_sweep(path)
    assert [run.name for run in runs] == [
        "local_codebook=4096_bridge=L-4",
        "metrics=psnr-ssim_flip=false_base_lr=0.0003_num_steps=50_folder=data-my-images-it-s",
        "tokenizer"]
    assert [run.num_steps for run in runs] == [LOCAL_STEPS, 50, LOCAL_STEPS]

    # What fvq_jax.main's config flag makes of the command line is exactly what the sweep wrote.
    for run, expected in [(runs[0], {"quantizer.codebook_size": 4096, "quantizer.projector": "L/4"}),
                          (runs[1], {"eval.metrics": ("psnr", "ssim"), "data.flip": False, "optim.base_lr": 3e-4,
                                     "train.num_steps": 50, "data.folder": "/data/my images/it's"})]:
        argv = run.command(["prog"], "/w/run")
        printed = shlex.join(argv)  # as --dry-run prints it: one shell line that splits back
        assert shlex.split(printed) == argv
        monkeypatch.setattr(sys, "argv", argv)  # config_flags finds the overrides in sys.argv
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
        flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
        flag_values(argv)
        assert flag_values.workdir == "/w/run"
        for field, value in expected.items():
            block, leaf = field.split(".")
            assert flag_values.config[block][leaf] == value, field


def test_dry_run_prints_the_commands_and_marks_finished_runs(tmp_path):
    fake_finished(tmp_path / "k1024_none")
    result = cli(f"--sweep={EXAMPLE}", f"--workdir_root={tmp_path}", "--dry-run", "--only=k1024",
                 "--", "--config.data.num_workers=2", main=["python", "-m", "fvq_jax.main"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "# k1024_none: finished, skipped",
        "# k1024_S4",
        f"python -m fvq_jax.main --config=configs/tokenizer.py:local --workdir={tmp_path}/k1024_S4 "
        "--config.quantizer.codebook_size=1024 --config.quantizer.projector=S/4 --config.data.num_workers=2"]
    assert sorted(os.listdir(tmp_path)) == ["k1024_none"]  # a dry run writes nothing


def test_runs_unfinished_runs_logs_them_and_skips_them_once_finished(tmp_path):
    fake_finished(tmp_path / "k1024_none")
    fake_finished(tmp_path / "k1024_S4", step=120)  # preempted before an extension of num_steps: not finished
    result = cli(f"--sweep={EXAMPLE}", f"--workdir_root={tmp_path}", "--parallel=2", "--gpus_per_run=1",
                 env=dict(FAKE_FAIL="k4096_none"))
    assert result.returncode == 1, result.stderr
    assert "skip k1024_none: finished" in result.stdout
    assert calls(tmp_path / "k1024_none") == []
    summary = json.loads((tmp_path / "sweep.json").read_text())
    status = {run["name"]: (run["status"], run.get("returncode")) for run in summary["runs"]}
    assert status == {"k1024_none": ("finished", None), "k1024_S4": ("finished", 0),
                      "k4096_none": ("failed", 3), "k4096_S4": ("finished", 0)}

    runs = {run["name"]: run for run in summary["runs"]}
    for name in EXAMPLE_NAMES[1:]:
        [call] = calls(tmp_path / name)
        assert call["argv"] == runs[name]["command"][3:]  # the job got exactly the recorded flags
        log = (tmp_path / name / "stdout.log").read_text()
        assert log.startswith("=== ") and log.endswith(f" {shlex.join(runs[name]['command'])}\nfake job {name}\n")
    # Two jobs at a time, one GPU each: the first two take GPUs 0 and 1, the third a freed one.
    first_two = [calls(tmp_path / name)[0]["cuda"] for name in ("k1024_S4", "k4096_none")]
    assert first_two == ["0", "1"] and calls(tmp_path / "k4096_S4")[0]["cuda"] in ("0", "1")

    first_seconds = {run["name"]: run.get("seconds") for run in summary["runs"]}
    assert first_seconds["k1024_none"] is None and all(first_seconds[name] > 0 for name in EXAMPLE_NAMES[1:])

    again = cli(f"--sweep={EXAMPLE}", f"--workdir_root={tmp_path}")
    assert again.returncode == 0, again.stderr
    assert [len(calls(tmp_path / name)) for name in EXAMPLE_NAMES] == [0, 1, 2, 1]  # only the failed one reran
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert [run["status"] for run in summary["runs"]] == ["finished"] * 4
    # Wall times survive the second invocation; the rerun run's time adds both attempts.
    seconds = {run["name"]: run.get("seconds") for run in summary["runs"]}
    assert seconds["k1024_none"] is None
    assert seconds["k1024_S4"] == first_seconds["k1024_S4"] and seconds["k4096_S4"] == first_seconds["k4096_S4"]
    assert seconds["k4096_none"] > first_seconds["k4096_none"]


def test_a_rerun_adds_to_the_time_an_earlier_invocation_recorded(tmp_path):
    # An earlier invocation spent 1,000 s on k1024_none before it failed; this one reruns it first
    # and then three more runs, rewriting sweep.json after each: the 1,000 s must survive all of them.
    (tmp_path / "sweep.json").write_text(json.dumps(dict(runs=[dict(name="k1024_none", status="failed",
                                                                    returncode=3, seconds=1000.0)])))
    result = cli(f"--sweep={EXAMPLE}", f"--workdir_root={tmp_path}")
    assert result.returncode == 0, result.stderr
    seconds = {run["name"]: run["seconds"] for run in json.loads((tmp_path / "sweep.json").read_text())["runs"]}
    assert 1000 < seconds["k1024_none"] < 1100
    assert all(0 < seconds[name] < 100 for name in EXAMPLE_NAMES[1:])


def test_only_runs_the_matching_runs_and_rejects_a_pattern_matching_none(tmp_path):
    result = cli(f"--sweep={EXAMPLE}", f"--workdir_root={tmp_path}", "--only=S4$")
    assert result.returncode == 0, result.stderr
    assert [len(calls(tmp_path / name)) for name in EXAMPLE_NAMES] == [0, 1, 0, 1]
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert [run["status"] for run in summary["runs"]] == ["not started", "finished", "not started", "finished"]

    none = cli(f"--sweep={EXAMPLE}", f"--workdir_root={tmp_path}", "--only=k8192")
    assert none.returncode == 2 and "--only='k8192' matches none of" in none.stderr


def test_sigterm_reaches_the_running_job_and_is_recorded(tmp_path):
    runner = cli(f"--sweep={EXAMPLE}", f"--workdir_root={tmp_path}", "--only=k1024_none",
                 env=dict(FAKE_MODE="wait"), wait=False)
    started = tmp_path / "k1024_none" / "started"
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline and runner.poll() is None:
        time.sleep(0.1)
    assert started.exists(), runner.communicate()
    runner.send_signal(signal.SIGTERM)
    out, err = runner.communicate(timeout=60)
    assert runner.returncode == 130, err
    assert (tmp_path / "k1024_none" / "got_sigterm").exists()
    [run] = [run for run in json.loads((tmp_path / "sweep.json").read_text())["runs"] if run["name"] == "k1024_none"]
    assert (run["status"], run["returncode"]) == ("interrupted", 0)


@pytest.mark.parametrize("body,message", [
    ("RUNS = []", "defines no get_sweep()"),
    ("def get_sweep(): return []", "non-empty list of dicts"),
    ("def get_sweep(): return ['configs/tokenizer.py']", "run 0: expected a dict of flags"),
    ("def get_sweep(): return [{'config.seed': 1}]", "run 0: needs 'config'"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py', 'workdir': '/tmp/x'}]", "unknown key 'workdir'"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py', 'cfg.seed': 1}]", "unknown key 'cfg.seed'"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py', 'config.quantizer.projektor': 'none'}]",
     "config.quantizer.projektor: no such field; config.quantizer has"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py', 'config.seed.x': 1}]",
     "config.seed is not a config block"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py', 'config.quantizer.codebook_size': 'big'}]",
     "config.quantizer.codebook_size = 'big': the field holds int"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py', 'config.seed': True}]",
     "config.seed = True: the field holds int, not bool"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py', 'config.seed': None}]",
     "config.seed = None is not a str, int, float, bool"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py:local,codebok=1'}]", "unknown key 'codebok'"),
    ("def get_sweep(): return [{'config': 'configs/nope.py'}]", "config file configs/nope.py not found"),
    # The task's own config checks (fvq_jax.tasks.resolve) run for every run, dry or not.
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py', 'config.data.image_size': 66}]",
     "config field data.image_size: 66 is not divisible by the encoder's downsampling factor 4"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py', 'config.optim.warmup_steps': 400}]",
     "config field optim.warmup_steps: 400 must be below train.num_steps=360"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py', 'config.seed': s} for s in (1, 2)]\n"
     "def name(params): return 'same'", "run 1: the name 'same' is also run 0's"),
    ("def get_sweep(): return [{'config': 'configs/tokenizer.py'}]\n"
     "def name(params): return 'a/b'", "name 'a/b' is not a usable directory name"),
])
def test_bad_sweep_files_are_rejected_naming_the_problem(tmp_path, monkeypatch, body, message):
    monkeypatch.chdir(ROOT)
    path = write_sweep(tmp_path, body)
    with pytest.raises(sweep.SweepError) as error:
        sweep.load_sweep(path)
    assert str(error.value).startswith(path) and message in str(error.value)


def test_cli_reports_a_bad_sweep_without_running_anything(tmp_path):
    path = write_sweep(tmp_path, "def get_sweep(): return [{'config': 'configs/tokenizer.py', 'seed': 1}]")
    result = cli(f"--sweep={path}", f"--workdir_root={tmp_path / 'runs'}")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {path}: run 0: unknown key 'seed'; a run has 'config' and "
                                     "'config.<field>' keys (--workdir is set per run)")
    assert not (tmp_path / "runs").exists()


def test_dry_run_runs_the_config_checks(tmp_path):
    path = write_sweep(tmp_path, "def get_sweep(): return [{'config': 'configs/tokenizer.py', 'config.seed': 1},"
                                 " {'config': 'configs/tokenizer.py:res=66'}]")
    result = cli(f"--sweep={path}", f"--workdir_root={tmp_path / 'runs'}", "--dry-run")
    assert result.returncode == 2 and not result.stdout
    assert "run 1: config field data.image_size: 66 is not divisible" in result.stderr


@pytest.mark.parametrize("which,count", [("codebook", 3), ("width", 3), ("presets", 22), ("", 26)])
def test_paper_scaling_sweeps_expand_and_pass_the_config_checks(monkeypatch, which, count):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SWEEP", which)
    monkeypatch.setenv("SWEEP_STEPS", "50000")
    runs = sweep.load_sweep("configs/sweeps/paper_scaling.py")  # overrides and task checks for every run
    names = [run.name for run in runs]
    assert len(runs) == count == len(set(names))
    assert all(run.num_steps == 50000 for run in runs)
    if which == "codebook":
        assert names == ["k16384_d256_L4", "k65536_d256_L8", "k262144_d256_L8"]
    if which == "width":
        assert names == ["k16384_d8_L4", "k16384_d32_L4", "k16384_d256_L4"]


@pytest.mark.parametrize("path,expected", [
    ("configs/sweeps/revive.py", {"pull_k16384_s1": ("config.quantizer.restart", "pull"),
                                  "fvq_k4096_s0_textures": ("config.data.source", "folder"),
                                  "revive_k1024_s0_200": ("config.train.num_steps", "200")}),
    ("configs/sweeps/factors.py", {"factor_batch32": ("config", "configs/tokenizer.py:local,res=32,batch=32,steps=200"),
                                   "factor_patch2": ("config.quantizer.projector", "L/2"),
                                   "factor_dim8": ("config.quantizer.code_dim", "8")}),
])
def test_issue14_sweeps_expand_and_pass_the_config_checks(monkeypatch, path, expected):
    """The remedy's and the factors' sweep files: every run passes the checks, under a unique name, with the
    field it changes on its command line."""
    monkeypatch.chdir(ROOT)
    runs = sweep.load_sweep(path)
    by_name = {run.name: run for run in runs}
    assert len(by_name) == len(runs)
    for name, (flag, value) in expected.items():
        assert by_name[name].args[flag] == value, (name, flag)

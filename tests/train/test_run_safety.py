"""Runs that cannot be silently corrupted: resume checks the config, the guard checks the update,
restore_step, broken checkpoints, metrics.jsonl across resumes, early config errors, the preemption
exit status. (The workdir lock: tests/train/test_lock.py.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fvq_jax import checkpointing, config_lib
from fvq_jax.models.load import load_tokenizer
from fvq_jax.train import loop, resume, tokenizer
from fvq_jax.train.restore import restore_tokenizer
from tests.conftest import ROOT, subprocess_env
from tests.train.tiny import tiny_config, train

STEPS = 4


def config(**train):
    return tiny_config(**dict(dict(num_steps=STEPS, checkpoint_every=2, log_every=1), **train))


LOGGED = ("loss", "pixel_loss", "perceptual_loss", "quantizer_loss", "disc_loss", "usage", "grad_norm", "lr")


def metrics(workdir, name="metrics.jsonl"):
    path = os.path.join(workdir, name)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def losses(records):
    """The logged values that must replay exactly (not the timings)."""
    return [(r["step"], *(r[k] for k in LOGGED)) for r in records]


def params(workdir):
    return jax.tree.map(np.asarray, restore_tokenizer(workdir).state.params)


def steps(workdir):
    return checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).all_steps()


def aside(workdir):
    path = os.path.join(workdir, "checkpoints.aside")
    return sorted(os.listdir(path)) if os.path.exists(path) else []


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """4 steps of the tiny config, checkpoints at 2 and 4, every step logged."""
    workdir = str(tmp_path_factory.mktemp("base"))
    train(config(), workdir)
    return workdir


@pytest.fixture
def copy_of(base_run, tmp_path):
    def copy():
        target = str(tmp_path / "run")
        shutil.copytree(base_run, target)
        return target
    return copy


def test_resume_refuses_a_changed_config_and_names_every_field(copy_of):
    workdir = copy_of()
    changed = config()
    changed.seed = 1
    changed.data.image_size = 32
    changed.train.global_batch = 8
    changed.optim.base_lr = 2e-3
    changed.optim.schedule = "cos"
    changed.train.log_every = 2  # cadence: allowed
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    with pytest.raises(resume.ConfigChanged) as info:
        train(changed, workdir)
    message = str(info.value)
    for line in ("seed: 0 -> 1", "data.image_size: 16 -> 32", "train.global_batch: 4 -> 8",
                 "optim.base_lr: 0.001 -> 0.002", "optim.schedule: 'lin' -> 'cos'"):
        assert line in message, message
    assert "log_every" not in message and "saved with step 4" in message
    assert "--config.train.allow_changes=data.image_size,optim.base_lr,optim.schedule,seed,train.global_batch" in message
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before and steps(workdir) == [2, 4]


def test_an_allowed_change_extends_the_run(copy_of, base_run):
    workdir = copy_of()
    longer = config(num_steps=STEPS + 2)
    with pytest.raises(resume.ConfigChanged, match="train.num_steps: 4 -> 6"):
        train(longer, workdir)
    longer.train.allow_changes = "train.num_steps"
    train(longer, workdir)
    logged = metrics(workdir)
    assert [r["step"] for r in logged] == list(range(1, STEPS + 3)) and steps(workdir) == [2, 4, 6]
    assert losses(logged[:STEPS]) == losses(metrics(base_run))


def test_a_changed_model_cannot_resume(copy_of):
    """An allowed change that gives the tokenizer other arrays (a width) is refused naming them, not read as
    unreadable checkpoints; nothing is set aside."""
    workdir = copy_of()
    wider = config(allow_changes="model.ch")
    wider.model.ch = 8
    with pytest.raises(resume.ConfigChanged) as info:
        train(wider, workdir)
    message = str(info.value)
    assert "the checkpoint of step 4 holds other arrays than the state this config builds" in message
    assert message.splitlines()[1].startswith("  params.") and "unreadable" not in message
    assert message.endswith("(model.ch) change the model, and a changed model cannot resume: train it in a new "
                            "--workdir instead"), message
    assert steps(workdir) == [2, 4] and aside(workdir) == []


def test_guard_rejects_an_overflowing_update_before_it_is_saved(copy_of):
    """A learning rate of 1e30 gives finite losses but parameters near 1e27: the step is refused, the run
    stops naming it, the last checkpoint stays good, and restore_step resumes from an earlier one."""
    workdir = copy_of()
    bad = config(num_steps=STEPS + 2, allow_changes="train.num_steps,optim.base_lr")
    bad.optim.base_lr = 1e30
    with pytest.raises(loop.NonFiniteStep, match=r"step 5: the update left non-finite parameters \(.*param_norm=inf.*\); not saved \(last checkpoint: 4\)"):
        train(bad, workdir)
    assert steps(workdir) == [2, 4]
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(params(workdir))) < 1e3
    assert [r["step"] for r in metrics(workdir)] == list(range(1, STEPS + 1))  # step 5 never logged


def test_restore_step_goes_back_and_sets_later_steps_aside(copy_of, base_run):
    workdir = copy_of()
    earlier = config(restore_step=2)
    train(earlier, workdir)
    assert steps(workdir) == [2, 4] and len(aside(workdir)) == 1 and aside(workdir)[0].startswith("4-after-restore-step-2")
    # The replayed steps 3 and 4 equal the first run's; the abandoned lines are kept aside, not duplicated.
    assert losses(metrics(workdir)) == losses(metrics(base_run))
    assert [r["step"] for r in metrics(workdir, "metrics.rolled_back.jsonl")] == [3, 4]
    jax.tree.map(np.testing.assert_array_equal, params(workdir), params(base_run))
    with pytest.raises(config_lib.ConfigError, match=r"train.restore_step: no checkpoint of step 3 .*\[2, 4\]"):
        train(config(restore_step=3), workdir)


def _break(step_dir, how):
    if how == "empty":
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)
    elif how == "partial":
        shutil.rmtree(os.path.join(step_dir, "state"))
    else:  # a truncated array file
        for root, _, files in os.walk(os.path.join(step_dir, "state")):
            for name in files:
                if os.sep + "d" in root:
                    with open(os.path.join(root, name), "r+b") as f:
                        f.truncate(8)


@pytest.mark.parametrize("how", ["empty", "partial", "truncated"])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous(copy_of, base_run, how, caplog):
    workdir = copy_of()
    _break(os.path.join(workdir, "checkpoints", "4"), how)
    loaded = load_tokenizer(workdir)  # evaluation and export: the previous step, with a warning
    assert loaded.step == 2
    assert any("checkpoint of step 4" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    train(config(), workdir)  # resume: from step 2, the broken step set aside
    assert steps(workdir) == [2, 4] and aside(workdir)[0].startswith("4-unreadable")
    jax.tree.map(np.testing.assert_array_equal, params(workdir), params(base_run))


def test_structural_errors_come_before_anything_is_built(tmp_path):
    bad_res = config()
    bad_res.data.image_size = 18  # the tiny encoder downsamples by 4
    with pytest.raises(config_lib.ConfigError, match="data.image_size: 18 is not divisible by the encoder's "
                                                     "downsampling factor 4"):
        train(bad_res, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    with pytest.raises(config_lib.ConfigError, match=r"train.global_batch: 4 does not split over the 8 "
                                                     r"data-parallel devices"):
        tokenizer.resolve(config(), num_devices=8, num_processes=1)
    tokenizer.resolve(config(global_batch=8), num_devices=8, num_processes=2)
    with pytest.raises(config_lib.ConfigError, match=r"eval.batch_size: 8 does not split over the 16 data-parallel"):
        tokenizer.resolve(config(global_batch=16), num_devices=16, num_processes=2)


@pytest.mark.parametrize("arg,message", [
    ("model=VQ-99", "config field model.preset: 'VQ-99' is not one of"),
    ("step=2", "config field arg: unknown key 'step'"),
])
def test_errors_in_the_config_argument_reach_the_user(tmp_path, arg, message):
    result = subprocess.run([sys.executable, "-m", "fvq_jax.main", f"--config=configs/tokenizer.py:{arg}",
                             f"--workdir={tmp_path}"], cwd=ROOT, env=subprocess_env(1), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    assert "ConfigError.__init__() missing" not in result.stderr


def test_a_preempted_run_exits_with_its_own_status(tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text("from tests.train.tiny import tiny_config\n"
                           "def get_config():\n    return tiny_config(num_steps=200, checkpoint_every=100)\n")
    workdir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "fvq_jax.main", f"--config={config_file}",
                                f"--workdir={workdir}"], cwd=ROOT, env=subprocess_env(1), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not any(r["step"] >= 2 for r in metrics(workdir)):
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == loop.PREEMPTED_EXIT_CODE == 75, output[-3000:]
    saved = steps(workdir)
    assert len(saved) == 1 and 2 <= saved[0] < 200 and not (workdir / "LOCK").exists()


def test_fields_added_since_a_checkpoint_are_no_change_at_their_reproducing_values():
    config = config_lib.load_file(os.path.join(ROOT, "configs", "tokenizer.py")).get_config("tiny")
    saved = resume.config_json(config)
    for field in ("revive", "revive_every", "revive_noise", "bridge_chunks"):
        del saved["quantizer"][field]  # a run saved before these fields existed
    resume.check_resume_config(saved, config, step=4)  # today's defaults reproduce it: no change
    config.quantizer.revive = "copy"
    with pytest.raises(resume.ConfigChanged, match=r"quantizer.revive: 'off' -> 'copy'"):
        resume.check_resume_config(saved, config, step=4)

"""quantizer.revive and quantizer.restart: revive off leaves the train step's program as it was; with both on
(the remedy of configs/sweeps/results/revive.md), a killed run resumes exactly."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np

from fvq_jax import checkpointing, sharding
from fvq_jax.train import tokenizer
from tests.conftest import ROOT, subprocess_env
from tests.train.test_tokenizer_train import _wait_for_path, _wait_for_step, host_params, read_metrics
from tests.train.tiny import tiny_config, train

STEPS, EVERY = 12, 4  # checkpoint interval
# A 64-index window fills in one step (4 images x 16 tokens), so revives start at the first revive step.
REVIVE = dict(revive="copy", revive_every=3, revive_noise=0.01, usage_window=64)
RESTART = dict(REVIVE, restart="pull", restart_weight=1.0)


def revive_config(revive=REVIVE):
    config = tiny_config(num_steps=STEPS, checkpoint_every=EVERY)
    config.quantizer.update(revive)
    return config


def _step_program(config):
    spec = tokenizer.resolve(config)
    trainer = tokenizer.build_trainer(spec, sharding.make_mesh(spec.mesh))
    state = trainer.layout.abstract
    batch = {"image": jax.ShapeDtypeStruct((spec.train.global_batch, 16, 16, 3), np.uint8)}
    return trainer, trainer.train_step.lower(state, trainer.lpips_state, batch).as_text()


def test_revive_lives_outside_the_train_step():
    """The step program is the same with the revive on or off (off builds no revive program at all)."""
    off, off_program = _step_program(revive_config(dict(revive="off", usage_window=64)))
    on, on_program = _step_program(revive_config())
    assert off.revive is None and on.revive is not None
    assert off_program == on_program


def test_killed_run_with_revive_and_restart_resumes_exactly(tmp_path):
    reference_dir, workdir = str(tmp_path / "reference"), str(tmp_path / "killed")
    train(revive_config(RESTART), reference_dir)
    reference = read_metrics(reference_dir)
    # The positions the revive acts on show in the log: some were dead and came to life.
    live = [reference[s][0]["bridge_live_positions"] for s in range(1, STEPS + 1)]
    assert min(live) < 4 and max(live) == 4, live

    code = (f"from tests.train.test_tokenizer_revive import RESTART, revive_config; "
            f"from tests.train.tiny import train; train(revive_config(RESTART), {workdir!r})")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(1),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(process, workdir, EVERY + 2)
    _wait_for_path(process, os.path.join(workdir, "checkpoints", str(EVERY)))
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=120)
    assert max(checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).all_steps()) < STEPS
    train(revive_config(RESTART), workdir)

    metrics = read_metrics(workdir)
    for step in range(1, STEPS + 1):
        for record in metrics[step]:
            for k in ("loss", "quantizer_loss", "usage", "grad_norm", "bridge_live_positions", "pull_loss",
                      "pulled_codes"):
                assert record[k] == reference[step][0][k], (step, k)
    saved, reference_saved = host_params(workdir), host_params(reference_dir)
    jax.tree.map(np.testing.assert_array_equal, saved, reference_saved)
    # The pull acted: dead codes were pulled in most steps, and fewer were dead at the end.
    pulled = [reference[s][0]["pulled_codes"] for s in range(1, STEPS + 1)]
    assert max(pulled) > 0 and pulled[-1] < max(pulled), pulled

"""End-to-end tokenizer training on the built-in photos: learning, exact resume, preemption, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from fvq_jax import checkpointing, sharding
from fvq_jax.evaluation import tokenizer_eval
from fvq_jax.train import loop, tokenizer
from fvq_jax.train.restore import restore_tokenizer
from tests.conftest import ROOT, subprocess_env
from tests.train.tiny import tiny_config, train

STEPS = 20
EVERY = 5  # checkpoint interval


def read_metrics(workdir):
    """step -> the logged record (a resumed run re-logs steps after its checkpoint: keep all)."""
    records = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            records.setdefault(r["step"], []).append(r)
    return records


def host_params(workdir):
    state = restore_tokenizer(workdir).state
    return jax.tree.map(np.asarray, (state.params, state.disc_params, state.model_state, state.opt_state))


def assert_same_run(metrics, reference):
    keys = ("loss", "pixel_loss", "perceptual_loss", "quantizer_loss", "disc_loss", "usage", "grad_norm")
    for step in range(1, STEPS + 1):
        for record in metrics[step]:  # steps logged twice must agree with each other too
            for k in keys:
                assert record[k] == reference[step][0][k], (step, k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    results = train(tiny_config(num_steps=STEPS, checkpoint_every=EVERY), workdir)
    return workdir, results


def test_loss_falls_and_usage_is_reported(uninterrupted):
    workdir, results = uninterrupted
    metrics = read_metrics(workdir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    # The same held-out images before training: the trained tokenizer reconstructs them better.
    spec = tokenizer.resolve(tiny_config(num_steps=STEPS))
    trainer = tokenizer.build_trainer(spec, sharding.make_mesh(spec.mesh))
    evaluator = tokenizer_eval.TokenizerEvaluator(
        spec.eval, spec.data, trainer.graphs.generator, sharding.make_mesh(spec.mesh),
        num_codes=spec.tokenizer.quantizer.codebook_size, projector=spec.tokenizer.quantizer.projector,
        lpips_graph=trainer.lpips_graph, lpips_state=trainer.lpips_state)
    untrained_state = trainer.init()
    untrained = evaluator.evaluate(untrained_state.params, untrained_state.model_state)
    assert results["mse"] < 0.7 * untrained["mse"] and results["lpips"] < untrained["lpips"]
    assert results["psnr"] > untrained["psnr"] + 1.5
    usage = [metrics[s][0]["usage"] for s in range(1, STEPS + 1)]
    assert 0 < usage[0] < usage[-1] <= 1
    assert metrics[STEPS][0]["images_per_sec"] > 0 and metrics[STEPS][0]["data_skipped"] == 0
    assert 5 < results["psnr"] < 60 and 0 < results["usage"] <= 1
    assert results["used_codes"] + results["dead_codes"] == 64
    grid = Image.open(os.path.join(workdir, "eval", "final", "reconstructions.png"))
    assert grid.size[1] == 2 * 16 + 3 * 2  # inputs over reconstructions, 16-pixel images
    saved = json.load(open(os.path.join(workdir, "eval", "final", "metrics.json")))
    assert saved["psnr"] == pytest.approx(results["psnr"]) and saved["protocol"]["step"] == STEPS
    config = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).restore_config()
    assert config["run"]["global_batch"] == 4 and config["quantizer"]["codebook_size"] == 64


def _start_training(workdir):
    code = (f"from tests.train.tiny import tiny_config, train; "
            f"train(tiny_config(num_steps={STEPS}, checkpoint_every={EVERY}), {workdir!r})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(process, workdir, step, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early:\n{process.stdout.read()[-3000:]}")
        if os.path.exists(path) and any(json.loads(line)["step"] >= step for line in open(path)):
            return
        time.sleep(0.05)
    process.kill()
    raise AssertionError("training did not reach the step in time")


def _wait_for_path(process, path, timeout=120):
    """Asynchronous saves land a step or more after they start: wait for the finalised directory."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "preempted"])
def test_interrupted_run_resumes_exactly(uninterrupted, tmp_path, sig):
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path)
    process = _start_training(workdir)
    _wait_for_step(process, workdir, EVERY + 2)
    _wait_for_path(process, os.path.join(workdir, "checkpoints", str(EVERY)))  # the first checkpoint, finalised
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    steps = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).all_steps()
    if sig == signal.SIGTERM:
        assert process.returncode == 0, output[-3000:]
        # Preemption saved the step it stopped at, off the every-10-steps schedule.
        stopped = max(read_metrics(workdir))
        assert max(steps) == stopped and EVERY + 2 <= stopped < STEPS
    else:
        assert process.returncode == -signal.SIGKILL
        assert max(steps) < STEPS
    train(tiny_config(num_steps=STEPS, checkpoint_every=EVERY), workdir)
    assert_same_run(read_metrics(workdir), read_metrics(reference_dir))
    resumed, reference = host_params(workdir), host_params(reference_dir)
    jax.tree.map(np.testing.assert_array_equal, resumed, reference)


def test_an_overflowing_first_update_stops_the_run_before_anything_is_saved(tmp_path):
    config = tiny_config(num_steps=6, checkpoint_every=1)
    config.optim.base_lr = 1e30  # the first update would send the weights to ~1e27 with a finite loss
    with pytest.raises(loop.NonFiniteStep, match=r"step 1: the update left non-finite parameters \(.*param_norm=inf") as info:
        train(config, str(tmp_path))
    assert "not saved (last checkpoint: None)" in str(info.value)
    assert not os.listdir(tmp_path / "checkpoints") and not (tmp_path / "LOCK").exists()

"""Sharded training on 8 simulated CPU devices, portable checkpoints, and a 2-process run on localhost."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests.conftest import ROOT, run_python, subprocess_env

SHARDED_VS_SINGLE = """
import json, sys, jax, numpy as np
from fvq_jax import checkpointing, sharding
from fvq_jax.data import pipeline
from fvq_jax.train.tokenizer import build_trainer, resolve
from tests.train.tiny import tiny_config

config = tiny_config(num_steps=6, global_batch=8)
config.loss.disc_start = 0
config.mesh.fsdp_min_size = 512
runs, trainers = {}, {}
for name, (data, fsdp), devices in [("single", (1, 1), jax.devices()[:1]), ("sharded", (2, 4), jax.devices())]:
    config.mesh.update(data=data, fsdp=fsdp)
    spec = resolve(config, len(devices), 1)
    trainer = trainers[name] = build_trainer(spec, sharding.make_mesh(spec.mesh, devices=devices))
    state = trainer.init()
    iterator = pipeline.train_iterator(spec.data, global_batch=8, seed=0)
    losses = []
    for _ in range(3):
        batch = pipeline.to_global_batch(next(iterator), trainer.batch_sharding)
        state, metrics = trainer.train_step(state, trainer.lpips_state, batch)
        losses.append([float(metrics[k]) for k in ("loss", "pixel_loss", "perceptual_loss", "disc_loss")])
    checkpointer = checkpointing.Checkpointer(f"{sys.argv[1]}/{name}", async_save=False)
    checkpointer.save(3, state)
    runs[name] = {"losses": losses, "state": jax.tree.map(np.asarray, state)}


def kernel_layout(state):
    kernel = state.params["decoder"]["conv_in"]["kernel"][...]
    specs = [list(x.sharding.spec) for x in jax.tree.leaves(state.params)]
    return {"spec": list(kernel.sharding.spec), "shard": list(kernel.addressable_shards[0].data.shape),
            "full": list(kernel.shape), "num_sharded": sum("fsdp" in s for s in specs), "num_params": len(specs)}


# Each checkpoint restored onto the other layout: 8 devices (FSDP) -> 1 device, and 1 -> 8.
moved = {}
for saved, target in (("sharded", "single"), ("single", "sharded")):
    restored = checkpointing.Checkpointer(f"{sys.argv[1]}/{saved}", read_only=True).restore(
        3, trainers[target].layout.abstract)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), restored, runs[saved]["state"])
    moved[f"{saved}->{target}"] = {"identical": all(jax.tree.leaves(same)), **kernel_layout(restored)}
single, sharded = runs["single"], runs["sharded"]
params = [(np.asarray(a), b) for a, b in zip(jax.tree.leaves(single["state"].params),
                                              jax.tree.leaves(sharded["state"].params))]
print(json.dumps({
    "loss_rel": float(np.max(np.abs(np.array(single["losses"]) - np.array(sharded["losses"]))
                             / np.abs(np.array(single["losses"])))),
    "param_abs": max(float(np.max(np.abs(a - b))) for a, b in params),
    "moved": moved}))
"""


def test_sharded_step_matches_single_device_and_checkpoints_move(tmp_path):
    """Data 2 x fsdp 4 versus one device (same batches, same init; differences are reduction order
    only), and each run's checkpoint restored onto the other layout."""
    got = json.loads(run_python(SHARDED_VS_SINGLE.replace("sys.argv[1]", repr(str(tmp_path))),
                                num_devices=8).strip().splitlines()[-1])
    assert got["loss_rel"] < 1e-4, got
    # Three Adam steps at lr 1e-3 amplify float32 reduction-order noise in the gradients by at most
    # a few lr-sized updates of the few coordinates whose gradients are ~0.
    assert got["param_abs"] < 1e-3, got
    to_one, to_eight = got["moved"]["sharded->single"], got["moved"]["single->sharded"]
    assert to_one["identical"] and to_eight["identical"]
    assert to_one["spec"] == [] and to_one["num_sharded"] == 0
    assert to_eight["spec"] == [None, None, None, "fsdp"]  # [3, 3, 16, 32] split on its outputs
    assert to_eight["shard"] == to_eight["full"][:3] + [to_eight["full"][3] // 4]
    assert 0 < to_eight["num_sharded"] < to_eight["num_params"]  # big kernels split, biases replicated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_two_processes_match_one(tmp_path):
    """`python -m fvq_jax.main` as 2 processes (1 CPU device each) over jax.distributed on localhost."""
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text("from tests.train.tiny import tiny_config\n\n\ndef get_config():\n"
                           "    config = tiny_config(num_steps=3, global_batch=8)\n"
                           "    config.loss.disc_start = 0\n"
                           "    config.eval.metrics = ('psnr', 'usage')\n"
                           "    return config\n")
    port = _free_port()

    def main(workdir, *extra, devices=1):
        return subprocess.Popen([sys.executable, "-m", "fvq_jax.main", f"--config={config_file}",
                                 f"--workdir={workdir}", *extra], cwd=ROOT, env=subprocess_env(devices),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    processes = [main(multi_dir, f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}")
                 for i in range(2)]
    single = main(single_dir, devices=2)
    for p in processes + [single]:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output[-5000:]
    multi, reference = _losses(multi_dir), _losses(single_dir)
    assert sorted(multi) == [1, 2, 3]
    for step in multi:
        for k in ("loss", "pixel_loss", "perceptual_loss", "disc_loss", "usage"):
            np.testing.assert_allclose(multi[step][k], reference[step][k], rtol=1e-5, err_msg=f"{k} at step {step}")
    final = json.load(open(os.path.join(multi_dir, "eval", "final", "metrics.json")))
    expected = json.load(open(os.path.join(single_dir, "eval", "final", "metrics.json")))
    np.testing.assert_allclose(final["psnr"], expected["psnr"], rtol=1e-5)
    assert final["num_images"] == expected["num_images"]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """JAX's preemption service (jax.distributed) picks one sync step: both processes save it and exit 75."""
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text("from tests.train.tiny import tiny_config\n\n\ndef get_config():\n"
                           "    return tiny_config(num_steps=300, global_batch=8, checkpoint_every=1000)\n")
    port, workdir = _free_port(), tmp_path / "run"
    processes = [subprocess.Popen([sys.executable, "-m", "fvq_jax.main", f"--config={config_file}",
                                   f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
                                   "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=subprocess_env(1),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    deadline = time.time() + 600
    while not (os.path.exists(workdir / "metrics.jsonl") and _losses(workdir) and max(_losses(workdir)) >= 2):
        assert all(p.poll() is None for p in processes) and time.time() < deadline, \
            [p.stdout.read()[-3000:] for p in processes if p.poll() is not None]
        time.sleep(0.1)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [75, 75], [o[-3000:] for o in outputs]
    saved = [int(s) for s in os.listdir(workdir / "checkpoints")]
    assert len(saved) == 1 and 2 <= saved[0] < 300 and max(_losses(workdir)) == saved[0]
    assert not (workdir / "LOCK").exists()

"""GPT training on codes (synthetic class patterns): learning, sample grids, exact resume after a kill,
the sharded step against one device, the sampling job on 1 vs 8 devices and at two batch sizes; the config
resolved against the codes before it is checked, the step count from epochs, corrupt codes refused before the
workdir exists, a changed model refused on resume, sample grids over every class up to the cap."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from fvq_jax import config_lib, tasks
from fvq_jax.data import codes as codes_data
from fvq_jax.models.load import load_gpt
from fvq_jax.sampling.sampler import SamplingConfig, sample_keys, sample_tokens
from fvq_jax.train import gpt, resume
from tests.codes_dirs import write_codes_dir
from tests.conftest import ROOT, run_python, subprocess_env
from tests.train.gpt_codes import CLASSES, GRID, K, gpt_config, pattern, train_gpt, write_synthetic_codes

STEPS = 40
KEYS = ("loss", "accuracy", "grad_norm", "param_norm", "lr")


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def codes_dir(tiny_run, tmp_path_factory):
    """Synthetic codes whose manifest names the tiny tokenizer run (K = 64, 4 x 4 tokens) as their tokenizer."""
    tokenizer = dict(path=tiny_run[0], step=2, weights="ema")
    return write_synthetic_codes(tmp_path_factory.mktemp("codes"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def trained(codes_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gpt"))
    result = train_gpt(gpt_config(codes_dir, num_steps=STEPS, sample_every=20), workdir)
    return workdir, result


def test_gpt_learns_the_class_patterns(trained):
    workdir, result = trained
    logged = read_metrics(workdir)
    assert result == {"step": STEPS} and [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert logged[0]["loss"] == pytest.approx(np.log(K), rel=0.02)  # zero-initialised output layer: uniform
    assert logged[-1]["loss"] < 0.5 * np.log(K) and logged[-1]["accuracy"] > 0.6
    assert logged[-1]["tokens_per_sec"] == pytest.approx(logged[-1]["steps_per_sec"] * 8 * GRID * GRID)
    loaded = load_gpt(workdir)
    assert (loaded.step, loaded.weights) == (STEPS, "raw")
    assert loaded.config.model.to_dict()["vocab_size"] == K and loaded.config.model.grid == GRID
    labels = jnp.repeat(jnp.arange(CLASSES), 2)
    codes = np.asarray(sample_tokens(loaded.model, labels, sample_keys(0, 0, 6), SamplingConfig(top_k=1)))
    match = np.mean([codes[i] == pattern(int(labels[i])).ravel() for i in range(6)])
    assert match > 0.8, codes  # greedy samples follow their class's pattern
    # The periodic sample grid: 3 classes (rows) x 4 samples (sample.per_class) of 16 x 16 pixels, 2-pixel borders.
    grid = Image.open(os.path.join(workdir, "samples", "step_20.png"))
    assert grid.size == (4 * 16 + 5 * 2, CLASSES * 16 + (CLASSES + 1) * 2)


def _start(config_file, workdir):
    return subprocess.Popen([sys.executable, "-m", "fvq_jax.main", f"--config={config_file}", f"--workdir={workdir}"],
                            cwd=ROOT, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_gpt_run_resumes_with_the_same_losses(trained, codes_dir, tmp_path):
    reference, _ = trained
    config_file = tmp_path / "gpt_config.py"
    config_file.write_text(f"from tests.train.gpt_codes import gpt_config\n\ndef get_config():\n"
                           f"    return gpt_config({codes_dir!r}, num_steps={STEPS}, sample_every=20)\n")
    workdir = tmp_path / "run"
    process = _start(config_file, workdir)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "20" / "commit_success.txt").exists() or \
            not any(r["step"] >= 22 for r in read_metrics(workdir)):
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = _start(config_file, workdir)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    ours, theirs = read_metrics(workdir), read_metrics(reference)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))  # replayed steps were rolled back, not doubled
    assert [[r[k] for k in KEYS] for r in ours] == [[r[k] for k in KEYS] for r in theirs]
    ours_params, theirs_params = (jax.tree.map(np.asarray, nnx.state(load_gpt(d).model)) for d in (workdir, reference))
    jax.tree.map(np.testing.assert_array_equal, ours_params, theirs_params)


SHARDED_VS_SINGLE = """
import json, sys, jax, numpy as np
from fvq_jax import checkpointing, sharding
from fvq_jax.data import codes as codes_data, pipeline
from fvq_jax.train import gpt
from tests.train.gpt_codes import gpt_config

root, codes_dir = sys.argv[1], sys.argv[2]
dataset = codes_data.open_codes(codes_dir)
config = gpt_config(codes_dir, num_steps=10)
config.mesh.fsdp_min_size = 1
runs, trainers = {}, {}
for name, (data, fsdp, tensor), devices in [("single", (1, 1, 1), jax.devices()[:1]),
                                            ("sharded", (2, 2, 2), jax.devices())]:
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    spec = gpt.resolve(config, len(devices), 1)
    mesh = sharding.make_mesh(spec.mesh, devices=devices)
    with jax.set_mesh(mesh):
        trainer = trainers[name] = gpt.build_trainer(spec, mesh)
        state = trainer.layout.init()
        iterator = codes_data.train_iterator(dataset, global_batch=8, seed=0)
        losses = []
        for _ in range(3):
            state, metrics = trainer.train_step(state, pipeline.to_global_batch(next(iterator), trainer.batch_sharding))
            losses.append([float(metrics[k]) for k in ("loss", "accuracy", "grad_norm")])
        checkpointing.Checkpointer(f"{root}/{name}", async_save=False).save(3, state)
        wqkv = state.params["layers"][0]["attention"]["wqkv"]["kernel"][...]
        runs[name] = {"losses": losses, "params": jax.tree.map(np.asarray, state.params),
                      "wqkv_spec": [str(a) for a in wqkv.sharding.spec],
                      "wqkv_shard": list(wqkv.addressable_shards[0].data.shape)}
moved = {}
for saved, target in (("sharded", "single"), ("single", "sharded")):
    restored = checkpointing.Checkpointer(f"{root}/{saved}", read_only=True).restore(3, trainers[target].layout.abstract)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), restored.params, runs[saved]["params"])
    moved[f"{saved}->{target}"] = all(jax.tree.leaves(same))
single, sharded = runs["single"], runs["sharded"]
print(json.dumps({
    "loss_rel": float(np.max(np.abs(np.array(single["losses"]) - np.array(sharded["losses"]))
                             / np.abs(np.array(single["losses"])))),
    "param_abs": max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(single["params"]),
                                                                  jax.tree.leaves(sharded["params"]))),
    "wqkv_spec": sharded["wqkv_spec"], "wqkv_shard": sharded["wqkv_shard"], "moved": moved}))
"""


def test_sharded_gpt_step_equals_one_device_and_checkpoints_move(codes_dir, tmp_path):
    """data 2 x fsdp 2 x tensor 2 against one device: same batches and init; float reassociation only."""
    code = SHARDED_VS_SINGLE.replace("sys.argv[1], sys.argv[2]", f"{str(tmp_path)!r}, {codes_dir!r}")
    got = json.loads(run_python(code, num_devices=8).strip().splitlines()[-1])
    # Adam divides by the gradients' running RMS, so reassociation noise in near-zero gradient coordinates
    # moves those parameters by up to a few lr-sized (3e-3) steps' worth of float32 noise.
    assert got["loss_rel"] < 1e-5 and got["param_abs"] < 1e-4, got
    assert got["wqkv_spec"] == ["fsdp", "None", "tensor", "None"] and got["wqkv_shard"] == [32, 3, 2, 16]
    assert got["moved"] == {"sharded->single": True, "single->sharded": True}


SAMPLE = """
import json, sys, jax, numpy as np
from fvq_jax import config_lib
from fvq_jax.sampling import job

config = config_lib.load_file("configs/sample.py").get_config("n=12,batch={batch},cfg=2.0,seed=3,name={name}")
out = job.sample_run(job.resolve(config, jax.device_count(), jax.process_count()), sys.argv[1])
print(json.dumps(str(out)))
"""


def _samples(out):
    files = sorted(f for f in os.listdir(out) if f.endswith(".npz"))
    arrays = [np.load(os.path.join(out, f)) for f in files]
    order = np.argsort(np.concatenate([a["indices"] for a in arrays]))
    return {k: np.concatenate([a[k] for a in arrays])[order] for k in ("indices", "arr_1", "codes", "arr_0")}


def test_samples_do_not_depend_on_devices_or_batch_size(trained):
    workdir, _ = trained
    runs = {}
    for name, batch, devices in (("one4", 4, 1), ("one6", 6, 1), ("eight8", 8, 8)):
        code = SAMPLE.replace("{batch}", str(batch)).replace("{name}", name).replace("sys.argv[1]", repr(workdir))
        runs[name] = _samples(json.loads(run_python(code, num_devices=devices).strip().splitlines()[-1]))
    reference = runs["one4"]
    np.testing.assert_array_equal(reference["indices"], np.arange(12))
    np.testing.assert_array_equal(reference["arr_1"], np.repeat(np.arange(CLASSES), 4))  # class-balanced
    assert reference["arr_0"].shape == (12, 16, 16, 3) and reference["arr_0"].dtype == np.uint8
    for name in ("one6", "eight8"):
        np.testing.assert_array_equal(runs[name]["codes"], reference["codes"], err_msg=name)
        np.testing.assert_array_equal(runs[name]["arr_1"], reference["arr_1"])
        assert np.abs(runs[name]["arr_0"].astype(int) - reference["arr_0"]).max() <= 1, name
    record = json.load(open(os.path.join(workdir, "samples", "one4", "sampling.json")))
    assert record["gpt"]["step"] == STEPS and record["tokenizer"]["step"] == 2 and record["num_samples"] == 12
    grid = Image.open(os.path.join(workdir, "samples", "one4", "grid.png"))
    assert grid.size == (4 * 16 + 5 * 2, CLASSES * 16 + (CLASSES + 1) * 2)


def test_gpt_config_errors_name_the_field(codes_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json in .*extract_codes"):
        train_gpt(gpt_config(tmp_path / "none"), str(tmp_path / "a"))
    small = gpt_config(codes_dir)
    small.model.num_classes = 2
    with pytest.raises(config_lib.ConfigError, match=r"model.num_classes: 2 does not fit the codes .*num_classes 3"):
        train_gpt(small, str(tmp_path / "b"))
    bare = write_synthetic_codes(tmp_path / "bare")  # no tokenizer recorded: nothing to decode sample grids with
    with pytest.raises(config_lib.ConfigError, match="train.sample_every: the codes in .* name no tokenizer"):
        train_gpt(gpt_config(bare, sample_every=10), str(tmp_path / "c"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_run_starts_from_another_runs_weights(trained, codes_dir, tmp_path):
    workdir, _ = trained
    train_gpt(gpt_config(codes_dir, num_steps=3, init_from=workdir), str(tmp_path / "tuned"))
    assert read_metrics(tmp_path / "tuned")[0]["loss"] == pytest.approx(read_metrics(workdir)[-1]["loss"], rel=0.3)
    other = gpt_config(codes_dir, num_steps=3, init_from=workdir)
    other.model.preset = "GPT-S"
    with pytest.raises(config_lib.ConfigError, match=r"train.init_from: .* differ from this run's in \d+ arrays"):
        train_gpt(other, str(tmp_path / "other"))


def test_the_codes_fill_in_the_model_before_it_is_checked(codes_dir):
    """--config.model.vocab_size=64 alone (the right value): resolved against the codes, then checked whole."""
    config = gpt_config(codes_dir)
    config.model.vocab_size = K
    spec = tasks.resolve(config, num_devices=1, num_processes=1)  # what main.py runs first: nothing to refuse
    assert (spec.model.vocab_size, spec.model.num_classes, spec.model.grid) == (K, CLASSES, GRID)
    saved = spec.config.model  # what checkpoints save and resumes compare: the filled-in config
    assert (saved.vocab_size, saved.num_classes, saved.grid) == (K, CLASSES, GRID)
    assert spec.codes.tokenizer == spec.config.codes.tokenizer.to_dict() and spec.codes.tokenizer["step"] == 2
    assert len(gpt.prepare(spec)) == 48
    config.model.vocab_size = 2 * K
    with pytest.raises(config_lib.ConfigError, match=rf"model.vocab_size: {2 * K} does not fit the codes .*vocab_size {K}"):
        gpt.resolve(config)
    config.model.vocab_size = K
    config.model.n_head = 3
    with pytest.raises(config_lib.ConfigError, match="model.n_head: GPT dim 64 is not divisible by n_head 3"):
        gpt.resolve(config)


def test_the_step_count_follows_epochs_over_the_codes(codes_dir):
    """train.num_steps 0: max(min_steps, ceil(epochs x images / batch)); the photos' default stays 300 steps."""
    config = gpt_config(codes_dir, num_steps=0, num_epochs=2.5, min_steps=0)
    spec = gpt.resolve(config)
    assert spec.train.num_steps == spec.config.train.num_steps == int(np.ceil(2.5 * 48 / 8)) == 15
    config.train.min_steps = 20
    assert gpt.resolve(config).train.num_steps == 20
    default = config_lib.load_file(ROOT / "configs" / "gpt.py").get_config("")
    assert default.train.num_steps == 0 and default.train.global_batch == 16
    default_train = gpt.GPTTrainSpec.from_config(default.train, "train")
    assert gpt.epoch_steps(default_train, 9) == 300  # the nine photos' codes: as before
    steps = gpt.epoch_steps(default_train, 6000)
    assert steps * 16 >= 3 * 6000  # a folder of 6,000 images: a few passes
    config.train.min_steps = -1
    with pytest.raises(config_lib.ConfigError, match="train.min_steps"):
        gpt.resolve(config)
    config.train.update(min_steps=0, num_steps=10)
    config.optim.warmup_steps = 15
    with pytest.raises(config_lib.ConfigError, match="optim.warmup_steps: 15 must be below train.num_steps=10"):
        gpt.resolve(config)


def test_corrupt_codes_refuse_the_run_before_its_workdir_exists(codes_dir, tmp_path):
    broken = tmp_path / "codes"
    shutil.copytree(codes_dir, broken)
    shard = sorted(broken.glob("*.array_record"))[1]
    shard.write_bytes(shard.read_bytes()[:-40])  # a truncated shard
    with pytest.raises(ValueError, match=rf"{shard.name}"):
        train_gpt(gpt_config(broken), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_changed_model_cannot_resume_and_says_what_can(trained, codes_dir, tmp_path):
    """A resume whose allowed changes give the model other arrays is refused as such, not as unreadable
    checkpoints: another preset needs a new workdir; an EMA turned on can start from the weights (init_from)."""
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    other = gpt_config(codes_dir, num_steps=STEPS, sample_every=20, allow_changes="model.preset")
    other.model.preset = "GPT-S"
    with pytest.raises(resume.ConfigChanged) as info:
        train_gpt(other, str(workdir))
    message = str(info.value)
    assert f"the checkpoint of step {STEPS} holds other arrays than the state this config builds" in message
    first = message.splitlines()[1]  # the first array listed: a parameter, saved -> built (GPT-tiny -> GPT-S)
    assert first.startswith("  params.") and first.endswith(", 256)"), message
    assert "(model.preset) change the model, and a changed model cannot resume: train it in a new --workdir" in message
    assert "train.init_from cannot start it from these weights either" in message and "unreadable" not in message
    ema = gpt_config(codes_dir, num_steps=STEPS, sample_every=20, allow_changes="optim.ema_decay")
    ema.optim.ema_decay = 0.9
    with pytest.raises(resume.ConfigChanged, match=rf"ema_params\..* absent -> (?s:.*)start a new run from its "
                                                   rf"weights instead: .*--config.train.init_from={workdir}"):
        train_gpt(ema, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == sorted(os.listdir(os.path.join(trained[0], "checkpoints")))
    assert not (workdir / "checkpoints.aside").exists()


def test_sample_grids_show_every_class_with_images_up_to_the_cap(tiny_run, tmp_path):
    """12 classes, the last two without images (held out, as the photos' two are): 10 rows; a cap of 4: 4 rows."""
    classes, rng = 12, np.random.default_rng(0)
    labels = [i % 10 for i in range(20)]
    codes_dir = write_codes_dir(tmp_path / "codes", rng.integers(0, K, (20, 1, GRID, GRID)), labels, codebook_size=K,
                                num_classes=classes, tokenizer=dict(path=tiny_run[0], step=2, weights="ema"))
    manifest_path = os.path.join(codes_dir, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["images_per_class"] = [labels.count(c) for c in range(classes)]
    json.dump(manifest, open(manifest_path, "w"))
    train_gpt(gpt_config(codes_dir, num_steps=1, sample_every=1), str(tmp_path / "run"))
    grid = Image.open(tmp_path / "run" / "samples" / "step_1.png")
    assert grid.size == (4 * 16 + 5 * 2, 10 * 16 + 11 * 2)  # 10 rows of 4 samples (sample.per_class)
    assert gpt.sample_rows(codes_data.open_codes(codes_dir), 4) == 4
    assert gpt.sample_rows(codes_data.open_codes(codes_dir), 16) == 10


def test_a_scanned_run_trains_like_the_looped_one_from_its_weights(trained, codes_dir, tmp_path):
    """Fine-tuning from the looped run into a scanned one (its weights stacked on load): the same losses and
    gradient norms step for step as a looped fine-tune (the decay mask, the optimizer and the step alike)."""
    workdir, _ = trained
    logged = {}
    for scan_layers in (False, True):
        config = gpt_config(codes_dir, num_steps=3, init_from=workdir)
        config.model.scan_layers = scan_layers
        train_gpt(config, str(tmp_path / str(scan_layers)))
        logged[scan_layers] = read_metrics(tmp_path / str(scan_layers))
    for looped, scanned in zip(logged[False], logged[True]):
        for key in ("loss", "grad_norm", "param_norm"):
            assert scanned[key] == pytest.approx(looped[key], rel=1e-5), (looped["step"], key)
    assert load_gpt(tmp_path / "True").model.layers.attention.wqkv.kernel[...].ndim == 5  # stacked [n_layer, ...]

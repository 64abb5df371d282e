"""The sampling job (configs/sample.py): one setting per samples folder, batches written atomically and read back
on a rerun, the tokenizer checked against the GPT, a grid of every class up to the cap, and samples (codes and
pixels) that depend on neither the batch size nor the device count."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from fvq_jax import config_lib, tasks
from fvq_jax.models.load import Loaded
from fvq_jax.sampling import job
from tests.conftest import run_python
from tests.sampling.gpt_export import CLASSES, write_tokenizer_export
from tests.train.tiny import ROOT


def sample_config(arg: str):
    return config_lib.load_file(ROOT / "configs" / "sample.py").get_config(arg)


def sample_task(arg: str) -> job.SampleTaskSpec:
    """configs/sample.py:arg resolved as `tasks.run` resolves it."""
    return job.resolve(sample_config(arg), jax.device_count(), jax.process_count())


def read_samples(out) -> dict[str, np.ndarray]:
    """Every batch file's arrays, concatenated in sample order."""
    files = sorted(f for f in os.listdir(out) if f.endswith(".npz"))
    arrays = [dict(np.load(os.path.join(out, f))) for f in files]
    order = np.argsort(np.concatenate([a["indices"] for a in arrays]))
    return {k: np.concatenate([a[k] for a in arrays])[order] for k in ("indices", "arr_1", "codes", "arr_0")}


def test_a_folder_holds_one_setting(gpt_export, tmp_path):
    """Today a rerun with other settings keeps batch 0 of the first run, writes batch 1 of the second and
    sampling.json claims the second for all: refused, naming each field."""
    out = tmp_path / "mix"
    job.sample_run(sample_task("n=8,batch=4,cfg=4.0,grid=0"), gpt_export, out=out)
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.endswith(".npz")}
    with pytest.raises(config_lib.ConfigError, match=r"(?s)sample.name: .* holds samples of another setting:\n"
                       r"  num_samples: 8 -> 16\n  sampling.cfg_scale: 4.0 -> 1.0\n  sampling.seed: 0 -> 5\n"):
        job.sample_run(sample_task("n=16,batch=4,cfg=1.0,seed=5,grid=0"), gpt_export, out=out)
    assert json.loads((out / "sampling.json").read_text())["sampling"]["cfg_scale"] == 4.0
    job.sample_run(sample_task("n=8,batch=4,cfg=4.0,grid=0"), gpt_export, out=out)  # the same setting: complete
    assert {f: os.path.getmtime(out / f) for f in before} == before  # nothing sampled again


def _loaded(source, step, weights):
    return Loaded(model=None, config=None, step=step, weights=weights, source=source, mesh=None)


def test_the_default_folder_name_covers_every_setting_that_changes_the_pixels():
    def name(arg, tokenizer=_loaded("/runs/fvq_photos", 360, "ema")):
        return job.output_name(job.resolve(sample_config(arg)).sample, _loaded("/runs/gpt", 300, "raw"), tokenizer, 704)

    assert name("") == "step300-n704-cfg2-seed0"
    assert name("cfg=1.5,seed=3,schedule=linear,temperature=0.9,top_k=50,top_p=0.95") == \
        "step300-n704-cfg1.5-seed3-linear-temperature0.9-top_k50-top_p0.95"
    assert name("ema=false") == "step300-n704-cfg2-seed0-raw"
    config = sample_config("")
    config.sample.tokenizer = "/runs/fvq_photos"
    config.sample.cfg_interval = (0.2, 0.8)
    tokenizer = _loaded("/runs/fvq_photos", 360, "ema")
    assert job.output_name(job.resolve(config).sample, _loaded("/runs/gpt", 300, "ema"), tokenizer, 704) == \
        "step300-n704-cfg2-seed0-interval0.2-0.8-tok-fvq_photos-step360-ema"
    assert name("name=mine") == "mine"


def test_batches_are_written_atomically_and_read_back_on_a_rerun(gpt_export, tmp_path, monkeypatch):
    """Today a batch cut short by a kill or a full disk is taken as done on a rerun (and scoring fails later with
    BadZipFile naming no file)."""
    reference = read_samples(job.sample_run(sample_task("n=12,batch=4,grid=0"), gpt_export, out=tmp_path / "ref"))
    out = tmp_path / "cut"
    real_savez = np.savez

    def full_disk(f, **arrays):  # the third batch: half written, then the disk is full
        if "_00002_" in f.name:
            f.write(b"PK\x03\x04 half a zip")
            raise OSError(28, "No space left on device")
        real_savez(f, **arrays)

    monkeypatch.setattr(job.np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        job.sample_run(sample_task("n=12,batch=4,grid=0"), gpt_export, out=out)
    monkeypatch.setattr(job.np, "savez", real_savez)
    written = sorted(f for f in os.listdir(out) if f.startswith("batch"))
    assert written == ["batch_00000_p000.npz", "batch_00001_p000.npz"]  # no partial file under a batch's name
    # A file cut short some other way (copied in part, a disk error): read back, found wanting, sampled again.
    first = out / "batch_00000_p000.npz"
    first.write_bytes(first.read_bytes()[:1000])
    job.sample_run(sample_task("n=12,batch=4,grid=0"), gpt_export, out=out)
    done = read_samples(out)
    for key in reference:
        np.testing.assert_array_equal(done[key], reference[key], err_msg=key)


def test_a_tokenizer_with_other_codes_is_refused(gpt_export, tmp_path):
    """Today a sample.tokenizer whose K or token grid differs from the GPT's decodes anyway (exit 0)."""
    config = sample_config("n=4,batch=4,grid=0")
    config.sample.tokenizer = write_tokenizer_export(tmp_path / "k16", quantizer=dict(codebook_size=16))
    with pytest.raises(config_lib.ConfigError, match=r"sample.tokenizer: .*k16 has K = 16 codes and the GPT predicts"):
        job.sample_run(job.resolve(config), gpt_export, out=tmp_path / "a")
    config.sample.tokenizer = write_tokenizer_export(tmp_path / "deeper", model=dict(ch_mult=(1, 2, 2, 2)))
    with pytest.raises(config_lib.ConfigError, match=r"sample.tokenizer: .*deeper decodes the GPT's 4 x 4 token grid "
                       r"into 32 x 32 images \(downsampling 8\); the tokenizer that made its codes .* into 16 x 16"):
        job.sample_run(job.resolve(config), gpt_export, out=tmp_path / "b")
    config.sample.tokenizer = write_tokenizer_export(tmp_path / "same")  # K and downsampling of the GPT's own
    out = job.sample_run(job.resolve(config), gpt_export, out=tmp_path / "c")
    assert json.loads((out / "sampling.json").read_text())["tokenizer"]["path"] == str(tmp_path / "same")


def test_bad_settings_are_refused_before_anything_is_built(tmp_path):
    for arg, field in (("cfg=-1.0", "cfg_scale"), ("cfg=0.5", "cfg_scale"), ("top_p=0.0", "top_p"),
                       ("seed=-1", "seed"), ("batch=0", "batch_size"), ("name=a/b", "name")):
        with pytest.raises(config_lib.ConfigError, match=f"config field sample.{field}: "):
            tasks.resolve(sample_config(arg))
    with pytest.raises(config_lib.ConfigError, match="config field sample.batch_size: 6 does not split over the 4 "):
        tasks.resolve(sample_config("batch=6"), num_devices=4, num_processes=1)
    with pytest.raises(config_lib.ConfigError, match="config field sample.batch_size: 6 is not divisible by the 4 "):
        tasks.resolve(sample_config("batch=6"), num_devices=2, num_processes=4)


def test_the_grid_shows_every_class_up_to_the_cap(gpt_export, tmp_path):
    """Today grid.png holds the first 8 classes: a 10-class GPT never shows its last two."""
    out = job.sample_run(sample_task("n=20,batch=8"), gpt_export, out=tmp_path / "all")
    samples = read_samples(out)
    np.testing.assert_array_equal(samples["arr_1"], np.repeat(np.arange(CLASSES), 2))
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (CLASSES * 16 + (CLASSES + 1) * 2, 2 * 16 + 3 * 2, 3)
    for c in range(CLASSES):  # row c: the two samples of class c, as in the batch files
        for j in range(2):
            top, left = 2 + c * 18, 2 + j * 18
            np.testing.assert_array_equal(grid[top:top + 16, left:left + 16], samples["arr_0"][2 * c + j])
    capped = job.sample_run(sample_task("n=20,batch=8,grid=4"), gpt_export, out=tmp_path / "capped")
    assert Image.open(capped / "grid.png").size == (2 * 16 + 3 * 2, 4 * 16 + 5 * 2)


SAMPLE_ON_DEVICES = """
import json
from fvq_jax import config_lib
from fvq_jax.sampling import job
config = config_lib.load_file("configs/sample.py").get_config("n=12,batch=8,cfg=2.0,seed=3,grid=0")
print(json.dumps(str(job.sample_run(job.resolve(config, 8, 1), {export!r}, out={out!r}))))
"""


def test_samples_depend_on_neither_the_batch_size_nor_the_devices(gpt_export, tmp_path):
    """Codes and pixels alike: every image is decoded on its own (a batched decode moves a level here and there)."""
    runs = {batch: read_samples(job.sample_run(sample_task(f"n=12,batch={batch},cfg=2.0,seed=3,grid=0"), gpt_export,
                                               out=tmp_path / f"b{batch}")) for batch in (4, 6)}
    run_python(SAMPLE_ON_DEVICES.format(export=gpt_export, out=str(tmp_path / "d8")), num_devices=8)
    runs["8 devices"] = read_samples(tmp_path / "d8")
    reference = runs.pop(4)
    np.testing.assert_array_equal(reference["indices"], np.arange(12))
    assert reference["arr_0"].shape == (12, 16, 16, 3) and reference["arr_0"].std() > 10  # not blank
    for name, run in runs.items():
        for key in reference:
            np.testing.assert_array_equal(run[key], reference[key], err_msg=f"{name}: {key}")

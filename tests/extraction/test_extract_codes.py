"""Code extraction (configs/extract_codes.py -> fvq_jax/extraction/) from the tiny trained photo run
(16 x 16 images, 4 x 4 tokens, K = 64): the codes against the tokenizer's own encode of crops recomputed here,
the manifest, resume (over missing, truncated and corrupt shards), refusals, unreadable images, and 2 processes
against 1."""

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from fvq_jax import checkpointing, tasks
from fvq_jax.config_lib import ConfigError
from fvq_jax.data import codes, sources
from fvq_jax.data.pipeline import TrainExample
from fvq_jax.data.transforms import TEN_CROP_VIEWS, center_crop
from fvq_jax.data.value_range import to_model_range
from fvq_jax.extraction import job as extraction
from fvq_jax.extraction.spec import ExtractionSpec
from fvq_jax.models.load import load_tokenizer, saved_config
from tests.conftest import ROOT, run_python, subprocess_env
from tests.data.conftest import write_jpegs
from tests.data.test_codes import flip_a_byte
from tests.data.test_transforms import reference_ten_crop
from tests.nearest_codes import assert_same_codes
from tests.test_configs import load_config_module

extract_config_module = load_config_module("extract_codes")
PHOTO_FILES = ["shard-00000-00000", "shard-00000-00001", "shard-00000-00002"]


def extract_config(tokenizer, arg: str = "", **fields):
    """configs/extract_codes.py:tokenizer=...,arg with dotted `fields` set (data__image_size -> data.image_size)."""
    config = extract_config_module.get_config(",".join(filter(None, [f"tokenizer={tokenizer}", arg])))
    config.update_from_flattened_dict({k.replace("__", "."): v for k, v in fields.items()})
    return config


def run(config, out) -> tuple[dict, str]:
    text = io.StringIO()
    with redirect_stdout(text):
        manifest = extraction.extract_codes(extraction.resolve(config, jax.process_count()), out)
    return manifest, text.getvalue()


def files(out) -> dict[str, bytes]:
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}


@nnx.jit
def features(model, images_u8):
    """The encoder's output z [B, h, w, D] and the tokenizer's own indices for it."""
    z = model.quant_conv(model.encoder(to_model_range(images_u8)))
    return z, model.quantizer(z)["indices"]


def assert_codes_of(model, dataset: codes.CodeDataset, views_of) -> None:
    """Every image's codes equal the tokenizer's encode of views_of(source index) (uint8 [A, S, S, 3]), one image
    per call, up to float32 near-ties between the batched and the unbatched encode."""
    codebook = np.asarray(model.quantizer.codebook())
    for item in dataset:
        z, expected = features(model, jnp.asarray(views_of(int(item["index"]))))
        assert item["codes"].shape == (len(expected), expected.shape[1] * expected.shape[2])
        assert_same_codes(item["codes"], np.asarray(expected), np.asarray(z), codebook)


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_tokenizer(tiny_run[0]).model  # the EMA weights, as extraction's default


@pytest.fixture(scope="module")
def photos():
    return sources.PhotoSource(train=True, image_size=16)


@pytest.fixture(scope="module")
def tencrop(tiny_run, tmp_path_factory):
    """Ten-crop codes of the first 3 training photos, 2 images per batch, 1 per shard: (out, manifest, printed)."""
    out = str(tmp_path_factory.mktemp("tencrop") / "codes")
    manifest, printed = run(extract_config(tiny_run[0], "augment=tencrop,images=3,batch=2,shard=1"), out)
    return out, manifest, printed


# ----------------------------------------------------------------------------- codes


def test_tencrop_codes_are_the_tokenizers_codes_of_the_ten_crops(tencrop, model, photos):
    out, _, printed = tencrop
    dataset = codes.open_codes(out)
    assert len(dataset) == 3 and dataset.grids_per_image == 10 and dataset.grid == (4, 4)
    assert [int(item["index"]) for item in dataset] == [0, 1, 2]
    assert [int(item["label"]) for item in dataset] == [photos[i]["label"] for i in range(3)]
    # ADM center crop to int(1.1 * 16) = 17, then torchvision's TenCrop(16) written out with PIL.
    assert_codes_of(model, dataset, lambda i: np.stack(reference_ten_crop(
        Image.fromarray(center_crop(sources.load_image(photos[i]), 17)), 16)))
    assert "extract 3/3 images" in printed and "extracted 3 images x 10 grids of 4x4" in printed


@pytest.mark.parametrize("augment", ["random", "center"])
def test_random_and_center_codes(tiny_run, model, photos, tmp_path, augment):
    out = str(tmp_path / "codes")
    run(extract_config(tiny_run[0], f"augment={augment},crops=3,seed=5,images=2"), out)
    dataset = codes.open_codes(out)
    image = lambda i: sources.load_image(photos[i])  # noqa: E731
    if augment == "center":
        assert dataset.grids_per_image == 1
        assert_codes_of(model, dataset, lambda i: center_crop(image(i), 16)[None])
        return
    assert dataset.grids_per_image == 3
    view = TrainExample(16, "zoom", 1.25, True).view  # the run's data.train_crop and flip
    assert_codes_of(model, dataset, lambda i: np.stack([view(image(i), np.random.default_rng([5, i, k]))
                                                        for k in range(3)]))
    assert len({tuple(grid) for grid in dataset[0]["codes"]}) > 1  # the views differ


def test_manifest_records_what_was_extracted(tencrop, tiny_run):
    out, manifest, _ = tencrop
    assert json.load(open(os.path.join(out, "manifest.json"))) == json.loads(json.dumps(manifest))
    assert manifest["format"] == "fvq_jax codes" and manifest["version"] == 2 and manifest["status"] == "complete"
    assert manifest["record"]["grids_per_image"] == 10 and manifest["record"]["grid"] == [4, 4]
    assert manifest["record"]["header"] == ["label", "index"] and manifest["record"]["dtype"] == "int32"
    tokenizer = manifest["tokenizer"]
    assert tokenizer["path"] == os.path.abspath(tiny_run[0]) and tokenizer["kind"] == "run"
    assert (tokenizer["step"], tokenizer["weights"]) == (2, "ema")
    assert (tokenizer["codebook_size"], tokenizer["code_dim"], tokenizer["grid"]) == (64, 8, [4, 4])
    assert tokenizer["quantizer"] == "vq" and tokenizer["projector"] == "XS/2"
    assert tokenizer["data"]["image_size"] == 16 and tokenizer["model"]["ch"] == 16
    assert manifest["augmentation"] == {"mode": "tencrop", "grids_per_image": 10, "crop_range": 1.1, "crop_side": 17,
                                        "views": list(TEN_CROP_VIEWS)}
    assert manifest["image_size"] == 16
    assert manifest["dataset"] == {"source": "photos", "split": "train", "name": "photos", "num_source_images": 9}
    assert manifest["num_images"] == 3 and manifest["num_skipped"] == 0 and manifest["skipped"] == []
    assert manifest["num_classes"] == 11 and manifest["class_names"] == list(sources.PHOTOS)
    assert manifest["images_per_class"] == [1, 1, 1] + [0] * 8
    assert manifest["num_shards"] == 3 and manifest["shard_size"] == 1
    assert [(s["file"], s["process"], s["shard"], s["first"], s["end"], s["images"]) for s in manifest["shards"]] == [
        (f"{stem}.array_record", 0, i, i, i + 1, 1) for i, stem in enumerate(PHOTO_FILES)]
    for entry in manifest["shards"]:  # the file as written, for open_codes to verify
        data = open(os.path.join(out, entry["file"]), "rb").read()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    extraction = manifest["extraction"]
    assert extraction["images_this_session"] == 3 and not extraction["resumed"] and extraction["process_count"] == 1
    assert extraction["seconds"] > 0 and extraction["images_per_second"] > 0 and extraction["batch_size"] == 2
    assert set(manifest["code_version"]) == {"fvq_jax", "jax", "git"}
    settings = manifest["settings"]
    assert settings["step"] == 2 and settings["weights"] == "ema" and settings["crop_range"] == 1.1
    assert settings["data.image_size"] == 16 and settings["num_images"] == 3 and "seed" not in settings
    assert sorted(os.listdir(out)) == ["manifest.json"] + sorted(f"{s}.{e}" for s in PHOTO_FILES
                                                                 for e in ("array_record", "json"))


# ----------------------------------------------------------------------------- resume and refusals


def test_resume_rewrites_only_missing_shards_identically(tencrop, tiny_run, tmp_path):
    source, manifest, _ = tencrop
    out = str(tmp_path / "codes")
    shutil.copytree(source, out)
    before = files(out)
    os.remove(os.path.join(out, "shard-00000-00001.array_record"))
    for stale in ("shard-00000-00001.array_record.tmp", "shard-00003-00001.array_record.tmp"):
        with open(os.path.join(out, stale), "wb") as f:
            f.write(b"left by a killed run")
    resumed, printed = run(extract_config(tiny_run[0], "augment=tencrop,images=3,batch=2,shard=1"), out)
    after = files(out)
    assert sorted(after) == sorted(before)  # the stale .tmp files are gone
    for name in before:
        if name != "manifest.json":
            assert after[name] == before[name], name
    assert resumed["extraction"]["images_this_session"] == 1 and resumed["extraction"]["resumed"]
    assert "extract 3/3 images" in printed
    resumed = json.loads(json.dumps(resumed))
    strip = lambda m: {k: v for k, v in m.items() if k not in ("extraction", "code_version")}  # noqa: E731
    assert strip(resumed) == strip(json.loads(json.dumps(manifest)))
    # Complete: nothing to do, nothing rewritten.
    again, printed = run(extract_config(tiny_run[0], "augment=tencrop,images=3,batch=2,shard=1"), out)
    assert "all 3 shards are extracted already" in printed and files(out) == after and again == resumed
    # Every shard finished but no manifest (killed just before writing it): the manifest alone is written.
    os.remove(os.path.join(out, "manifest.json"))
    rewritten, _ = run(extract_config(tiny_run[0], "augment=tencrop,images=3,batch=2,shard=1"), out)
    assert rewritten["extraction"]["images_this_session"] == 0 and strip(json.loads(json.dumps(rewritten))) == \
        strip(resumed)
    assert {k: v for k, v in files(out).items() if k != "manifest.json"} == \
        {k: v for k, v in after.items() if k != "manifest.json"}


def test_a_rerun_rewrites_truncated_and_corrupt_shards(tencrop, tiny_run, tmp_path):
    source, manifest, _ = tencrop
    out = str(tmp_path / "codes")
    shutil.copytree(source, out)
    before = files(out)
    truncated, corrupt = (os.path.join(out, f"shard-00000-0000{i}.array_record") for i in (1, 2))
    open(truncated, "wb").write(before[os.path.basename(truncated)][:1000])
    flip_a_byte(corrupt)
    with pytest.raises(ValueError, match="2 of the 3 shards of .* do not hold what was written"):
        codes.open_codes(out)
    resumed, printed = run(extract_config(tiny_run[0], "augment=tencrop,images=3,batch=2,shard=1"), out)
    assert f"{truncated}: it is 1,000 bytes, {len(before[os.path.basename(truncated)]):,} when it was written " \
           "(truncated or overwritten); writing it again" in printed
    assert f"{corrupt}: its SHA-256 differs from the one recorded when it was written (corrupt); writing it " \
           "again" in printed
    assert resumed["extraction"]["images_this_session"] == 2 and resumed["num_images"] == 3
    after = files(out)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert len(codes.open_codes(out)) == 3


def test_settings_that_change_codes_are_refused(tencrop, tiny_run, tmp_path):
    source, _, _ = tencrop
    out = str(tmp_path / "codes")
    shutil.copytree(source, out)
    arg = "augment=tencrop,images=3,batch=2,shard=1"
    with pytest.raises(ConfigError, match=r"crop_range: the finished extraction in .* was made with settings that "
                       r"would give other codes \(crop_range: 1.1 there, 1.2 now\)") as info:
        run(extract_config(tiny_run[0], arg, crop_range=1.2), out)
    assert info.value.field == "crop_range"
    with pytest.raises(ConfigError, match=r"step: 2 there, 1 now"):
        run(extract_config(tiny_run[0], arg + ",step=1"), out)
    # An unfinished extraction (killed after shard 0) refuses as well, naming every changed field.
    path = os.path.join(out, "manifest.json")
    manifest = json.load(open(path))
    manifest["status"] = "partial"
    json.dump(manifest, open(path, "w"))
    os.remove(os.path.join(out, "shard-00000-00002.array_record"))
    with pytest.raises(ConfigError, match=r"the unfinished extraction in .*\(augment: 'tencrop' there, 'center' now; "
                       r"crop_range: 1.1 there, <absent> now; data.image_size: 16 there, 32 now\)"):
        run(extract_config(tiny_run[0], "augment=center,images=3,batch=2,shard=1,res=32"), out)
    # Without the manifest, each finished shard's sidecar still says how it was made.
    os.rename(path, path + ".moved")
    with pytest.raises(ConfigError, match=r"data.image_size: the shard .*shard-00000-00000.array_record was made with "
                       r"settings that would give other codes \(.*data.image_size: 16 there, 32 now\)"):
        run(extract_config(tiny_run[0], "augment=tencrop,images=3,batch=2,shard=1,res=32"), out)
    os.rename(path + ".moved", path)
    # batch_size does not change codes: the same extraction finishes with another batch size.
    finished, _ = run(extract_config(tiny_run[0], "augment=tencrop,images=3,batch=1,shard=1"), out)
    assert finished["status"] == "complete" and finished["num_images"] == 3
    assert open(os.path.join(out, "shard-00000-00002.array_record"), "rb").read() == \
        open(os.path.join(source, "shard-00000-00002.array_record"), "rb").read()


@pytest.mark.parametrize("kind", ["residual", "multiscale"])
def test_multi_level_tokenizers_are_refused(tiny_run, tmp_path, kind):
    config = saved_config(tiny_run[0])
    config.quantizer.type = kind
    tokenizer = str(tmp_path / kind)
    checkpointing.save_export(tokenizer, {"unused": jnp.zeros(1)}, config.to_dict())  # refused before any array
    with pytest.raises(ConfigError, match=f"tokenizer: .*{kind} has quantizer.type='{kind}'; only single-level "
                       r"quantizers \['vq', 'ema'\] give one code per token"):
        run(extract_config(tokenizer), str(tmp_path / "codes"))
    assert not os.path.exists(tmp_path / "codes" / "manifest.json")


def test_config_checks_name_the_field(tiny_run):
    with pytest.raises(ConfigError, match="tokenizer: must name a training run or an export directory"):
        tasks.resolve(extract_config_module.get_config())
    for arg, field in [("augment=fivecrop", "augment"), ("crops=0", "crops_per_image"), ("batch=-1", "batch_size"),
                       ("shard=0", "shard_size"), ("step=-2", "step")]:
        with pytest.raises(ConfigError, match=f"config field {field}:"):
            tasks.resolve(extract_config(tiny_run[0], arg))
    with pytest.raises(ConfigError, match="batch_size: 3 is not divisible by the 2 processes"):
        tasks.resolve(extract_config(tiny_run[0], "batch=3"), num_processes=2)
    config = extract_config_module.get_config("imagenet,tokenizer=gs://bucket/fvq16k")
    tasks.resolve(config)
    assert (config.augment, config.data.source, config.data.tfds_name, config.data.split,
            config.data.image_size) == ("tencrop", "tfds", "imagenet2012", "train", 256)
    spec = ExtractionSpec.from_config(config)  # batch_size 0: about 640 views, 64 per CPU device
    assert spec.images_per_batch(spec.views_per_image("tencrop"), 1) == 64
    assert spec.images_per_batch(spec.views_per_image("random"), 2) == 4 and spec.images_per_batch(1, 8) == 640
    assert spec.images_per_batch(10, 1, cpu_devices=1) == 6 and spec.images_per_batch(10, 4, cpu_devices=8) == 48
    assert spec.images_per_batch(128, 1, cpu_devices=1) == 1


# ----------------------------------------------------------------------------- data


def test_unreadable_images_are_skipped_and_named(tiny_run, model, tmp_path):
    decoded = write_jpegs(tmp_path / "images" / "train", [2, 1])
    (tmp_path / "images" / "train" / "class_01" / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    out = str(tmp_path / "codes")
    manifest, _ = run(extract_config(tiny_run[0], "augment=center,batch=2", data__source="folder",
                                     data__folder=str(tmp_path / "images")), out)
    assert manifest["dataset"]["name"] == str(tmp_path / "images") and manifest["dataset"]["num_source_images"] == 4
    assert manifest["num_images"] == 3 and manifest["num_skipped"] == 1
    assert manifest["skipped"] == ["class_01/broken.jpg"]
    assert manifest["class_names"] == ["class_00", "class_01"] and manifest["images_per_class"] == [2, 1]
    assert "augment" in manifest["settings"] and manifest["settings"]["data.folder"] == str(tmp_path / "images")
    dataset = codes.open_codes(out)
    assert [int(item["index"]) for item in dataset] == [0, 1, 3]  # class_01/broken.jpg is record 2
    assert [int(item["label"]) for item in dataset] == [0, 0, 1]
    pixels = {0: decoded[0], 1: decoded[1], 3: decoded[2]}
    assert_codes_of(model, dataset, lambda i: center_crop(Image.fromarray(pixels[i]), 16)[None])


def resolve_data(config, saved: dict):
    return ExtractionSpec.from_config(config).resolve_data(saved)


def test_resolve_data_takes_the_tokenizers_values_and_names_missing_fields(tiny_run):
    saved = saved_config(tiny_run[0]).data.to_dict()
    data, split, augment = resolve_data(extract_config(tiny_run[0], "res=32"), saved)
    assert (data.source, split, data.image_size, data.train_crop, augment) == ("photos", "train", 32, "zoom", "random")
    assert (data.num_workers, data.read_threads) == (saved["num_workers"], saved["read_threads"])
    with pytest.raises(ConfigError, match=r"data.source: 'lmdb' is not one of \['tfds', 'folder', 'photos'\]"):
        resolve_data(extract_config(tiny_run[0], "data=lmdb"), saved)
    # An imported tokenizer records no data block: what the extraction reads must be set, the rest need not be.
    with pytest.raises(ConfigError, match=r"data.source: .* records no data.source \(an imported tokenizer\?\)"):
        resolve_data(extract_config(tiny_run[0]), {})
    data, split, augment = resolve_data(extract_config(tiny_run[0], "imagenet"), {})
    assert (data.source, data.tfds_name, split, data.image_size, data.tfds_data_dir, augment) == \
        ("tfds", "imagenet2012", "train", 256, "", "tencrop")
    with pytest.raises(ConfigError, match=r"data.folder: .* records no data.folder"):
        resolve_data(extract_config(tiny_run[0], "data=folder,split=train,res=32"), {})
    with pytest.raises(ConfigError, match=r"data.train_crop: .* records no data.train_crop"):
        resolve_data(extract_config(tiny_run[0], "imagenet,augment=random"), {})


# ----------------------------------------------------------------------------- processes


def test_shards_are_dealt_round_robin():
    shards = codes.plan_shards(10, 3)
    assert [(s.index, s.start, s.end) for s in shards] == [(0, 0, 3), (1, 3, 6), (2, 6, 9), (3, 9, 10)]
    assert [s.index for s in extraction.deal(shards, 0, 2)] == [0, 2]
    assert [s.index for s in extraction.deal(shards, 1, 2)] == [1, 3]
    assert [s.index for s in extraction.deal(shards[1:], 1, 3)] == [2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_write_what_one_does(tiny_run, tencrop, model, photos, tmp_path):
    """`python -m fvq_jax.main` as 2 processes (1 CPU device each) over jax.distributed: each writes its own
    shards (0 and 2 by process 0, 1 by process 1), the records equal the single process's."""
    out, port = str(tmp_path / "codes"), _free_port()
    command = [sys.executable, "-m", "fvq_jax.main",
               f"--config=configs/extract_codes.py:tokenizer={tiny_run[0]},augment=tencrop,images=3,batch=2,shard=1",
               f"--workdir={out}", f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    processes = [subprocess.Popen(command + [f"--process_id={i}"], cwd=ROOT, env=subprocess_env(1),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in processes:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output[-5000:]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert [(s["file"], s["process"]) for s in manifest["shards"]] == [
        ("shard-00000-00000.array_record", 0), ("shard-00001-00001.array_record", 1),
        ("shard-00000-00002.array_record", 0)]
    assert manifest["extraction"]["process_count"] == 2 and manifest["num_images"] == 3
    two, one = codes.open_codes(out), codes.open_codes(tencrop[0])
    assert [int(item["index"]) for item in two] == [0, 1, 2]
    for got, want in zip(two, one):
        assert got["label"] == want["label"] and got["index"] == want["index"]
    assert_codes_of(model, two, lambda i: np.stack(reference_ten_crop(
        Image.fromarray(center_crop(sources.load_image(photos[i]), 17)), 16)))


def test_eight_devices_write_what_one_does(tiny_run, tencrop, model, photos, tmp_path):
    """One process, 8 simulated devices: each global batch of 4 images x 10 views (one of them padding) is split 8
    ways and this process gathers its 8 row blocks back in order."""
    out = str(tmp_path / "codes")
    run_python(f"""
        from fvq_jax import config_lib
        from fvq_jax.extraction import job
        config = config_lib.load_file("configs/extract_codes.py").get_config(
            "tokenizer={tiny_run[0]},augment=tencrop,images=3,batch=4,shard=1")
        job.extract_codes(job.resolve(config), {out!r})
        """, num_devices=8)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["extraction"]["device_count"] == 8 and manifest["extraction"]["mesh"]["data"] == 8
    eight, one = codes.open_codes(out), codes.open_codes(tencrop[0])
    assert [(int(a["index"]), int(a["label"])) for a in eight] == [(int(b["index"]), int(b["label"])) for b in one]
    assert_codes_of(model, eight, lambda i: np.stack(reference_ten_crop(
        Image.fromarray(center_crop(sources.load_image(photos[i]), 17)), 16)))

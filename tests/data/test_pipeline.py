"""Training and eval pipelines: shapes, determinism, sharding, resume (also through Orbax), padding, global arrays."""

import json
import os
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fvq_jax import config_lib
from fvq_jax.data import pipeline, sources, transforms
from fvq_jax.data.spec import DataSpec
from tests.data.conftest import ROOT, local_data_config, tokenizer_config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_photo_batches_are_deterministic_per_seed():
    cfg = local_data_config()
    first = take(pipeline.train_iterator(cfg, global_batch=4, seed=0, process_index=0, process_count=1), 3)
    again = take(pipeline.train_iterator(cfg, global_batch=4, seed=0, process_index=0, process_count=1), 3)
    other = take(pipeline.train_iterator(cfg, global_batch=4, seed=1, process_index=0, process_count=1), 3)
    batch = first[0]
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    train_labels = {sources.PHOTOS.index(n) for n in sources.PHOTOS if n not in sources.EVAL_PHOTOS}
    assert set(np.concatenate([b["label"] for b in first]).tolist()) <= train_labels
    assert_same_batches(first, again)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_two_processes_read_disjoint_shards_that_cover_the_data(image_folder):
    # 12 training images, one per class: labels identify records. Each process's first 6 examples
    # are one epoch of its shard.
    cfg = local_data_config(source="folder", folder=str(image_folder), image_size=16, train_crop="short_side")
    seen = []
    for index in range(2):
        iterator = pipeline.train_iterator(cfg, global_batch=4, seed=0, process_index=index, process_count=2)
        labels = np.concatenate([b["label"] for b in take(iterator, 3)])
        assert len(labels) == 6 and len(set(labels.tolist())) == 6  # a whole epoch, no repeats
        seen.append(set(labels.tolist()))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(12))


def test_global_batches_do_not_depend_on_the_process_count(image_folder):
    """Process p decodes columns [p L, (p + 1) L) of every global batch: side by side, the processes'
    batches are the single-process batches, crops and flips included."""
    cfg = local_data_config(source="folder", folder=str(image_folder), image_size=16)
    whole = take(pipeline.train_iterator(cfg, global_batch=6, seed=3, process_index=0, process_count=1), 4)
    parts = [take(pipeline.train_iterator(cfg, global_batch=6, seed=3, process_index=i, process_count=3), 4)
             for i in range(3)]
    for step, batch in enumerate(whole):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), batch[key])


def test_both_presets_have_valid_data_blocks():
    for config in (tokenizer_config(), tokenizer_config("paper")):
        DataSpec.from_config(config.data, "data")
    for field, value in (("max_resize_ratio", 0.9), ("source", "imagenet"), ("train_crop", "random"),
                         ("flip", "yes"), ("folder", "")):
        data = tokenizer_config().data.to_dict()
        data.update({field: value, "source": "folder"} if field == "folder" else {field: value})
        with pytest.raises(config_lib.ConfigError) as info:
            DataSpec.from_config(data, "data")
        assert info.value.field == f"data.{field}"


def test_batch_sizes_must_divide_across_processes():
    cfg = local_data_config()
    with pytest.raises(config_lib.ConfigError, match="train.global_batch: 6 is not divisible by the 4 processes"):
        pipeline.train_iterator(cfg, global_batch=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(config_lib.ConfigError, match="eval.batch_size"):
        pipeline.eval_batches(cfg, batch_size=6, process_index=0, process_count=4)


def test_resume_from_state_yields_the_same_batches():
    cfg = local_data_config(image_size=32)
    iterator = pipeline.train_iterator(cfg, global_batch=4, seed=3, process_index=0, process_count=1)
    take(iterator, 5)  # more than one epoch of the 9 training photos
    state = json.loads(json.dumps(iterator.get_state()))  # what the Orbax handler writes and reads
    expected = take(iterator, 4)
    resumed = pipeline.train_iterator(cfg, global_batch=4, seed=3, process_index=0, process_count=1)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), expected)


def test_resume_through_an_orbax_checkpoint_manager(tmp_path):
    cfg = local_data_config(image_size=16)
    iterator = pipeline.train_iterator(cfg, global_batch=2, seed=0, process_index=0, process_count=1)
    params = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                                data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = take(iterator, 3)

    fresh = pipeline.train_iterator(cfg, global_batch=2, seed=0, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)))
    assert restored.data is fresh
    np.testing.assert_array_equal(restored.state["w"], params["w"])
    assert_same_batches(take(fresh, 3), expected)


def test_eval_batches_are_padded_deterministic_center_crops():
    cfg = local_data_config(image_size=64)
    source = sources.PhotoSource(train=False, image_size=64)  # 60 held-out crops
    shards = [pipeline.eval_batches(cfg, batch_size=16, process_index=i, process_count=2) for i in range(2)]
    # 30 records per process, 8 per local batch -> 4 batches each, the last with 6 real images.
    assert [len(s) for s in shards] == [4, 4]
    for index, shard in enumerate(shards):
        batches = list(shard)
        assert len(batches) == 4 and all(b["image"].shape == (8, 64, 64, 3) for b in batches)
        assert_same_batches(batches, list(shard))  # re-iterable and deterministic
        mask = np.concatenate([b["mask"] for b in batches])
        np.testing.assert_array_equal(mask, np.arange(32) < 30)
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        for k in (0, 17, 29):
            record = source[index + 2 * k]  # records are dealt out index::2
            expected = transforms.center_crop(Image.fromarray(record["pixels"]), 64)
            np.testing.assert_array_equal(images[k], expected)
            assert labels[k] == record["label"]
        assert not images[30:].any()


def test_eval_num_images_limit():
    cfg = local_data_config(image_size=64)
    batches = pipeline.eval_batches(cfg, batch_size=4, num_images=10, process_index=1, process_count=2)
    mask = np.concatenate([b["mask"] for b in batches])
    assert len(batches) == 3 and mask.sum() == 5 and mask.size == 6


def test_tfds_pipelines_under_mock_data():
    cfg = local_data_config(source="tfds", tfds_name="imagenet2012", image_size=16, train_crop="short_side",
                            read_threads=0)
    with tfds.testing.mock_data(num_examples=10):
        iterator = pipeline.train_iterator(cfg, global_batch=4, seed=0, process_index=0, process_count=1)
        batch = next(iterator)
        evals = list(pipeline.eval_batches(cfg, batch_size=4, process_index=0, process_count=1))
        records = sources.TfdsSource("imagenet2012", "validation")
        expected = transforms.center_crop(sources.load_image(records[5]), 16)
    assert batch["image"].shape == (4, 16, 16, 3) and iterator.num_skipped == 0
    assert len(evals) == 3 and np.concatenate([b["mask"] for b in evals]).sum() == 10
    np.testing.assert_array_equal(evals[1]["image"][1], expected)


def test_to_global_batch_on_one_device():
    mesh = jax.make_mesh((1,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = {"image": np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3),
             "mask": np.array([True, False])}
    out = pipeline.to_global_batch(batch, sharding)
    assert out["image"].sharding == sharding and out["mask"].dtype == bool
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])


def test_to_global_batch_on_eight_devices():
    script = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from fvq_jax.data import pipeline
        assert jax.device_count() == 8
        sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
        batch = {"image": np.arange(16 * 2 * 2 * 3, dtype=np.uint8).reshape(16, 2, 2, 3),
                 "label": np.arange(16, dtype=np.int32)}
        out = pipeline.to_global_batch(batch, sharding)
        assert out["image"].shape == (16, 2, 2, 3)
        for shard in out["label"].addressable_shards:
            rows = shard.index[0]
            np.testing.assert_array_equal(np.asarray(shard.data), batch["label"][rows])
            assert shard.data.shape == (2,)
        print("ok", len(out["label"].addressable_shards))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "8"]

"""The codes reader: records, the manifest checks, and the GPT's input stream (grid choice, epochs, processes, resume).

The directories here are written directly (array_record + a manifest), with codes that name their image and
grid: code = 1000 * image + 100 * grid + token, so every batch row says where it came from.
"""

import json
import os
import re

import numpy as np
import pytest

from fvq_jax import tasks
from fvq_jax.data import codes
from tests.codes_dirs import write_codes_dir
from tests.train.gpt_codes import gpt_config, write_synthetic_codes

GRID = (2, 2)
TOKENS = GRID[0] * GRID[1]


def image_codes(image: int, grids: int, offset: int = 0) -> np.ndarray:
    """[grids, h, w]: 1000 * image + 100 * grid + token (+ offset)."""
    return (1000 * image + 100 * np.arange(grids)[:, None] + np.arange(TOKENS)[None] + offset).reshape((grids,) + GRID)


def write_codes(directory, num_images: int, *, grids: int = 5, shard_size: int = 4, offset: int = 0) -> str:
    """A finished codes directory of `num_images` images (label = image % 3) in shards of `shard_size`."""
    return write_codes_dir(directory, [image_codes(i, grids, offset) for i in range(num_images)],
                           [i % 3 for i in range(num_images)], codebook_size=4096, num_classes=3,
                           shard_size=shard_size, class_names=["a", "b", "c"])


def stream(dataset, num_batches, *, global_batch=4, seed=0, **kwargs):
    iterator = codes.train_iterator(dataset, global_batch=global_batch, seed=seed, **kwargs)
    return [next(iterator) for _ in range(num_batches)]


def origin(batch):
    """(image, grid) of every row of a batch; checks that the row is one whole grid of that image."""
    image, grid = batch["codes"][:, 0] // 1000, batch["codes"][:, 0] % 1000 // 100
    for row, (i, a) in enumerate(zip(image, grid)):
        np.testing.assert_array_equal(batch["codes"][row], image_codes(i, a + 1)[a].ravel())
    np.testing.assert_array_equal(batch["label"], image % 3)
    return image, grid


def test_record_round_trip():
    grids = np.random.default_rng(0).integers(0, 262_144, (20, 16, 16), dtype=np.int32)  # K = 262,144 needs int32
    data = codes.encode_record(7, 1_281_166, grids)
    assert len(data) == 4 * (2 + 20 * 256)
    np.testing.assert_array_equal(np.frombuffer(data, "<i4")[:2], [7, 1_281_166])  # little-endian label, index
    record = codes.decode_record(data, 20, 256)
    assert record["label"] == 7 and record["index"] == 1_281_166
    assert record["codes"].dtype == np.int32 and record["codes"].shape == (20, 256)
    np.testing.assert_array_equal(record["codes"], grids.reshape(20, 256))
    with pytest.raises(ValueError, match="a record of 20484 bytes; this layout has 20488 \\(2 \\+ 20 x 256 int32\\)"):
        codes.decode_record(data[:-4], 20, 256)


def test_dataset_reads_every_shard_in_order(tmp_path):
    dataset = codes.open_codes(write_codes(tmp_path, 10))
    assert len(dataset) == 10 and dataset.grids_per_image == 5 and dataset.grid == GRID
    assert dataset.codebook_size == 4096 and dataset.num_classes == 3 and dataset.class_names == ("a", "b", "c")
    for i in range(10):
        item = dataset[i]
        assert item["index"] == i and item["label"] == i % 3
        assert item["codes"].dtype == np.int32 and item["codes"].shape == (5, TOKENS)
        np.testing.assert_array_equal(item["codes"], image_codes(i, 5).reshape(5, TOKENS))


def test_batches_have_the_documented_shapes(tmp_path):
    batch = stream(codes.open_codes(write_codes(tmp_path, 10)), 1, global_batch=6, process_index=1, process_count=2)[0]
    assert set(batch) == {"codes", "label"}
    assert batch["codes"].dtype == np.int32 and batch["codes"].shape == (3, TOKENS)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (3,)


def test_each_image_gives_one_grid_per_epoch_and_the_grids_vary(tmp_path):
    dataset = codes.open_codes(write_codes(tmp_path, 12))
    rows = [origin(b) for b in stream(dataset, 30)]  # 10 epochs of 12 images at batch 4
    images = np.concatenate([r[0] for r in rows]).reshape(10, 12)
    grids = np.concatenate([r[1] for r in rows]).reshape(10, 12)
    for epoch in images:
        assert sorted(epoch) == list(range(12))
    assert len({tuple(e) for e in images}) == 10  # a new order every epoch
    assert len(set(grids.ravel())) == 5  # every grid gets picked
    for image in range(12):  # and one image does not keep one grid
        assert len(set(grids[images == image])) > 1


def test_grid_choice_depends_on_seed_and_position_only(tmp_path):
    first = codes.open_codes(write_codes(tmp_path / "first", 12))
    other = codes.open_codes(write_codes(tmp_path / "other", 12, offset=7))  # same shape, other codes
    a, b = stream(first, 6, seed=3), stream(other, 6, seed=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["codes"] + 7, y["codes"])  # same image and grid at every position
    for x, y in zip(a, stream(first, 6, seed=3)):
        np.testing.assert_array_equal(x["codes"], y["codes"])
    reseeded = np.concatenate([b["codes"] for b in stream(first, 6, seed=4)])
    assert not np.array_equal(np.concatenate([b["codes"] for b in a]), reseeded)


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
    dataset = codes.open_codes(write_codes(tmp_path, 10))
    single = stream(dataset, 8, global_batch=6, process_index=0, process_count=1)
    halves = [stream(dataset, 8, global_batch=6, process_index=p, process_count=2) for p in range(2)]
    for step, whole in enumerate(single):
        for key in ("codes", "label"):
            np.testing.assert_array_equal(whole[key], np.concatenate([halves[0][step][key], halves[1][step][key]]))


def test_resume_from_state_is_exact(tmp_path):
    dataset = codes.open_codes(write_codes(tmp_path, 10))
    iterator = codes.train_iterator(dataset, global_batch=4, seed=1)
    for _ in range(4):  # past the first epoch boundary
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(5)]
    resumed = codes.train_iterator(dataset, global_batch=4, seed=1)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in ("codes", "label"):
            np.testing.assert_array_equal(got[key], want[key])


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no manifest.json in {tmp_path}: not a codes directory"):
        codes.open_codes(tmp_path)


def test_unfinished_extraction(tmp_path):
    directory = write_codes(tmp_path, 10)
    path = os.path.join(directory, codes.MANIFEST)
    manifest = json.load(open(path))
    manifest.update(status="partial", shards=manifest["shards"][:1], num_images=4)
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ValueError, match=r"unfinished \(1 of 3 shards listed\): run it again to finish it"):
        codes.open_codes(directory)


def test_manifest_and_shards_disagree(tmp_path):
    directory = write_codes(tmp_path, 10)
    path = os.path.join(directory, codes.MANIFEST)
    manifest = json.load(open(path))
    manifest["shards"][1]["images"] = 5
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ValueError, match=r"shard-00001-00001.array_record holds 4 records, manifest.json says 5"):
        codes.open_codes(directory)
    manifest["shards"][1]["images"] = 4
    manifest["num_images"] = 11
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ValueError, match="hold 10 images, manifest.json says 11"):
        codes.open_codes(directory)
    manifest["num_images"] = 10
    manifest["record"]["grids_per_image"] = 4  # the records are longer than this layout
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ValueError, match="record 3 of .*: a record of 88 bytes; this layout has 72"):
        codes.open_codes(directory)[3]
    os.remove(os.path.join(directory, "shard-00000-00002.array_record"))
    with pytest.raises(FileNotFoundError, match=r"shard-00000-00002.array_record is missing \(manifest.json lists it "
                       r"with 2 images\)"):
        codes.open_codes(directory)


def flip_a_byte(path) -> None:
    """Flip one byte in the middle of a shard's chunks (the file is mostly zero padding up to Riegeli's 64 KiB
    blocks; a byte there is read by no record, though its SHA-256 still changes)."""
    data = bytearray(open(path, "rb").read())
    used = np.flatnonzero(np.frombuffer(bytes(data), np.uint8))
    data[used[len(used) // 2]] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_a_flipped_byte_is_refused_when_the_codes_are_opened(tmp_path):
    directory = write_codes(tmp_path, 10)
    flip_a_byte(os.path.join(directory, "shard-00001-00001.array_record"))
    with pytest.raises(ValueError, match=r"1 of the 3 shards of .* do not hold what was written: "
                       r".*shard-00001-00001.array_record: its SHA-256 differs from the one recorded when it was "
                       r"written \(corrupt\); run the extraction again \(same command and --workdir\)"):
        codes.open_codes(directory)


def test_an_unverified_corrupt_record_names_its_shard_and_record(tmp_path):
    directory = write_codes(tmp_path, 10)
    flip_a_byte(os.path.join(directory, "shard-00001-00001.array_record"))
    dataset = codes.open_codes(directory, verify=False)
    failed = []
    for i in range(len(dataset)):
        try:
            np.testing.assert_array_equal(dataset[i]["codes"], image_codes(i, 5).reshape(5, TOKENS))
        except ValueError as error:
            failed.append(i)
            assert re.fullmatch(rf"record {i - 4} of shard .*shard-00001-00001.array_record \(item {i} of "
                                rf"{tmp_path}\) is unreadable: Corrupted Riegeli.*", str(error)), str(error)
    assert len(failed) == 1 and 4 <= failed[0] < 8  # one record of shard 1 (images 4-7), every other one reads
    with pytest.raises(ValueError, match=rf"record {failed[0] - 4} of shard .*shard-00001-00001.array_record"):
        stream(dataset, 3, global_batch=4)  # the GPT's stream reaches every image in its first epoch


@pytest.mark.parametrize("keep", ["half", "all but the last 100 bytes", "1000 bytes"])
def test_truncated_shard(tmp_path, keep):
    directory = write_codes(tmp_path, 10)
    path = os.path.join(directory, "shard-00001-00001.array_record")
    data = open(path, "rb").read()
    kept = {"half": len(data) // 2, "1000 bytes": 1000}.get(keep, len(data) - 100)
    open(path, "wb").write(data[:kept])
    with pytest.raises(ValueError, match=rf"shard-00001-00001.array_record: it is {kept:,} bytes, {len(data):,} when "
                       r"it was written \(truncated or overwritten\)"):
        codes.open_codes(directory)
    with pytest.raises(ValueError, match=r"shard .*shard-00001-00001.array_record is unreadable \(truncated or "
                       r"corrupt: .*\); delete it and run the extraction again"):
        codes.open_codes(directory, verify=False)


def test_a_version_1_directory_reads_without_checksums_and_says_so(tmp_path, caplog):
    directory = write_codes(tmp_path, 6)
    path = os.path.join(directory, codes.MANIFEST)
    manifest = json.load(open(path))
    manifest["version"] = 1
    for shard in manifest["shards"]:
        del shard["bytes"], shard["sha256"]
    json.dump(manifest, open(path, "w"))
    dataset = codes.open_codes(directory)
    assert [int(item["index"]) for item in dataset] == list(range(6))
    assert "is a version 1 codes directory: its shards carry no checksums" in caplog.text


def test_gpt_training_refuses_corrupt_codes_before_making_its_workdir(tmp_path):
    directory = write_synthetic_codes(tmp_path / "codes")
    flip_a_byte(os.path.join(directory, "shard-00001-00001.array_record"))
    workdir = tmp_path / "gpt"
    with pytest.raises(ValueError, match=r"shard-00001-00001.array_record: its SHA-256 differs"):
        tasks.run(gpt_config(directory), str(workdir))
    assert not workdir.exists()


def test_other_format_version(tmp_path):
    directory = write_codes(tmp_path, 4)
    path = os.path.join(directory, codes.MANIFEST)
    manifest = json.load(open(path))
    manifest["version"] = 99
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ValueError, match=r"'fvq_jax codes' version 99; this reader reads 'fvq_jax codes' versions "
                       r"\[1, 2\]"):
        codes.open_codes(directory)

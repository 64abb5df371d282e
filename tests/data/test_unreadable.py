"""Unreadable images are skipped, counted exactly (also across worker processes) and named."""

import grain
import numpy as np
import pytest

from fvq_jax.data import pipeline
from fvq_jax.data.unreadable import DropUnreadable, SkipLog, Unreadable
from tests.data.conftest import local_data_config, write_jpegs


def test_drop_unreadable_attaches_names_to_the_next_kept_example():
    good = [{"x": np.int32(i)} for i in range(4)]
    stream = [Unreadable("a", 10), good[0], good[1], Unreadable("b", 11), Unreadable("c", 12), good[2], good[3]]
    dataset = DropUnreadable(grain.MapDataset.source(stream).to_iter_dataset(), num_records=7, description="test")
    out = list(dataset)
    assert [int(e["x"]) for e in out] == [0, 1, 2, 3]
    assert [e["skipped"] for e in out] == ["a", "", "b\nc", ""]
    iterator = iter(dataset)
    next(iterator), next(iterator)
    state = iterator.get_state()
    rest = [int(e["x"]) for e in iterator]
    iterator.set_state(state)
    assert [int(e["x"]) for e in iterator] == rest == [2, 3]


def test_drop_unreadable_fails_when_every_record_fails():
    stream = [Unreadable(f"f{i}", i) for i in range(3)]
    dataset = DropUnreadable(grain.MapDataset.source(stream).repeat().to_iter_dataset(), num_records=3,
                             description="the test shard")
    with pytest.raises(ValueError, match="no readable image in the test shard: all 3 failed"):
        next(iter(dataset))


def test_skip_log_counts_names():
    log = SkipLog(count=5)
    log.record(np.array(["", "x.jpg\ny.png", "", "z"]))
    log.record(np.array(["", ""]))
    assert log.count == 8 and log.names == ["x.jpg", "y.png", "z"]


def test_each_unreadable_file_is_logged_once_with_its_reason(tmp_path, caplog):
    bad = broken_folder(tmp_path)
    cfg = local_data_config(source="folder", folder=str(tmp_path), image_size=16, train_crop="short_side",
                            num_workers=0, read_threads=2)
    iterator = pipeline.train_iterator(cfg, global_batch=4, seed=0, process_index=0, process_count=1)
    with caplog.at_level("INFO"):
        for _ in range(12):  # 8 epochs of the 6 good images: every bad file is skipped several times
            next(iterator)
    iterator.close()
    assert iterator.num_skipped >= 2 * len(bad)
    for name in bad:
        lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(lines) == 1, lines  # read-ahead decodes it many more times: none of those logs
        assert "Error" in lines[0] and "skipped unreadable image" in lines[0]


def broken_folder(root):
    """train/: 6 good images, one per class 0..5, plus class 6 (a truncated JPEG) and 7 (a text file, no extension)."""
    write_jpegs(root / "train", [1] * 6)
    jpeg = (root / "train" / "class_00" / "img_000.jpg").read_bytes()
    (root / "train" / "class_06").mkdir()
    (root / "train" / "class_06" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "train" / "class_07").mkdir()
    (root / "train" / "class_07" / "notes").write_text("not an image")
    return {"class_06/truncated.jpg", "class_07/notes"}


def consumed_records(state):
    """Records read so far, from the grain state (in-process: next_index; workers: the sum over workers)."""
    inner = state["pipeline"]
    return sum(s["next_index"] for s in inner["iterators_in_use_states"]) if "iterators_in_use_states" in inner \
        else inner["next_index"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_with_bad_files_trains_and_reports_them(tmp_path, num_workers):
    bad = broken_folder(tmp_path)
    cfg = local_data_config(source="folder", folder=str(tmp_path), image_size=16, train_crop="short_side",
                            num_workers=num_workers, read_threads=2)
    iterator = pipeline.train_iterator(cfg, global_batch=4, seed=0, process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(6)]  # 24 good images: 4 epochs of the 6 good ones
    state = iterator.get_state()
    labels = np.concatenate([b["label"] for b in batches])
    assert set(labels.tolist()) == set(range(6))  # bad files never yield anything
    assert iterator.num_skipped >= 6 and set(iterator.skipped_files) == bad
    # Exact: every record read and not yielded was counted, whichever process read it.
    assert iterator.num_skipped == consumed_records(state) - len(labels) == len(iterator.skipped_files)
    assert state["num_skipped"] == iterator.num_skipped
    following = [next(iterator) for _ in range(2)]
    iterator.close()

    resumed = pipeline.train_iterator(cfg, global_batch=4, seed=0, process_index=0, process_count=1)
    resumed.set_state(state)
    assert resumed.num_skipped == state["num_skipped"]
    for expected in following:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])
    resumed.close()


def test_no_readable_image_is_an_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_text("text")
    (tmp_path / "validation" / "a").mkdir(parents=True)
    (tmp_path / "validation" / "a" / "y.png").write_bytes(b"\x89PNG broken")
    cfg = local_data_config(source="folder", folder=str(tmp_path), image_size=8, read_threads=0)
    iterator = pipeline.train_iterator(cfg, global_batch=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no readable image in the training data of process 0 of 1"):
        next(iterator)
    with pytest.raises(ValueError, match="no readable image in the eval shard 0 of 1"):
        list(pipeline.eval_batches(cfg, batch_size=2, process_index=0, process_count=1))


def test_eval_masks_and_counts_a_non_image_with_an_image_extension(tmp_path):
    write_jpegs(tmp_path / "validation", [2, 2])
    (tmp_path / "validation" / "class_01" / "fake.JPEG").write_text("<html>not found</html>")
    cfg = local_data_config(source="folder", folder=str(tmp_path), image_size=8)
    batches = pipeline.eval_batches(cfg, batch_size=4, process_index=0, process_count=1)
    masks = np.concatenate([b["mask"] for b in batches])
    # Sorted records: class_00/img_000, img_001, class_01/fake.JPEG, img_000, img_001 (+3 padding).
    np.testing.assert_array_equal(masks, [True, True, False, True, True, False, False, False])
    assert batches.num_skipped == 1 and batches.skipped_files == ["class_01/fake.JPEG"]

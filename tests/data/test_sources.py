"""Sources: folder layout and labels, the photo split, and TFDS array_record through tfds.testing.mock_data."""

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fvq_jax import config_lib
from fvq_jax.data import sources
from tests.data.conftest import write_jpegs


def test_folder_records_are_sorted_with_class_index_labels(tmp_path):
    decoded = write_jpegs(tmp_path / "train", [2, 0, 3])
    (tmp_path / "train" / "class_00" / ".DS_Store").write_text("hidden")
    (tmp_path / "train" / "class_02" / "README").write_text("a stray file")
    (tmp_path / "train" / "LOC_synset_mapping.txt").write_text("no class")
    source = sources.FolderSource(str(tmp_path), "train")
    assert source.classes == ["class_00", "class_01", "class_02"]
    names = [source[i]["name"] for i in range(len(source))]
    assert names == ["class_00/img_000.jpg", "class_00/img_001.jpg", "class_02/README", "class_02/img_000.jpg",
                     "class_02/img_001.jpg", "class_02/img_002.jpg"]
    assert [source[i]["label"] for i in range(len(source))] == [0, 0, 2, 2, 2, 2]
    good = [i for i in range(len(source)) if not names[i].endswith("README")]
    for i, pixels in zip(good, decoded):
        np.testing.assert_array_equal(np.asarray(sources.load_image(source[i])), pixels)
    with pytest.raises(OSError):
        sources.load_image(source[2])


def test_folder_errors_name_the_field(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="data.folder.*no folder"):
        sources.FolderSource(str(tmp_path), "train")
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(config_lib.ConfigError, match="data.folder.*no files"):
        sources.FolderSource(str(tmp_path), "train")


def test_photos_hold_out_the_eval_photos():
    train = sources.PhotoSource(train=True, image_size=64)
    held_out = sources.PhotoSource(train=False, image_size=64)
    train_labels = {train[i]["label"] for i in range(len(train))}
    eval_labels = {held_out[i]["label"] for i in range(len(held_out))}
    assert train_labels.isdisjoint(eval_labels)
    assert {sources.PHOTOS[label] for label in eval_labels} == set(sources.EVAL_PHOTOS)
    assert len(train) == len(sources.PHOTOS) - len(sources.EVAL_PHOTOS)
    for i in range(len(train)):
        pixels = train[i]["pixels"]
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    # chelsea 300x451 and coffee 400x600: grids 1..4 all have sides >= 64 -> 1 + 4 + 9 + 16 crops each.
    assert len(held_out) == 60
    assert all(min(held_out[i]["pixels"].shape[:2]) >= 64 for i in range(len(held_out)))
    assert len(sources.PhotoSource(train=False, image_size=256)) == 2  # only the whole-photo squares


def test_split_source_and_class_names(tmp_path):
    data = ml_collections.ConfigDict(dict(source="photos", train_split="train", eval_split="validation",
                                          image_size=64, folder="", tfds_name="", tfds_data_dir=""))
    assert len(sources.split_source(data, "train")) == len(sources.PHOTOS) - len(sources.EVAL_PHOTOS)
    assert len(sources.split_source(data, "validation")) == 60
    assert sources.class_names(sources.split_source(data, "train")) == sources.PHOTOS
    with pytest.raises(config_lib.ConfigError, match=r"data.split: the photos have the splits \['train', "
                       r"'validation'\], not 'test'"):
        sources.split_source(data, "test")
    write_jpegs(tmp_path / "val", [1, 2])
    data.update(source="folder", folder=str(tmp_path))
    folder = sources.split_source(data, "val")
    assert len(folder) == 3 and sources.class_names(folder) == ("class_00", "class_01")


def test_eval_boxes_cover_the_photo_evenly():
    boxes = sources.eval_boxes((300, 451), 64)
    assert boxes[0] == (0, 75, 300)  # centred square
    grid2 = [b for b in boxes if b[2] == 150]
    assert sorted({b[0] for b in grid2}) == [0, 150] and sorted({b[1] for b in grid2}) == [0, 301]
    assert all(0 <= t and t + s <= 300 and 0 <= l and l + s <= 451 for t, l, s in boxes)


def test_tfds_source_under_mock_data():
    # mock_data serves tfds.data_source (array_record) with random JPEGs; SkipDecoding keeps the bytes.
    with tfds.testing.mock_data(num_examples=6):
        source = sources.TfdsSource("imagenet2012", "validation")
        decoded = tfds.data_source("imagenet2012", split="validation")  # what TFDS itself would decode
        image_feature = tfds.builder("imagenet2012").info.features["image"]
        assert len(source) == 6
        assert sources.class_names(source)[:2] == ("n01440764", "n01443537") and len(source.classes) == 1000
        for i in range(len(source)):
            record = source[i]
            assert isinstance(record["encoded"], bytes) and record["name"].startswith(f"validation[{i}]")
            assert record["label"] == int(decoded[i]["label"])
            pixels = np.asarray(sources.load_image(record))
            assert pixels.shape == decoded[i]["image"].shape
            np.testing.assert_array_equal(pixels, image_feature.decode_example_np(record["encoded"]))


def test_tfds_not_prepared_names_the_data_dir(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"data.tfds_data_dir: imagenet2012 is not prepared under "
                       r".*imagenet2012.*tfds build imagenet2012 .*--file_format=array_record") as info:
        sources.TfdsSource("imagenet2012", "train", str(tmp_path / "nowhere"))
    assert "TFRECORD" not in str(info.value)
    with pytest.raises(config_lib.ConfigError, match="data.tfds_name: TFDS has no dataset 'no_such_dataset'"):
        sources.TfdsSource("no_such_dataset", "train", str(tmp_path))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    levels = np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)  # a 16-bit greyscale PNG
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(sources.load_image({"path": str(path), "name": "deep.png", "label": 0, "index": 0}))
    assert pixels.shape == (48, 64, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    np.testing.assert_allclose(pixels[..., 0], levels * 255.0 / 65535.0, atol=0.5 + 1e-9)
    assert (pixels == 255).mean() < 0.01  # clipping would saturate ~99% of these pixels

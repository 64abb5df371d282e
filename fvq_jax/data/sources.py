"""Where training and evaluation images come from: TFDS array_record, an image folder, sample photos.

Every source is a random-access sequence of records, dicts with
  'label': int, 'name': str (for logs), 'index': int (position in the source), and one of
  'path' (a file to decode), 'encoded' (encoded image bytes) or 'pixels' (uint8 [H, W, 3]).
`load_image(record)` turns a record into an RGB PIL image, raising on unreadable data; the
pipeline decides what to do about that (fvq_jax.data.unreadable).

ImageNet through TFDS (array_record, read without TensorFlow at run time):
  put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in
  <data_dir>/downloads/manual/, then, once:
    tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record
  (about 150 GB of disk and a few hours on one machine), and train with
    --config.data.source=tfds --config.data.tfds_data_dir=<data_dir>.
ImageNet as a folder: <root>/train/<wnid>/*.JPEG and <root>/validation/<wnid>/*.JPEG (the
validation images sorted into class folders), --config.data.source=folder --config.data.folder=<root>.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from fvq_jax import config_lib

Record = dict[str, Any]

# scikit-image's colour photos that ship with the package (no download). Labels are positions here.
PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle_left", "stereo_motorcycle_right", "colorwheel", "logo", "chelsea", "coffee")
EVAL_PHOTOS = ("chelsea", "coffee")  # held out: the eval crops come from these, training never sees them
# Eval crops of a held-out photo: for each k, a k x k grid of squares of side short_side // k,
# kept while that side is at least the image size (no upsampled eval images).
EVAL_GRIDS = (1, 2, 3, 4)


# PIL's modes for 16-bit greyscale (PNG, TIFF): 0..65535. convert("RGB") would clip them at 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(record: Record) -> Image.Image:
    """The record's image as 8-bit RGB (CMYK, greyscale, palette and alpha converted; alpha dropped;
    16-bit greyscale scaled to 8 bits)."""
    if "pixels" in record:
        return Image.fromarray(record["pixels"])
    image = Image.open(record["path"] if "path" in record else io.BytesIO(record["encoded"]))
    image.load()  # decode the whole file now, so that a truncated JPEG raises here and not in a crop
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((levels + 128) // 257).astype(np.uint8), "L")  # round(x * 255 / 65535)
    return image if image.mode == "RGB" else image.convert("RGB")


class FolderSource(Sequence[Record]):
    """<root>/<split>/<class>/<file>: every non-hidden file of a class folder is a record.

    Labels are class folder positions in sorted order. Files are recognised by content, not
    extension, so a PNG saved as .JPEG decodes and a stray non-image file is reported as
    unreadable when it is read. Files directly under <root>/<split> belong to no class and are ignored.
    """

    def __init__(self, root: str, split: str):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise config_lib.ConfigError("data.folder", f"no folder {split_dir!r} (expected <folder>/<split>/<class>/)")
        self.classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
        files, labels = [], []
        for label, name in enumerate(self.classes):
            names = sorted(e.name for e in os.scandir(os.path.join(split_dir, name))
                           if e.is_file() and not e.name.startswith("."))
            files += [os.fsencode(os.path.join(name, f)) for f in names]
            labels += [label] * len(names)
        if not files:
            raise config_lib.ConfigError("data.folder", f"{split_dir!r} has no files in class folders")
        # Byte-string and int arrays: ImageNet's 1.28M names pickle to each worker process in ~40 MB.
        self._files = np.array(files, dtype=bytes)
        self._labels = np.array(labels, dtype=np.int32)
        self._split_dir = split_dir

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> Record:
        name = os.fsdecode(self._files[index])
        return dict(path=os.path.join(self._split_dir, name), name=name, label=int(self._labels[index]), index=index)


class TfdsSource(Sequence[Record]):
    """A TFDS dataset prepared as array_record, e.g. imagenet2012; images stay encoded until `load_image`."""

    def __init__(self, name: str, split: str, data_dir: str = ""):
        import tensorflow_datasets as tfds  # heavy import, only for this source

        # download=False: a missing dataset is an error here, never a download at train time.
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                            decoders={"image": tfds.decode.SkipDecoding()})
        except tfds.core.registered.DatasetNotFoundError:
            raise config_lib.ConfigError("data.tfds_name", f"TFDS has no dataset {name!r}") from None
        except (NotImplementedError, AssertionError, FileNotFoundError, ValueError) as error:
            raise _not_prepared(tfds.builder(name, data_dir=data_dir or None), name, data_dir) from error
        if len(self._source) == 0:
            raise config_lib.ConfigError("data.tfds_name", f"{name}/{split} has no examples")
        self._split = split
        try:  # a ClassLabel's names, e.g. ImageNet's WordNet ids
            self.classes = list(self._source.dataset_info.features["label"].names) or None
        except (AttributeError, KeyError, TypeError):
            self.classes = None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        example = self._source[index]
        name = example.get("file_name", "")
        name = np.asarray(name).item() if not isinstance(name, str) else name
        name = name.decode() if isinstance(name, bytes) else name
        return dict(encoded=example["image"], label=int(example["label"]), index=index,
                    name=f"{self._split}[{index}] {name}".rstrip())


def _not_prepared(builder, name: str, data_dir: str) -> config_lib.ConfigError:
    """Why TFDS cannot serve `name` at random access: not prepared there, or not as array_record."""
    build = f"tfds build {name} --data_dir=<dir> --file_format=array_record"
    if not builder.is_prepared():
        return config_lib.ConfigError("data.tfds_data_dir", f"{name} is not prepared under {builder.data_dir} "
                                      f"(data dir {data_dir or 'TFDS default'!r}); prepare it once with `{build}` "
                                      "(see fvq_jax/data/sources.py) and pass that dir")
    return config_lib.ConfigError("data.tfds_data_dir", f"{name} under {builder.data_dir} is prepared as "
                                  f"{builder.info.file_format}; random access needs array_record: `{build}`")


class PhotoSource(Sequence[Record]):
    """scikit-image's sample photos: whole training photos, or the fixed eval crops of the held-out ones.

    train=True: one record per training photo (PHOTOS less EVAL_PHOTOS); random crops make the variety.
    train=False: square crops of EVAL_PHOTOS on the EVAL_GRIDS grids with side >= image_size.
    """
    classes = PHOTOS

    def __init__(self, *, train: bool, image_size: int):
        names = [n for n in PHOTOS if (n in EVAL_PHOTOS) != train]
        self._records: list[Record] = []
        for name in names:
            pixels, label = load_photo(name), PHOTOS.index(name)
            boxes = [None] if train else eval_boxes(pixels.shape[:2], image_size)
            for box in boxes:
                crop = pixels if box is None else pixels[box[0]:box[0] + box[2], box[1]:box[1] + box[2]]
                tag = name if box is None else f"{name}[y={box[0]},x={box[1]},side={box[2]}]"
                self._records.append(dict(pixels=crop, label=label, name=tag, index=len(self._records)))
        if not self._records:
            raise config_lib.ConfigError("data.image_size", f"{image_size} is larger than every held-out photo")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        return self._records[index]


def load_photo(name: str) -> np.ndarray:
    """A PHOTOS entry as uint8 [H, W, 3] (the stereo pair split into two photos, the logo's alpha dropped)."""
    from skimage import data as skdata

    if name.startswith("stereo_motorcycle_"):
        left, right, _ = skdata.stereo_motorcycle()
        return left if name.endswith("left") else right
    return np.ascontiguousarray(getattr(skdata, name)()[..., :3])


def eval_boxes(shape: tuple[int, int], image_size: int) -> list[tuple[int, int, int]]:
    """(top, left, side) squares: for k in EVAL_GRIDS, k x k evenly spread squares of side short // k."""
    height, width = shape
    boxes = []
    for k in EVAL_GRIDS:
        side = min(height, width) // k
        if side < image_size:
            continue
        tops = _spread(height - side, k)
        lefts = _spread(width - side, k)
        boxes += [(t, l, side) for t in tops for l in lefts]
    return boxes


def _spread(slack: int, k: int) -> list[int]:
    """k offsets from 0 to slack inclusive, evenly spaced; the centre when k == 1."""
    if k == 1:
        return [slack // 2]
    return [math.floor(slack * i / (k - 1) + 0.5) for i in range(k)]


def make_source(data_cfg, *, train: bool) -> Sequence[Record]:
    """The source named by data_cfg.source, for training or for evaluation."""
    return split_source(data_cfg, data_cfg.train_split if train else data_cfg.eval_split)


def split_source(data_cfg, split: str) -> Sequence[Record]:
    """The records of `split` of data_cfg.source. The photos have two splits, data_cfg.train_split (the
    whole training photos) and data_cfg.eval_split (the held-out photos' fixed crops)."""
    if data_cfg.source == "tfds":
        return TfdsSource(data_cfg.tfds_name, split, data_cfg.tfds_data_dir)
    if data_cfg.source == "folder":
        return FolderSource(data_cfg.folder, split)
    splits = (data_cfg.train_split, data_cfg.eval_split)
    config_lib.require(split in splits, "data.split", f"the photos have the splits {list(splits)}, not {split!r}")
    return PhotoSource(train=split == data_cfg.train_split, image_size=data_cfg.image_size)


def class_names(source: Sequence[Record]) -> tuple[str, ...] | None:
    """The names of a source's labels, position = label: folder names, TFDS label names, PHOTOS; None if unknown."""
    names = getattr(source, "classes", None)
    return None if names is None else tuple(names)

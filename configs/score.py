"""Scores of generated samples (the sampling job's output) against a reference.

  python -m fvq_jax.main --config=configs/score.py --workdir=workdir/gpt_photos/samples/NAME
      the toy chain: against random training views of the nine built-in photos (zoom crops at the
      samples' resolution, as many as there are samples), labels = the photos: class consistency;
  python -m fvq_jax.main --config=configs/score.py:reconstruct=true --workdir=workdir/gpt_photos/samples/NAME
      the same views encoded and decoded by the samples' tokenizer first: the GPT against what its tokenizer
      can show (at toy scale a weak tokenizer otherwise dominates every score);
  python -m fvq_jax.main --config=configs/score.py:ref=VIRTUAL_imagenet256_labeled.npz --workdir=SAMPLES
      the gFID protocol: ADM's reference batch (its mu / sigma for FID, its images for precision / recall,
      its labels, when it has them, for class consistency);
  python -m fvq_jax.main --config=configs/score.py:ref=/data/my_folder,split=validation,crop=center \\
      --workdir=SAMPLES
      an image folder (<folder>/<split>/<class>/*), here its validation split's ADM center crops;
  python -m fvq_jax.main --config=configs/score.py:ref=tfds:imagenet2012,split=validation,crop=center \\
      --config.reference.tfds_data_dir=/data/tfds --workdir=SAMPLES

`ref` names the reference in one value (`reference_fields`): `photos`, an ADM batch `PATH.npz`,
`tfds:NAME`, or else an image folder. The reference's Inception features are computed once and cached
beside it (`reference.cache_dir`; see fvq_jax/evaluation/feature_cache.py). Writes SAMPLES/scores.json
(gfid, inception_score, precision, recall, class_consistency and its chance level, with sampling.json's
settings copied in) and prints one line. Any field can also be set with --config.<field>=<value>; the
metrics are described in fvq_jax/evaluation/scoring.py.
"""

import ml_collections

from fvq_jax import config_lib

# Short argument keys -> (config field, a value of the field's type); `ref` sets several (reference_fields).
KEYS = {
    "ref": (lambda config, ref: config.reference.update(reference_fields(ref)), "photos"),
    "split": ("reference.split", "train"),
    "crop": ("reference.crop", "train"),
    "images": ("reference.num_images", 0),
    "res": ("reference.image_size", 0),
    "seed": ("reference.seed", 0),
    "reconstruct": ("reference.reconstruct", False),
    "cache": ("reference.cache_dir", ""),
    "batch": ("score.batch_size", 50),
    "k": ("score.nearest_k", 3),
}


def reference_fields(ref: str) -> dict:
    """The `reference` fields that `ref` names: 'photos', 'tfds:NAME', 'PATH.npz' (an ADM-style batch), or else
    an image folder PATH (PATH/<split>/<class>/*)."""
    if ref == "photos":
        return dict(npz="", source="photos")
    if ref.startswith("tfds:"):
        return dict(npz="", source="tfds", tfds_name=ref.removeprefix("tfds:"))
    if ref.endswith(".npz"):
        return dict(npz=ref)
    return dict(npz="", source="folder", folder=ref)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.config_from_arg(arg, base_config, keys=KEYS)


def base_config(_: set[str]) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "score"
    config.score = dict(
        batch_size=50,  # Inception batch (every batch padded to it: one compiled program)
        nearest_k=3,  # precision / recall: the k-th neighbour sets each point's radius
        chunk=1000,  # rows of a distance matrix computed at a time ([chunk, N])
        is_splits=10,  # Inception Score: parts (fewer when a part would hold less than 2 samples)
        inception="",  # exported Inception weights (.npz); '' = $FVQ_INCEPTION_WEIGHTS or the cache
    )
    config.reference = dict(
        npz="",  # an ADM-style reference batch (mu / sigma and / or arr_0 images, arr_1 labels); '' = the data below
        source="photos",  # photos | tfds | folder (photos: the nine training photos, whatever the split)
        tfds_name="imagenet2012",
        tfds_data_dir="",
        folder="",
        split="train",
        crop="train",  # train: random training views (train_crop, flip); center: the ADM center crop
        image_size=0,  # 0 = the samples' resolution
        num_images=0,  # 0 = crop train: as many as there are samples; crop center: the whole split
        seed=0,  # the training views' randomness
        reconstruct=False,  # true: encode and decode the reference by the samples' tokenizer (sampling.json) first
        cache_dir="",  # reference features: '' = beside the reference, 'none' = not cached, else this directory
        train_crop="zoom",  # zoom | short_side (see configs/tokenizer.py)
        max_resize_ratio=1.25,
        flip=True,
        num_workers=0,
        read_threads=2,
        prefetch_buffer=2,
    )
    return config

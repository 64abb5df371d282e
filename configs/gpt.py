"""Class-conditional GPT (LlamaGen) training on extracted tokenizer codes.

  python -m fvq_jax.main --config=configs/gpt.py --workdir=workdir/gpt_photos
      the default: a small GPT (GPT-S) on the codes of the default tokenizer run, extracted with
      configs/extract_codes.py into workdir/photo_codes (each training photo its own class), minutes on a CPU;
  python -m fvq_jax.main --config=configs/gpt.py:paper,model=GPT-L,codes=gs://.../codes --workdir=gs://...
      the reference recipe: GPT-L, batch 2048, 300 epochs of ImageNet (ten-crop codes), bf16;
  python -m fvq_jax.main --config=configs/gpt.py:paper,model=GPT-XL,batch=1024,epochs=350 ...

The vocabulary (the tokenizer's K), the token grid and the number of classes come from the codes'
manifest; `model.*` fields left None are filled from it and saved with every checkpoint, so a run
rebuilds its GPT without the codes. Any field can also be set with --config.<field>=<value>.
"""

import ml_collections

from fvq_jax import config_lib, sharding
from fvq_jax.models import gpt

FLAGS = ("paper", "local")
# Short argument keys -> (config field, a value of the field's type).
KEYS = {
    "model": ("model.preset", "GPT-S"),
    "codes": ("codes.dir", ""),
    "batch": ("train.global_batch", 16),
    "steps": ("train.num_steps", 300),
    "epochs": ("train.num_epochs", 0.0),
    "min_steps": ("train.min_steps", 0),
    "lr": ("optim.base_lr", 1e-4),
    "precision": ("precision", "fp32"),
    "seed": ("seed", 0),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.config_from_arg(arg, base_config, keys=KEYS, flags=FLAGS)


def base_config(flags: set[str]) -> ml_collections.ConfigDict:
    return paper_config() if "paper" in flags else local_config()


def paper_config() -> ml_collections.ConfigDict:
    """LlamaGen's c2i recipe (fvq_method.md): GPT-L, batch 2048, 300 epochs, AdamW (0.9, 0.95), wd 0.05."""
    config = ml_collections.ConfigDict()
    config.task = "gpt"
    config.seed = 0
    config.precision = "bf16"  # compute dtype; parameters, norms, softmax statistics and logits stay float32

    config.codes = dict(
        dir="",  # an extract_codes output directory (manifest.json + array_record shards)
        num_workers=0,  # grain worker processes per host
        read_threads=4,
        prefetch_buffer=2,
    )

    # Every field at GPTConfig's default (fvq_jax/models/gpt.py documents them); vocab_size, num_classes and grid
    # None: the codes' (their K, classes and token grid side); dim, n_layer, n_head, ffn_dim None: the preset's.
    # scan_layers: one compiled block whatever the depth (the deep presets' steps compile 3-5x faster: RESULTS.md);
    # remat: none | full | dots_saveable (what each block keeps for the backward pass: memory for FLOPs).
    config.model = gpt.model_block(preset="GPT-L", scan_layers=True)  # GPT-B | -L | -XL | -XXL | -3B | -S | -tiny

    config.loss = dict(
        chunk_size=4096,  # tokens whose [tokens, K] logits exist at once; 0 = the whole batch
    )

    config.optim = dict(
        base_lr=1e-4,  # at global batch lr_ref_batch; scaled linearly with the global batch
        lr_ref_batch=256,
        b1=0.9,
        b2=0.95,
        weight_decay=0.05,  # on >= 2-D parameters only
        grad_clip=1.0,
        schedule="lin",  # constant for decay_start of the steps, then linear to final_mult
        warmup_steps=0,
        warmup_start=0.005,
        decay_start=0.05,
        final_mult=0.01,
        ema_decay=0.0,  # EMA of the weights; 0 = off
    )

    config.train = dict(
        global_batch=2048,
        num_steps=0,  # 0: max(min_steps, ceil(num_epochs x the codes' images / global_batch))
        num_epochs=300.0,  # passes over the codes' images (one grid of each image per pass); when num_steps is 0
        min_steps=0,  # the fewest steps num_epochs may give
        log_every=100,
        checkpoint_every=5_000,
        keep_checkpoints=3,
        keep_every=50_000,
        sample_every=10_000,  # a sample grid in TensorBoard and workdir/samples/; 0 = never
        restore_step=0,
        allow_changes="",
        init_from="",  # a GPT run or export whose weights start a new run (fine-tuning)
    )

    # The periodic sample grids; configs/sample.py samples (and scores) at scale.
    config.sample = dict(
        classes=16,  # grid rows: the codes' classes 0, 1, ... up to the last one with images, at most this many
        per_class=8,
        cfg_scale=1.75,
        cfg_schedule="constant",
        cfg_interval=(0.0, 1.0),
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        use_ema=True,
    )

    config.mesh = sharding.default_mesh_config()
    return config


def local_config() -> ml_collections.ConfigDict:
    """The default: GPT-S on the default tokenizer's codes of the built-in photos; minutes on a 2-core CPU."""
    config = paper_config()
    config.precision = "fp32"
    config.codes.dir = "workdir/photo_codes"
    config.codes.read_threads = 1
    config.model.preset = "GPT-S"
    config.model.scan_layers = False  # the looped layers: this run's logged numbers stay those it always gave
    config.loss.chunk_size = 0  # K = 1,024: the logits of a batch are small
    config.optim.base_lr = 1e-3  # a short run on a small set: well above the recipe's 1e-4 x 16 / 256
    config.optim.lr_ref_batch = 16
    # 4 passes over the codes' images, at least 300 steps: the 9 photos train 300 steps at batch 16 (533 passes
    # over few images, each seen in 128 views), a folder of 6,000 images 1,500 steps.
    config.train.update(global_batch=16, num_steps=0, num_epochs=4.0, min_steps=300, log_every=20,
                        checkpoint_every=100, sample_every=100)
    config.sample.update(per_class=4, cfg_scale=2.0)
    return config

"""FVQ tokenizer training.

  python -m fvq_jax.main --config=configs/tokenizer.py --workdir=/tmp/fvq
      the default: a small FVQ tokenizer on the built-in sample photos, minutes on a CPU;
  python -m fvq_jax.main --config=configs/tokenizer.py:paper --workdir=gs://.../fvq16k
      the reference recipe: VQ-16, K=16384, D=256, VQBridge L/4, ImageNet 256x256, batch 128;
  python -m fvq_jax.main --config=configs/tokenizer.py:paper,codebook=262144,bridge=L/8 ...
  python -m fvq_jax.main --config=configs/tokenizer.py:tiny --workdir=/tmp/smoke
      a tokenizer small enough for smoke tests (seconds per step on a CPU).

The argument is a comma-separated list of words and key=value pairs (see KEYS); any field can
also be set with --config.<field>=<value>.
"""

from fvq_jax import config_lib, sharding
from fvq_jax.models.factory import arch_fields

import ml_collections

FLAGS = ("paper", "local", "tiny")
# Short argument keys -> (config field, default in the local variant).
KEYS = {
    "codebook": ("quantizer.codebook_size", 1024),
    "dim": ("quantizer.code_dim", 32),
    "bridge": ("quantizer.projector", "S/4"),
    "quantizer": ("quantizer.type", "vq"),
    "model": (lambda config, preset: setattr(config, "model", ml_collections.ConfigDict(
        LOCAL_ARCH if preset == "local" else arch_fields(preset))), "local"),
    "res": ("data.image_size", 64),
    "batch": ("train.global_batch", 8),
    "steps": ("train.num_steps", 360),
    "schedule": ("optim.schedule", "lin"),
    "data": ("data.source", "photos"),
    "precision": ("precision", "fp32"),
    "seed": ("seed", 0),
}

# The CPU-sized encoder/decoder of the local variant: 64x64 images -> 16x16 tokens.
LOCAL_ARCH = dict(preset="local", ch=32, ch_mult=(1, 2, 2), enc_blocks=1, dec_blocks=1, z_channels=64,
                  norm_groups=8)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.config_from_arg(arg, base_config, keys=KEYS, flags=FLAGS)


def base_config(flags: set[str]) -> ml_collections.ConfigDict:
    return paper_config() if "paper" in flags else tiny_config() if "tiny" in flags else local_config()


def paper_config() -> ml_collections.ConfigDict:
    """The reference FVQ recipe (fvq_method.md): ImageNet 256x256, 40 epochs at batch 128."""
    config = ml_collections.ConfigDict()
    config.task = "tokenizer"
    config.seed = 0
    config.precision = "bf16"  # compute dtype of the encoder/decoder/discriminator; params stay fp32

    config.model = arch_fields("VQ-16")

    config.quantizer = dict(
        type="vq",  # vq | residual | multiscale | ema
        codebook_size=16384,
        code_dim=256,
        projector="L/4",  # VQBridge preset, or none | lin/1 | lin/5
        beta=0.25,
        entropy_weight=0.0,
        entropy_temperature=0.01,
        l2_norm=False,
        search_precision="fp32",  # fp32 | tf32 | bf16 products
        search_tile=8192,  # codes per tile of the memory-bounded search; 0 = whole codebook at once
        search_token_chunk=0,
        search_impl="xla",  # xla (naive / tiled as search_tile says) | pallas (fused matmul + running argmin kernel)
        usage_window=0,  # 0 = FVQ's window (65,536 below K = 65,536, else K + 1)
        bridge_head_init_std=0.0,  # 0 = the method's zero-initialised bridge head; > 0 for the ablation study
        bridge_dtype="bf16",  # fp32 | bf16 activations of the projector (parameters, search, losses stay fp32), as autocast
        # Bands the VQBridge runs in (a divisor of sqrt(K) / patch; 1 = all at once): 8 takes a quantizer step at
        # K = 262,144 (L/8, 8,192 tokens) from 3.5 to 1.5 GiB, 1.36 with search_token_chunk=2048
        # (benchmarks/RESULTS.md); same values up to float rounding.
        bridge_chunks=1,
        # Not in the paper (off): every revive_every steps, re-seed the bridge head rows of in-patch positions
        # unused in the last revive_every steps' assignments from the most used position (+ revive_noise x its RMS
        # of noise), their Adam moments zeroed (fvq_jax/quantizers/bridge_positions.py). Needs type=vq + VQBridge.
        revive="off",  # off | copy
        revive_every=25,
        revive_noise=0.01,
        # Not in the paper (off), for codes unused in the whole usage window, in every step, through the projector
        # (a codebook-loss term of weight restart_weight; fvq_jax/quantizers/restart.py). Needs type=vq.
        #   pull:  each such code toward its nearest token of the batch (with revive='copy': every code alive at
        #          K = 1,024 / 4,096 in the CPU ablation, configs/sweeps/results/revive.md);
        #   claim: each token also picks its nearest such code and pulls it (at most one batch's worth of codes):
        #          the one when dead codes far outnumber a batch's tokens (92% at K = 16,384 there, pull 75%).
        restart="off",  # off | pull | claim
        restart_weight=1.0,
        residual_depth=4,  # type=residual: quantization depths sharing one codebook
        scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # type=multiscale: token grid per scale
        ema_decay=0.99,  # type=ema: codebook EMA decay
    )

    config.loss = dict(
        pixel="l2",  # l2 | l1
        pixel_weight=1.0,
        perceptual_weight=1.0,  # LPIPS(VGG16)
        codebook_weight=1.0,  # scales the quantizer's total loss
        disc_weight=0.5,
        disc_start=20_000,
        disc_loss="hinge",  # hinge | vanilla
        gen_loss="hinge",  # hinge | non_saturating
        adaptive_weight=False,
    )
    config.discriminator = dict(num_layers=3, filters=64)

    config.optim = dict(
        base_lr=1e-4,  # at global batch lr_ref_batch; scaled linearly with the global batch
        lr_ref_batch=128,
        b1=0.9,
        b2=0.95,
        weight_decay=0.0,
        grad_clip=1.0,
        schedule="lin",  # learning annealing: lin | cos | const
        warmup_steps=40_000,  # 4 of 40 epochs
        warmup_start=0.005,
        decay_start=0.3,  # T: fraction of post-warmup progress before the decay
        final_mult=0.01,
        ema_decay=0.0,  # EMA of the tokenizer weights; 0 = off (reference: 0.9999 when on)
    )

    config.data = dict(
        source="tfds",  # tfds | folder | photos
        tfds_name="imagenet2012",
        tfds_data_dir="",  # '' = TFDS default
        folder="",  # image folder root: <folder>/<split>/<class>/*.JPEG
        train_split="train",
        eval_split="validation",
        image_size=256,
        train_crop="short_side",  # short_side: the reference crop below; zoom: random-scale squares resized to S
        max_resize_ratio=1.25,  # short_side crop: short side resized to U[S, ratio*S], then S x S crop
        flip=True,
        num_workers=16,  # grain worker processes per host; 0 = in the main process
        read_threads=4,  # decoding threads per process (PIL releases the GIL while decoding and resizing)
        prefetch_buffer=2,  # batches buffered per worker process
    )

    config.train = dict(
        global_batch=128,
        num_steps=400_000,
        log_every=100,
        checkpoint_every=5_000,
        keep_checkpoints=3,  # the newest N, plus every keep_every-th step kept for good
        keep_every=50_000,
        image_every=5_000,
        eval_every=0,  # 0 = only at the end
        restore_step=0,  # resume from this saved step instead of the newest (later ones are set aside); 0 = newest
        allow_changes="",  # comma-separated config fields a resume may change, e.g. "train.num_steps"
    )

    config.eval = dict(
        batch_size=64,
        num_images=50_000,  # 0 = the whole eval split
        metrics=("psnr", "ssim", "lpips", "usage", "rfid"),
        reference_stats="",  # .npz of Inception statistics of the eval images; '' = compute and cache
    )

    # Device mesh: -1 = all remaining devices. fsdp > 1 splits every array of at least
    # fsdp_min_size elements (parameters, optimizer moments, EMA) over that axis; `rules` maps the
    # logical axis names that parameters carry to mesh axes (fvq_jax/sharding.py).
    config.mesh = sharding.default_mesh_config()
    return config


def local_config() -> ml_collections.ConfigDict:
    """The default: FVQ on the built-in sample photos at 64x64, a few minutes on a 2-core CPU."""
    config = paper_config()
    config.precision = "fp32"
    config.model = ml_collections.ConfigDict(LOCAL_ARCH)
    config.quantizer.codebook_size = 1024
    config.quantizer.code_dim = 32
    config.quantizer.projector = "S/4"
    config.quantizer.search_tile = 0  # 1,024 codes: one [tokens, K] matrix is small
    config.quantizer.bridge_dtype = "fp32"
    # A 6-minute run has no room for a long GAN phase: a late, gentle one (see README).
    config.loss.disc_start = 300
    config.loss.disc_weight = 0.1
    config.discriminator.filters = 32
    config.optim.base_lr = 1e-3
    config.optim.lr_ref_batch = 8
    config.optim.warmup_steps = 20
    config.data.source = "photos"
    config.data.image_size = 64
    config.data.train_crop = "zoom"  # a few large photos: crops from whole views to fine detail
    config.data.num_workers = 0
    config.data.read_threads = 2
    config.train.global_batch = 8
    config.train.num_steps = 360
    config.train.log_every = 20
    config.train.checkpoint_every = 120
    config.train.image_every = 120
    config.eval.batch_size = 16
    config.eval.num_images = 0
    config.eval.metrics = ("psnr", "ssim", "lpips", "usage")
    return config


def tiny_config() -> ml_collections.ConfigDict:
    """Seconds per step on a CPU, for smoke runs, tests and fault injection: 16x16 photos, 4x4 tokens, K = 64."""
    config = local_config()
    config.model.update(ch=16, ch_mult=(1, 2, 2), z_channels=16, norm_groups=4)
    config.quantizer.update(codebook_size=64, code_dim=8, projector="XS/2")
    config.discriminator.update(filters=8, num_layers=2)
    config.optim.update(warmup_steps=2, lr_ref_batch=4)
    config.loss.disc_start = 6
    config.data.image_size = 16
    config.train.update(global_batch=4, num_steps=12, log_every=1, checkpoint_every=4, image_every=0, eval_every=0)
    config.eval.update(batch_size=8, num_images=16, metrics=("psnr", "ssim", "lpips", "usage"))
    return config

"""Class-conditional GPT training on extracted codes: `train_and_evaluate(config, workdir)`, the GPT's parts of
the training program.

What the GPT brings to the program (program.py: workdir, lock, checkpoints, resume, metrics, the loop with
its guard and preemption): its config checks; `prepare`, which opens the codes (before the workdir exists, so
missing or corrupt codes refuse the run before anything is created) and resolves the config against their
manifest (vocabulary, classes, grid, the tokenizer that made them, the step count from epochs); the model and
the next-token step (gpt_step.py); the code input pipeline (fvq_jax/data/codes.py); periodic class-conditional
sample grids decoded through the tokenizer that made the codes; fine-tuning from another GPT's weights.

Reads top to bottom: resolve and check, model and update, fine-tuning init, then `build_parts`: input, step,
samples, console.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import ml_collections
from absl import logging
from flax import nnx

from fvq_jax import config_lib, sharding
from fvq_jax.data import codes as codes_data
from fvq_jax.evaluation import reports
from fvq_jax.models.factory import build_gpt, compute_dtype, COMPUTE_DTYPES
from fvq_jax.models.gpt import GPTConfig
from fvq_jax.models.load import load_gpt, load_recorded_tokenizer
from fvq_jax.sampling.images import Painter
from fvq_jax.sampling.sampler import SamplingConfig
from fvq_jax.train import checks, loop, program, schedules
from fvq_jax.train.optimizer import make_optimizer
from fvq_jax.train.state import StateLayout, TrainState, create_state, model_fields
from fvq_jax.train.gpt_step import make_train_step


CODES_FIELDS = ("vocab_size", "num_classes", "grid")  # model fields the codes determine


def resolve_config(config: ml_collections.ConfigDict, dataset) -> ml_collections.ConfigDict:
    """The config with what the codes (a data.codes.CodeDataset) determine filled in: model.vocab_size /
    num_classes / grid (when None; explicit values must agree), codes.tokenizer (the tokenizer that made them,
    which decodes the samples) and train.num_steps (when 0: `epoch_steps`). Its other fields are checked first
    (`check_config` on the config as given)."""
    config = ml_collections.ConfigDict(config.to_dict())
    h, w = dataset.grid
    config_lib.require(h == w, "codes.dir", f"the GPT's 2-D rotary embedding needs a square token grid, the codes "
                       f"are {h} x {w}")
    found = dict(vocab_size=dataset.codebook_size, num_classes=dataset.num_classes, grid=h)
    for name, value in found.items():
        if config.model[name] is None:
            config.model[name] = value
        given = config.model[name]
        fits = isinstance(given, int) and (given >= value if name == "num_classes" else given == value)
        config_lib.require(fits, f"model.{name}", f"{given!r} does not fit the codes in {config.codes.dir} "
                           f"({name} {value})")
    record = dataset.manifest["tokenizer"]
    config.codes.tokenizer = dict(path=record.get("path"), step=record.get("step"), weights=record.get("weights"))
    config_lib.require(not config.train.sample_every or record.get("path"), "train.sample_every",
                       f"the codes in {config.codes.dir} name no tokenizer to decode sample grids with; set 0")
    if not config.train.num_steps:
        config.train.num_steps = epoch_steps(config.train, len(dataset))
    return config


def epoch_steps(train: ml_collections.ConfigDict, num_images: int) -> int:
    """The step count of a run that does not set train.num_steps: num_epochs passes over the codes' images (one
    grid of each image per pass), but never fewer than min_steps:
    max(min_steps, ceil(num_epochs x images / global_batch)). The local default (4 epochs, at least 300 steps at
    batch 16) keeps the 9 photos at 300 steps and gives 6,000 images 1,500 steps."""
    return max(train.min_steps, math.ceil(train.num_epochs * num_images / train.global_batch))


def sample_rows(dataset, cap: int) -> int:
    """How many classes the sample grids show (classes 0 .. n-1, a row each): the codes' classes up to the last one
    that has images (held-out classes at the end, like the photos' two, have none), at most `cap`. Manifests that
    do not count images per class give all their classes."""
    counts = dataset.manifest.get("images_per_class")
    classes = dataset.num_classes if counts is None else 1 + max(c for c, n in enumerate(counts) if n)
    return min(cap, classes)


def sampling_config(sample_cfg: ml_collections.ConfigDict, field: str = "sample") -> SamplingConfig:
    """SamplingConfig of a `sample` block; ConfigError naming the field for a bad value."""
    try:
        return SamplingConfig(temperature=sample_cfg.temperature, top_k=sample_cfg.top_k, top_p=sample_cfg.top_p,
                              cfg_scale=sample_cfg.cfg_scale, cfg_schedule=sample_cfg.cfg_schedule,
                              cfg_interval=tuple(sample_cfg.cfg_interval))
    except ValueError as e:
        raise config_lib.ConfigError(field, str(e)) from None


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                 num_processes: int | None = None) -> None:
    """Every check of a GPT config (ConfigError naming the field). The fields the codes determine are checked once
    they are filled in: `prepare` checks the config as given, resolves it against the codes, and the program
    checks the result, now whole. On a config not resolved yet, the model block waits for model.vocab_size,
    num_classes and grid, and what depends on the step count for train.num_steps when it is 0 (from epochs)."""
    config_lib.require(bool(config.codes.dir), "codes.dir", "must name a directory written by configs/extract_codes.py")
    config_lib.require_choice(config.precision, "precision", tuple(COMPUTE_DTYPES))
    config_lib.require_number(config.loss.chunk_size, "loss.chunk_size", strict=False, integer=True)
    if all(config.model[name] is not None for name in CODES_FIELDS):
        GPTConfig.from_config(config.model, "model")
    checks.check_train_config(config, num_devices, num_processes, steps_from_epochs=True)
    config_lib.require_number(config.train.sample_every, "train.sample_every", strict=False, integer=True)
    sampling_config(config.sample)
    for name in ("classes", "per_class"):
        config_lib.require_number(config.sample[name], f"sample.{name}", integer=True)


def prepare(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, codes_data.CodeDataset]:
    """(the config resolved against its codes, the codes), before anything is created: the config as given is
    checked, then the codes are opened (a missing, unfinished or corrupt codes directory refuses the run here)."""
    check_config(config)
    dataset = codes_data.open_codes(config.codes.dir)
    return resolve_config(config, dataset), dataset


@dataclasses.dataclass
class Trainer:
    layout: StateLayout[TrainState]
    train_step: Callable  # jitted: (state, batch) -> (state, metrics); donates state
    batch_sharding: jax.sharding.NamedSharding


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
    """Optimizer, state layout (parameters sharded by the logical-axis rules), jitted init and step."""
    total_steps, global_batch = config.train.num_steps, config.train.global_batch
    tx = make_optimizer(config.optim, total_steps=total_steps, global_batch=global_batch)
    lr_schedule = schedules.learning_rate_schedule(config.optim, total_steps=total_steps, global_batch=global_batch)

    def build():
        model = build_gpt(config.model, dtype=compute_dtype(config.precision), rngs=nnx.Rngs(config.seed))
        graph, fields = model_fields(model, tx, keep_ema=bool(config.optim.ema_decay))
        return graph, TrainState(**fields)

    layout = create_state(build, mesh, config.mesh)
    batch_sharding = sharding.data_sharding(mesh)
    train_step = jax.jit(make_train_step(layout.graphs, config, tx, lr_schedule),
                         in_shardings=(layout.shardings, batch_sharding),
                         out_shardings=(layout.shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    return Trainer(layout, train_step, batch_sharding)


def _init_from(path: str, trainer: Trainer, config: ml_collections.ConfigDict) -> Callable[[], TrainState]:
    """The init of a fine-tuning run: a fresh state (new optimizer) holding the weights of the GPT at `path`
    (a run: its EMA weights if it kept them; or an export, e.g. an imported LlamaGen checkpoint)."""
    def init() -> TrainState:
        state = trainer.layout.init()
        source = load_gpt(path, mesh_cfg=config.mesh, scan_layers=config.model.scan_layers)
        params = nnx.state(source.model, nnx.Param)
        want = {k: v.shape for k, v in nnx.to_flat_state(state.params)}
        got = {k: v.shape for k, v in nnx.to_flat_state(params)}
        differ = sorted("/".join(map(str, k)) for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        config_lib.require(not differ, "train.init_from", f"{path} holds a GPT whose parameters differ from this "
                           f"run's in {len(differ)} arrays: {', '.join(differ[:8])}")
        params = jax.device_put(params, trainer.layout.shardings.params)
        logging.warning("Initialised from %s (step %s, %s weights)", path, source.step, source.weights)
        return state.replace(params=params, ema_params=params if state.ema_params is not None else None)
    return init


def build_parts(config: ml_collections.ConfigDict, context: program.Context) -> program.Parts:
    """The GPT's parts of the training program: the codes' batches, the step, sample grids, the console line."""
    dataset, global_batch = context.data, config.train.global_batch
    # ------------------------------------------------------------------ input
    train_iter = codes_data.train_iterator(dataset, global_batch=global_batch, seed=config.seed,
                                           num_workers=config.codes.num_workers, read_threads=config.codes.read_threads,
                                           prefetch_buffer=config.codes.prefetch_buffer)

    # ------------------------------------------------------------------ model and update
    trainer = build_trainer(config, context.mesh)

    # ------------------------------------------------------------------ samples
    rows = sample_rows(dataset, config.sample.classes)
    tokenizer = None

    def write_samples(step, state):
        nonlocal tokenizer
        if tokenizer is None:
            tokenizer = load_recorded_tokenizer(config.codes.tokenizer, mesh_cfg=config.mesh).model
        params, _ = state.inference_params(config.sample.use_ema)
        gpt = nnx.merge(trainer.layout.graphs, params, state.model_state)
        images = Painter(gpt, tokenizer, sampling_config(config.sample)).class_grid(rows, config.sample.per_class,
                                                                                      config.sample.seed)
        grid = reports.image_grid(images, columns=config.sample.per_class)
        context.writer.write_images(step, {"samples": grid[None]})
        if context.is_chief:
            reports.save_png(grid, context.workdir / "samples" / f"step_{step}.png")

    # ------------------------------------------------------------------ console
    def console(step, s):
        return (f"loss {s['loss']:.4f}  acc {100 * s['accuracy']:.1f}%  lr {s['lr']:.2e}  "
                f"grad {s['grad_norm']:.3f}  {s['tokens_per_sec']:,.0f} tok/s")

    return program.Parts(
        layout=trainer.layout, step=trainer.train_step, data=train_iter, batch_sharding=trainer.batch_sharding,
        console=console, rates={"tokens_per_sec": global_batch * config.model.grid ** 2,
                                "sequences_per_sec": global_batch},
        init=_init_from(config.train.init_from, trainer, config) if config.train.init_from else None,
        hooks=[loop.Periodic(config.train.sample_every, write_samples)])


RECIPE = program.Recipe("GPT", check_config, build_parts, prepare)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) the GPT in `workdir`; returns {"step": the last step}, or {"preempted_at_step": step}."""
    return program.train_and_evaluate(RECIPE, config, workdir)

"""Class-conditional GPT training on extracted codes: `train_and_evaluate(resolve(config), workdir)`, the GPT's
parts of the training program.

What the GPT brings to the program (program.py: workdir, lock, checkpoints, resume, metrics, the loop with
its guard and preemption): `resolve`, which reads the codes' manifest and resolves the config once against it
(vocabulary, classes, grid, the tokenizer that made them, the step count from epochs) into a `GPTRunSpec`;
`prepare`, which opens the codes, every shard verified (before the workdir exists, so missing or corrupt codes
refuse the run before anything is created); the model and the next-token step (gpt_step.py); the code input
pipeline (fvq_jax/data/codes.py); periodic class-conditional sample grids decoded through the tokenizer that
made the codes; fine-tuning from another GPT's weights.

Reads top to bottom: the spec and its resolution, model and update, fine-tuning init, then `build_parts`:
input, step, samples, console.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import ml_collections
from absl import logging
from flax import nnx

from fvq_jax import config_lib, sharding
from fvq_jax.data import codes as codes_data
from fvq_jax.evaluation import reports
from fvq_jax.models.gpt import GPT, GPTConfig
from fvq_jax.models.load import load_gpt, load_recorded_tokenizer
from fvq_jax.sampling.images import Painter
from fvq_jax.sampling.sampler import SamplingConfig
from fvq_jax.train import loop, program, schedules
from fvq_jax.train.gpt_step import LossSpec, make_train_step
from fvq_jax.train.optimizer import make_optimizer
from fvq_jax.train.spec import RunSpec, TrainSpec
from fvq_jax.train.state import StateLayout, TrainState, create_state, model_fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTTrainSpec(TrainSpec):
    """The GPT's `train` block: the shared fields, the step count from epochs (num_steps 0 as given: num_epochs
    passes over the codes' images, at least min_steps; `resolve` fills it in), sample grids, fine-tuning."""

    STEPS_FROM_EPOCHS = True

    num_epochs: float
    min_steps: int
    sample_every: int  # 0: never
    init_from: str  # a GPT run or export whose weights start a new run; '' = none

    def __post_init__(self):
        super().__post_init__()
        if not self.num_steps:
            config_lib.require_number(self.num_epochs, "num_epochs")
            config_lib.require_number(self.min_steps, "min_steps", strict=False, integer=True)
        config_lib.require_number(self.sample_every, "sample_every", strict=False, integer=True)
        config_lib.require(isinstance(self.init_from, str), "init_from",
                           f"must be a run or export directory or '', got {self.init_from!r}")


@dataclasses.dataclass(frozen=True)
class CodesSpec(config_lib.Spec):
    """The `codes` block: the directory (configs/extract_codes.py's output), how to read it, and the tokenizer
    that made the codes ({path, step, weights}, from their manifest; None until `resolve` fills it in)."""

    dir: str
    num_workers: int  # grain worker processes per host
    read_threads: int
    prefetch_buffer: int
    tokenizer: Mapping[str, Any] | None = None

    def __post_init__(self):
        config_lib.require(isinstance(self.dir, str), "dir", f"must be a directory, got {self.dir!r}")
        for name in ("num_workers", "read_threads"):
            config_lib.require_number(getattr(self, name), name, strict=False, integer=True)
        config_lib.require_number(self.prefetch_buffer, "prefetch_buffer", integer=True)


@dataclasses.dataclass(frozen=True)
class GridSpec(config_lib.Spec):
    """The `sample` block: the periodic sample grids (one row per class, `classes` at most, `per_class` columns)
    and the sampling numbers they are drawn with."""

    sampling: SamplingConfig = config_lib.inline()
    classes: int
    per_class: int
    seed: int
    use_ema: bool

    def __post_init__(self):
        for name in ("classes", "per_class"):
            config_lib.require_number(getattr(self, name), name, integer=True)
        config_lib.require_number(self.seed, "seed", strict=False, integer=True)
        config_lib.require(isinstance(self.use_ema, bool), "use_ema", f"must be true or false, got {self.use_ema!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTRunSpec(RunSpec):
    """configs/gpt.py resolved against its codes (`resolve`): the GPT (model.vocab_size, num_classes and grid
    filled in from the codes), the codes, the loss and the sample grids, beside the blocks of every run
    (train/spec.py; train.num_steps resolved from epochs)."""

    train: GPTTrainSpec
    model: GPTConfig
    codes: CodesSpec
    loss: LossSpec
    sample: GridSpec


def resolve(config: ml_collections.ConfigDict, num_devices: int | None = None,
            num_processes: int | None = None) -> GPTRunSpec:
    """Every check of a GPT config, before anything is built (ConfigError naming the field), once: the codes
    (their manifest and record counts; `prepare` verifies their checksums) fill in what they determine
    (model.vocab_size / num_classes / grid when None: explicit values must agree; codes.tokenizer, the tokenizer
    that made them, which decodes the sample grids; train.num_steps when 0: `epoch_steps`), and the filled config
    is resolved. A missing or unfinished codes directory is refused here. With the device and process counts, also
    that the batch splits over them."""
    config_lib.require(isinstance(config.codes.dir, str) and bool(config.codes.dir), "codes.dir",
                       "must name a directory written by configs/extract_codes.py")
    dataset = codes_data.open_codes(config.codes.dir, verify=False)
    h, w = dataset.grid
    config_lib.require(h == w, "codes.dir", f"the GPT's 2-D rotary embedding needs a square token grid, the codes "
                       f"are {h} x {w}")
    config = ml_collections.ConfigDict(config.to_dict())
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
    train = GPTTrainSpec.from_config(config.train, "train")
    config_lib.require(not train.sample_every or record.get("path"), "train.sample_every",
                       f"the codes in {config.codes.dir} name no tokenizer to decode sample grids with; set 0")
    if not train.num_steps:
        train = dataclasses.replace(train, num_steps=epoch_steps(train, len(dataset)))
        config.train.num_steps = train.num_steps
    spec = GPTRunSpec.from_config(config, train=train)
    spec.check_devices(num_devices, num_processes)
    return spec


def epoch_steps(train: GPTTrainSpec, num_images: int) -> int:
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


def prepare(spec: GPTRunSpec) -> codes_data.CodeDataset:
    """The codes, every shard's size and SHA-256 verified, before anything is created: a corrupt codes directory
    refuses the run here."""
    return codes_data.open_codes(spec.codes.dir)


@dataclasses.dataclass
class Trainer:
    layout: StateLayout[TrainState]
    train_step: Callable  # jitted: (state, batch) -> (state, metrics); donates state
    batch_sharding: jax.sharding.NamedSharding


def build_trainer(spec: GPTRunSpec, mesh: jax.sharding.Mesh) -> Trainer:
    """Optimizer, state layout (parameters sharded by the logical-axis rules), jitted init and step."""
    total_steps, global_batch = spec.train.num_steps, spec.train.global_batch
    tx = make_optimizer(spec.optim, total_steps=total_steps, global_batch=global_batch)
    lr_schedule = schedules.learning_rate_schedule(spec.optim, total_steps=total_steps, global_batch=global_batch)

    def build():
        model = GPT(spec.model, dtype=spec.dtype, rngs=nnx.Rngs(spec.seed))
        graph, fields = model_fields(model, tx, keep_ema=bool(spec.optim.ema_decay))
        return graph, TrainState(**fields)

    layout = create_state(build, mesh, spec.mesh)
    batch_sharding = sharding.data_sharding(mesh)
    step = make_train_step(layout.graphs, spec.loss, tx, lr_schedule, rules=spec.mesh.rules,
                           ema_decay=spec.optim.ema_decay, seed=spec.seed)
    train_step = jax.jit(step, in_shardings=(layout.shardings, batch_sharding),
                         out_shardings=(layout.shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    return Trainer(layout, train_step, batch_sharding)


def _init_from(trainer: Trainer, spec: GPTRunSpec) -> Callable[[], TrainState]:
    """The init of a fine-tuning run: a fresh state (new optimizer) holding the weights of the GPT at
    train.init_from (a run: its EMA weights if it kept them; or an export, e.g. an imported LlamaGen checkpoint)."""
    path = spec.train.init_from

    def init() -> TrainState:
        state = trainer.layout.init()
        source = load_gpt(path, mesh_cfg=spec.mesh, scan_layers=spec.model.scan_layers)
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


def build_parts(spec: GPTRunSpec, context: program.Context) -> program.Parts:
    """The GPT's parts of the training program: the codes' batches, the step, sample grids, the console line."""
    dataset, global_batch = context.data, spec.train.global_batch
    # ------------------------------------------------------------------ input
    train_iter = codes_data.train_iterator(dataset, global_batch=global_batch, seed=spec.seed,
                                           num_workers=spec.codes.num_workers, read_threads=spec.codes.read_threads,
                                           prefetch_buffer=spec.codes.prefetch_buffer)

    # ------------------------------------------------------------------ model and update
    trainer = build_trainer(spec, context.mesh)

    # ------------------------------------------------------------------ samples
    grid_spec = spec.sample
    rows = sample_rows(dataset, grid_spec.classes)
    tokenizer = None

    def write_samples(step, state):
        nonlocal tokenizer
        if tokenizer is None:
            tokenizer = load_recorded_tokenizer(spec.codes.tokenizer, mesh_cfg=spec.mesh).model
        params, _ = state.inference_params(grid_spec.use_ema)
        gpt = nnx.merge(trainer.layout.graphs, params, state.model_state)
        images = Painter(gpt, tokenizer, grid_spec.sampling).class_grid(rows, grid_spec.per_class, grid_spec.seed)
        grid = reports.image_grid(images, columns=grid_spec.per_class)
        context.writer.write_images(step, {"samples": grid[None]})
        if context.is_chief:
            reports.save_png(grid, context.workdir / "samples" / f"step_{step}.png")

    # ------------------------------------------------------------------ console
    def console(step, s):
        return (f"loss {s['loss']:.4f}  acc {100 * s['accuracy']:.1f}%  lr {s['lr']:.2e}  "
                f"grad {s['grad_norm']:.3f}  {s['tokens_per_sec']:,.0f} tok/s")

    return program.Parts(
        layout=trainer.layout, step=trainer.train_step, data=train_iter, batch_sharding=trainer.batch_sharding,
        console=console, rates={"tokens_per_sec": global_batch * spec.model.grid ** 2,
                                "sequences_per_sec": global_batch},
        init=_init_from(trainer, spec) if spec.train.init_from else None,
        hooks=[loop.Periodic(spec.train.sample_every, write_samples)])


RECIPE = program.Recipe("GPT", build_parts, prepare)


def train_and_evaluate(spec: GPTRunSpec, workdir: str) -> dict:
    """Train (or resume) the GPT `spec` (`resolve`) describes in `workdir`; returns {"step": the last step}, or
    {"preempted_at_step": step}."""
    return program.train_and_evaluate(RECIPE, spec, workdir)

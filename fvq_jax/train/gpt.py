"""Class-conditional GPT training on extracted codes: `train_and_evaluate(config, workdir)`.

What the GPT brings to the shared training machinery (fvq_jax/train: loop, resume, update guard,
lock, state): the model and its config resolved against the codes' manifest, the next-token step
(gpt_step.py), the code input pipeline (fvq_jax/data/codes.py) and periodic class-conditional
sample grids decoded through the tokenizer that made the codes.

Reads top to bottom: resolve and check, mesh, input, model and update, checkpoint, samples, loop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import nnx

from fvq_jax import checkpointing, config_lib, sharding
from fvq_jax.data import codes as codes_data, pipeline as data_pipeline
from fvq_jax.evaluation import reports
from fvq_jax.models.factory import build_gpt, compute_dtype, COMPUTE_DTYPES
from fvq_jax.models.gpt import GPTConfig
from fvq_jax.models.load import load_gpt, load_recorded_tokenizer
from fvq_jax.sampling.images import Painter
from fvq_jax.sampling.sampler import SamplingConfig
from fvq_jax.train import checks, loop, resume, schedules
from fvq_jax.train.lock import WorkdirLock
from fvq_jax.train.optimizer import make_optimizer
from fvq_jax.train.state import StateLayout, TrainState, create_state, model_fields, num_params
from fvq_jax.train.gpt_step import make_train_step


def resolve_config(config: ml_collections.ConfigDict, dataset) -> ml_collections.ConfigDict:
    """The config with what the codes (a data.codes.CodeDataset) determine filled in: model.vocab_size /
    num_classes / grid (when None; explicit values must agree), codes.tokenizer (the tokenizer that made them,
    which decodes the samples) and train.num_steps (when 0: num_epochs over the codes' images)."""
    config = ml_collections.ConfigDict(config.to_dict())
    h, w = dataset.grid
    config_lib.require(h == w, "codes.dir", f"the GPT's 2-D rotary embedding needs a square token grid, the codes "
                       f"are {h} x {w}")
    found = dict(vocab_size=dataset.codebook_size, num_classes=dataset.num_classes, grid=h)
    for name, value in found.items():
        if config.model[name] is None:
            config.model[name] = value
        fits = config.model[name] >= value if name == "num_classes" else config.model[name] == value
        config_lib.require(fits, f"model.{name}", f"{config.model[name]} does not fit the codes in {config.codes.dir} "
                           f"({name} {value})")
    record = dataset.manifest["tokenizer"]
    config.codes.tokenizer = dict(path=record.get("path"), step=record.get("step"), weights=record.get("weights"))
    config_lib.require(not config.train.sample_every or record.get("path"), "train.sample_every",
                       f"the codes in {config.codes.dir} name no tokenizer to decode sample grids with; set 0")
    if not config.train.num_steps:
        config_lib.require_number(config.train.num_epochs, "train.num_epochs")
        config.train.num_steps = math.ceil(config.train.num_epochs * len(dataset) / config.train.global_batch)
    return config


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
    """Every check that can run before anything is built (model fields once resolved against the codes)."""
    config_lib.require(bool(config.codes.dir), "codes.dir", "must name a directory written by configs/extract_codes.py")
    config_lib.require_choice(config.precision, "precision", tuple(COMPUTE_DTYPES))
    config_lib.require_number(config.loss.chunk_size, "loss.chunk_size", strict=False, integer=True)
    if config.model.vocab_size is not None:
        GPTConfig.from_config(config.model, "model")
    if config.train.num_steps:
        checks.check_train_config(config, num_devices, num_processes)
    config_lib.require_number(config.train.sample_every, "train.sample_every", strict=False, integer=True)
    sampling_config(config.sample)
    for name in ("classes", "per_class"):
        config_lib.require_number(config.sample[name], f"sample.{name}", integer=True)


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) the GPT in `workdir`; returns the last logged metrics, or {"preempted_at_step": step}."""
    check_config(config)
    dataset = codes_data.open_codes(config.codes.dir)
    config = resolve_config(config, dataset)
    GPTConfig.from_config(config.model, "model")
    checks.check_train_config(config, jax.device_count(), jax.process_count())
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    with WorkdirLock(workdir), jax.set_mesh(mesh):
        return _train_and_evaluate(config, workdir, mesh, dataset)


def _train_and_evaluate(config, workdir: epath.Path, mesh, dataset) -> dict:
    # ------------------------------------------------------------------ setup
    is_chief = jax.process_index() == 0
    # clu's metric writers import TensorFlow: only a training run needs them, not the step builders that the
    # benchmarks use on accelerator images without TensorFlow (benchmarks/suite.py).
    from clu import metric_writers
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief, asynchronous=False)
    total_steps, global_batch = config.train.num_steps, config.train.global_batch
    tokens_per_step = global_batch * config.model.grid ** 2
    logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

    # ------------------------------------------------------------------ input
    train_iter = codes_data.train_iterator(dataset, global_batch=global_batch, seed=config.seed,
                                           num_workers=config.codes.num_workers, read_threads=config.codes.read_threads,
                                           prefetch_buffer=config.codes.prefetch_buffer)

    # ------------------------------------------------------------------ model and update
    trainer = build_trainer(config, mesh)

    # ------------------------------------------------------------------ checkpoint
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints, keep_period=config.train.keep_every)
    saved_config = dict(resume.config_json(config), run=checkpointing.run_facts(global_batch))
    init = _init_from(config.train.init_from, trainer, config) if config.train.init_from else trainer.layout.init
    state = resume.resume_or_init(
        checkpointer, config, init,
        lambda step: checkpointer.restore(step, trainer.layout.abstract, data_iterator=train_iter))
    logging.info("GPT %s: %s parameters, step %d", config.model.preset, f"{num_params(state.params):,}",
                 int(state.step))

    # ------------------------------------------------------------------ samples
    tokenizer = None

    def write_samples(step, state):
        nonlocal tokenizer
        if tokenizer is None:
            tokenizer = load_recorded_tokenizer(config.codes.tokenizer, mesh_cfg=config.mesh).model
        params, _ = state.inference_params(config.sample.use_ema)
        gpt = nnx.merge(trainer.layout.graphs, params, state.model_state)
        classes = min(config.sample.classes, config.model.num_classes)
        images = Painter(gpt, tokenizer, sampling_config(config.sample)).class_grid(classes, config.sample.per_class,
                                                                                      config.sample.seed)
        grid = reports.image_grid(images, columns=config.sample.per_class)
        writer.write_images(step, {"samples": grid[None]})
        if is_chief:
            reports.save_png(grid, workdir / "samples" / f"step_{step}.png")

    # ------------------------------------------------------------------ loop
    def console(step, s):
        return (f"loss {s['loss']:.4f}  acc {100 * s['accuracy']:.1f}%  lr {s['lr']:.2e}  "
                f"grad {s['grad_norm']:.3f}  {s['tokens_per_sec']:,.0f} tok/s")

    metrics_log = loop.MetricsLog(workdir, int(state.step), enabled=is_chief)
    try:
        result = loop.train_loop(
            state=state,
            train_step=trainer.train_step,
            batches=(data_pipeline.to_global_batch(b, trainer.batch_sharding) for b in train_iter),
            total_steps=total_steps, train_cfg=config.train, checkpointer=checkpointer,
            save_extras=lambda: dict(data_iterator=train_iter, config=saved_config),
            writer=writer, metrics_log=metrics_log, console=console,
            rates={"tokens_per_sec": tokens_per_step, "sequences_per_sec": global_batch},
            periodic=[loop.Periodic(config.train.sample_every, write_samples)])
        if result.preempted:
            return {"preempted_at_step": result.step}
        return {"step": result.step}
    finally:
        checkpointer.wait()
        writer.flush()
        metrics_log.close()

"""FVQ tokenizer training: `train_and_evaluate(config, workdir)`, on the shared training machinery.

What the tokenizer brings to it: a state with a discriminator beside the generator
(tokenizer_state.py), the joint G + D step (tokenizer_step.py), LPIPS, reconstruction grids and the
tokenizer evaluation. The loop, checkpoints, resume checks, preemption, the non-finite guard and
the workdir lock are fvq_jax/train's shared core (loop.py, resume.py, update.py, lock.py, state.py).

Reads top to bottom: checks, mesh, input, model and update, checkpoint, evals, loop, final eval.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from fvq_jax import checkpointing, config_lib, sharding
from fvq_jax.data import pipeline as data_pipeline
from fvq_jax.data.spec import DataSpec
from fvq_jax.evaluation import tokenizer_eval
from fvq_jax.models.factory import check_tokenizer_config, compute_dtype, COMPUTE_DTYPES
from fvq_jax.models.vqgan import VQGANArch
from fvq_jax.models.lpips import LPIPS
from fvq_jax.quantizers import bridge_positions
from fvq_jax.quantizers.vqbridge import BRIDGE_PRESETS
from fvq_jax.train import checks, loop, resume, schedules
from fvq_jax.train.lock import WorkdirLock
from fvq_jax.train.optimizer import make_optimizer
from fvq_jax.train.state import StateLayout, create_state, num_params
from fvq_jax.train.tokenizer_state import Graphs, TokenizerState, build
from fvq_jax.train.tokenizer_step import make_train_step

def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                 num_processes: int | None = None) -> None:
    """Every check that can run before anything is built; raises ConfigError naming the field.

    With the device and process counts, also that the batches split over them.
    """
    check_tokenizer_config(config)
    checks.check_train_config(config, num_devices, num_processes)
    for name in ("image_every", "eval_every"):
        config_lib.require_number(config.train[name], f"train.{name}", strict=False, integer=True)
    config_lib.require_choice(config.precision, "precision", tuple(COMPUTE_DTYPES))
    config_lib.require_number(config.loss.disc_start, "loss.disc_start", strict=False, integer=True)
    for name in ("pixel_weight", "perceptual_weight", "codebook_weight", "disc_weight"):
        config_lib.require_number(config.loss[name], f"loss.{name}", strict=False)
    DataSpec.from_config(config.data, "data")
    tokenizer_eval.check_eval_config(config.eval)
    if num_devices is not None:
        checks.check_batch_split(config, config.eval.batch_size, "eval.batch_size", num_devices)


@dataclasses.dataclass
class Trainer:
    """Everything a loop needs to run tokenizer steps on a mesh (see `build_trainer`)."""

    layout: StateLayout[TokenizerState]
    train_step: Callable  # jitted: (state, lpips_state, batch) -> (state, metrics); donates state
    lpips_graph: nnx.GraphDef
    lpips_state: nnx.State  # replicated on the mesh
    batch_sharding: jax.sharding.NamedSharding
    # For a type=vq quantizer with a VQBridge: jitted model_state -> in-patch position metrics of the usage window.
    position_metrics: Callable | None = None
    # With quantizer.revive='copy': jitted (state, step) -> (state, dead positions re-seeded); donates state.
    revive: Callable | None = None

    @property
    def graphs(self) -> Graphs:
        return self.layout.graphs

    def init(self) -> TokenizerState:
        return self.layout.init()


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, lpips: LPIPS | None = None) -> Trainer:
    """Optimizers, state layout, jitted init and train step, for `config` on `mesh`; lpips: the
    perceptual loss's network (default: the pretrained one in the config's precision)."""
    total_steps, global_batch = config.train.num_steps, config.train.global_batch
    tx = make_optimizer(config.optim, total_steps=total_steps, global_batch=global_batch)
    disc_tx = make_optimizer(config.optim, total_steps=total_steps, global_batch=global_batch)
    lr_schedule = schedules.learning_rate_schedule(config.optim, total_steps=total_steps, global_batch=global_batch)
    layout = create_state(lambda: build(config, tx, disc_tx), mesh, config.mesh)
    lpips_graph, lpips_state = nnx.split(lpips or LPIPS.from_pretrained(dtype=compute_dtype(config.precision)))
    replicated = sharding.replicated(mesh)
    batch_sharding = sharding.data_sharding(mesh)
    train_step = jax.jit(
        make_train_step(layout.graphs, lpips_graph, config, tx, disc_tx, lr_schedule),
        in_shardings=(layout.shardings, replicated, batch_sharding),
        out_shardings=(layout.shardings, replicated),
        donate_argnums=(0,))
    position_metrics, revive = _bridge_position_programs(config, layout, replicated)
    return Trainer(layout, train_step, lpips_graph, jax.device_put(lpips_state, replicated), batch_sharding,
                   position_metrics, revive)


def _bridge_position_programs(config: ml_collections.ConfigDict, layout: StateLayout,
                              replicated: jax.sharding.NamedSharding) -> tuple[Callable | None, Callable | None]:
    """(position metrics, revive) programs for a type=vq quantizer with a VQBridge, else Nones (revive
    also None when quantizer.revive is 'off'). Separate programs, so the train step is the same either way."""
    q = config.quantizer
    if q.type != "vq" or q.projector not in BRIDGE_PRESETS:
        return None, None
    k, patch = q.codebook_size, BRIDGE_PRESETS[q.projector].patch
    token_grid = config.data.image_size // VQGANArch.from_config(config.model, "model").downsample_factor
    tokens_per_step = config.train.global_batch * token_grid ** 2

    def position_metrics(model_state):
        counts = bridge_positions.position_counts(model_state["quantizer"]["usage_buffer"][...], k, patch)
        return bridge_positions.position_metrics(counts, patch)

    revive = None
    if q.revive == "copy":
        revive = jax.jit(
            functools.partial(bridge_positions.revive_dead_positions, num_codes=k, patch=patch,
                              recent=q.revive_every * tokens_per_step, noise=q.revive_noise, seed=config.seed),
            in_shardings=(layout.shardings, replicated), out_shardings=(layout.shardings, replicated),
            donate_argnums=(0,))
    return jax.jit(position_metrics), revive


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) the tokenizer in `workdir`; returns the final evaluation metrics, or
    {"preempted_at_step": step} when SIGTERM stopped the run (its checkpoint saved)."""
    check_config(config, jax.device_count(), jax.process_count())
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    with WorkdirLock(workdir), jax.set_mesh(mesh):  # raw PartitionSpecs below resolve on the mesh
        return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path, mesh: jax.sharding.Mesh) -> dict:
    # ------------------------------------------------------------------ setup
    is_chief = jax.process_index() == 0
    # clu's metric writers import TensorFlow: only a training run needs them, not the step builders that the
    # benchmarks use on accelerator images without TensorFlow (benchmarks/suite.py).
    from clu import metric_writers
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief, asynchronous=False)
    total_steps = config.train.num_steps
    global_batch = config.train.global_batch
    logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

    # ------------------------------------------------------------------ input
    train_iter = data_pipeline.train_iterator(config.data, global_batch=global_batch, seed=config.seed)

    # ------------------------------------------------------------------ model and update
    trainer = build_trainer(config, mesh)

    # ------------------------------------------------------------------ checkpoint
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints, keep_period=config.train.keep_every)
    saved_config = dict(resume.config_json(config), run=checkpointing.run_facts(global_batch))
    state = resume.resume_or_init(
        checkpointer, config, trainer.init,
        lambda step: checkpointer.restore(step, trainer.layout.abstract, data_iterator=train_iter))
    if int(state.step):
        logging.info("Resuming from step %d", int(state.step))
    else:
        logging.info("Initialised a new model: %s parameters", f"{num_params(state.params):,}")

    # ------------------------------------------------------------------ evals
    evaluator = tokenizer_eval.TokenizerEvaluator(config, trainer.graphs.generator, mesh,
                                                  lpips_graph=trainer.lpips_graph, lpips_state=trainer.lpips_state)

    def write_images(step, state):
        params, _ = state.inference_params()
        writer.write_images(step, {"reconstructions": evaluator.reconstruction_grid(params, state.model_state)[None]})

    def evaluate(step, state):
        params, weights = state.inference_params()
        writer.write_scalars(step, evaluator.evaluate(params, state.model_state, weights=weights))

    # ------------------------------------------------------------------ loop
    def console(step, s):
        pulled = f"  pulled {int(s['pulled_codes'])}" if "pulled_codes" in s else ""  # quantizer.restart 'pull' / 'claim'
        return (f"loss {s['loss']:.4f}  rec {s['pixel_loss']:.4f}  lpips {s['perceptual_loss']:.4f}  "
                f"usage {100 * s['usage']:.1f}%{pulled}  lr {s['lr']:.2e}  {s['images_per_sec']:.1f} img/s")

    def revive(step, state):
        state, dead = trainer.revive(state, jnp.asarray(step, jnp.int32))
        dead = np.asarray(jax.device_get(dead))
        if dead.any() and jax.process_index() == 0:
            print(f"step {step}: re-seeded the bridge head rows of in-patch positions {np.flatnonzero(dead).tolist()}",
                  flush=True)
        return state

    metrics_log = loop.MetricsLog(workdir, int(state.step), enabled=is_chief)
    try:
        result = loop.train_loop(
            state=state,
            train_step=lambda state, batch: trainer.train_step(state, trainer.lpips_state, batch),
            batches=(data_pipeline.to_global_batch(b, trainer.batch_sharding) for b in train_iter),
            total_steps=total_steps, train_cfg=config.train, checkpointer=checkpointer,
            save_extras=lambda: dict(data_iterator=train_iter, config=saved_config),
            writer=writer, metrics_log=metrics_log, console=console, rates={"images_per_sec": global_batch},
            periodic=[loop.Periodic(config.train.image_every, write_images),
                      loop.Periodic(config.train.eval_every, evaluate, skip_at_stop=True)],
            updates=[loop.Periodic(config.quantizer.revive_every, revive)] if trainer.revive else [],
            log_extras=lambda state: trainer.position_metrics(state.model_state) if trainer.position_metrics else {},
            data_skipped=lambda: train_iter.num_skipped)
        if result.preempted:
            return {"preempted_at_step": result.step}
        # -------------------------------------------------------------- final evaluation
        params, weights = result.state.inference_params()
        results = evaluator.evaluate(params, result.state.model_state, weights=weights, workdir=workdir)
        writer.write_scalars(total_steps, results)
        print("final evaluation: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(results.items())), flush=True)
        return results
    finally:
        checkpointer.wait()
        writer.flush()
        metrics_log.close()

"""FVQ tokenizer training: `train_and_evaluate(config, workdir)`, the tokenizer's parts of the training program.

What the tokenizer brings to the program (program.py: workdir, lock, checkpoints, resume, metrics, the
loop with its guard and preemption): its config checks, a state with a discriminator beside the generator
(tokenizer_state.py), the joint G + D step (tokenizer_step.py) with LPIPS, reconstruction grids, periodic
and final evaluations (evaluation/tokenizer_eval.py) and the revive of dead bridge positions.

Reads top to bottom: checks, model and update, then `build_parts`: input, step, evals, console, state updates.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fvq_jax import config_lib, sharding
from fvq_jax.data import pipeline as data_pipeline
from fvq_jax.data.spec import DataSpec
from fvq_jax.evaluation import tokenizer_eval
from fvq_jax.models.factory import check_tokenizer_config, compute_dtype, COMPUTE_DTYPES
from fvq_jax.models.vqgan import VQGANArch
from fvq_jax.models.lpips import LPIPS
from fvq_jax.quantizers import bridge_positions
from fvq_jax.quantizers.vqbridge import BRIDGE_PRESETS
from fvq_jax.train import checks, loop, program, schedules
from fvq_jax.train.optimizer import make_optimizer
from fvq_jax.train.state import StateLayout, create_state
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


def build_parts(config: ml_collections.ConfigDict, context: program.Context) -> program.Parts:
    """The tokenizer's parts of the training program: input, G + D step, reconstruction grids, evaluations, the
    revive, and the final evaluation (eval/final/)."""
    # ------------------------------------------------------------------ input
    global_batch = config.train.global_batch
    train_iter = data_pipeline.train_iterator(config.data, global_batch=global_batch, seed=config.seed)

    # ------------------------------------------------------------------ model and update
    trainer = build_trainer(config, context.mesh)

    # ------------------------------------------------------------------ evals
    evaluator = tokenizer_eval.TokenizerEvaluator(config, trainer.graphs.generator, context.mesh,
                                                  lpips_graph=trainer.lpips_graph, lpips_state=trainer.lpips_state)

    def write_images(step, state):
        params, _ = state.inference_params()
        grid = evaluator.reconstruction_grid(params, state.model_state)
        context.writer.write_images(step, {"reconstructions": grid[None]})

    def evaluate(step, state):
        params, weights = state.inference_params()
        context.writer.write_scalars(step, evaluator.evaluate(params, state.model_state, weights=weights))

    def final(state, step):
        params, weights = state.inference_params()
        return evaluator.evaluate(params, state.model_state, weights=weights, workdir=context.workdir, step=step,
                                  folder="final")

    # ------------------------------------------------------------------ console and state updates
    def console(step, s):
        pulled = f"  pulled {int(s['pulled_codes'])}" if "pulled_codes" in s else ""  # quantizer.restart 'pull' / 'claim'
        return (f"loss {s['loss']:.4f}  rec {s['pixel_loss']:.4f}  lpips {s['perceptual_loss']:.4f}  "
                f"usage {100 * s['usage']:.1f}%{pulled}  lr {s['lr']:.2e}  {s['images_per_sec']:.1f} img/s")

    def revive(step, state):
        state, dead = trainer.revive(state, jnp.asarray(step, jnp.int32))
        dead = np.asarray(jax.device_get(dead))
        if dead.any() and context.is_chief:
            print(f"step {step}: re-seeded the bridge head rows of in-patch positions {np.flatnonzero(dead).tolist()}",
                  flush=True)
        return state

    return program.Parts(
        layout=trainer.layout,
        step=lambda state, batch: trainer.train_step(state, trainer.lpips_state, batch),
        data=train_iter, batch_sharding=trainer.batch_sharding, console=console, rates={"images_per_sec": global_batch},
        hooks=[loop.Periodic(config.train.image_every, write_images),
               loop.Periodic(config.train.eval_every, evaluate, skip_at_stop=True)],
        updates=[loop.Periodic(config.quantizer.revive_every, revive)] if trainer.revive else [],
        log_extras=lambda state: trainer.position_metrics(state.model_state) if trainer.position_metrics else {},
        data_skipped=lambda: train_iter.num_skipped,
        final=final)


RECIPE = program.Recipe("tokenizer", check_config, build_parts)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) the tokenizer in `workdir`; returns the final evaluation metrics, or
    {"preempted_at_step": step} when SIGTERM stopped the run (its checkpoint saved)."""
    return program.train_and_evaluate(RECIPE, config, workdir)

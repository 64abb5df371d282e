"""FVQ tokenizer training: `train_and_evaluate(resolve(config), workdir)`, the tokenizer's parts of the training
program.

What the tokenizer brings to the program (program.py: workdir, lock, checkpoints, resume, metrics, the
loop with its guard and preemption): its config resolved once (`TokenizerRunSpec`), a state with a
discriminator beside the generator (tokenizer_state.py), the joint G + D step (tokenizer_step.py) with LPIPS,
reconstruction grids, periodic and final evaluations (evaluation/tokenizer_eval.py) and the revive of dead
bridge positions.

Reads top to bottom: the spec, model and update, then `build_parts`: input, step, evals, console, state updates.
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
from fvq_jax.models.factory import DiscriminatorSpec, VQGANSpec
from fvq_jax.models.lpips import LPIPS
from fvq_jax.quantizers import bridge_positions
from fvq_jax.quantizers.vqbridge import BRIDGE_PRESETS
from fvq_jax.train import loop, program, schedules
from fvq_jax.train.optimizer import make_optimizer
from fvq_jax.train.spec import RunSpec, TrainSpec
from fvq_jax.train.state import StateLayout, create_state
from fvq_jax.train.tokenizer_state import Graphs, TokenizerState, build
from fvq_jax.train.tokenizer_step import LossSpec, make_train_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerTrainSpec(TrainSpec):
    """The tokenizer's `train` block: the shared fields and its periodic grids and evaluations (0: never)."""

    image_every: int
    eval_every: int  # 0: only the final evaluation

    def __post_init__(self):
        super().__post_init__()
        for name in ("image_every", "eval_every"):
            config_lib.require_number(getattr(self, name), name, strict=False, integer=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerRunSpec(RunSpec):
    """configs/tokenizer.py resolved: the VQ-GAN (`tokenizer`: the model and quantizer blocks), its
    discriminator, losses, data and evaluation, beside the blocks of every run (train/spec.py). Checks across
    blocks: the image size against the encoder's downsampling and a multi-scale grid, and the discriminator's
    logits."""

    train: TokenizerTrainSpec
    tokenizer: VQGANSpec = config_lib.inline()
    discriminator: DiscriminatorSpec
    loss: LossSpec
    data: DataSpec
    eval: tokenizer_eval.EvalSpec

    def __post_init__(self):
        super().__post_init__()
        self.tokenizer.token_grid(self.data.image_size)
        self.discriminator.check_image_size(self.data.image_size)

    def check_devices(self, num_devices: int | None, num_processes: int | None) -> None:
        super().check_devices(num_devices, num_processes)
        if num_devices is not None:
            self.mesh.check_batch(self.eval.batch_size, "eval.batch_size", num_devices)


def resolve(config: ml_collections.ConfigDict, num_devices: int | None = None,
            num_processes: int | None = None) -> TokenizerRunSpec:
    """Every check of a tokenizer config, before anything is built (ConfigError naming the field); with the device
    and process counts, also that the batches split over them."""
    spec = TokenizerRunSpec.from_config(config)
    spec.check_devices(num_devices, num_processes)
    return spec


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


def build_trainer(spec: TokenizerRunSpec, mesh: jax.sharding.Mesh, lpips: LPIPS | None = None) -> Trainer:
    """Optimizers, state layout, jitted init and train step, for `spec` on `mesh`; lpips: the
    perceptual loss's network (default: the pretrained one in the run's precision)."""
    total_steps, global_batch = spec.train.num_steps, spec.train.global_batch
    tx = make_optimizer(spec.optim, total_steps=total_steps, global_batch=global_batch)
    disc_tx = make_optimizer(spec.optim, total_steps=total_steps, global_batch=global_batch)
    lr_schedule = schedules.learning_rate_schedule(spec.optim, total_steps=total_steps, global_batch=global_batch)
    layout = create_state(lambda: build(spec, tx, disc_tx), mesh, spec.mesh)
    lpips_graph, lpips_state = nnx.split(lpips or LPIPS.from_pretrained(dtype=spec.dtype))
    replicated = sharding.replicated(mesh)
    batch_sharding = sharding.data_sharding(mesh)
    train_step = jax.jit(
        make_train_step(layout.graphs, lpips_graph, spec.loss, tx, disc_tx, lr_schedule,
                        ema_decay=spec.optim.ema_decay),
        in_shardings=(layout.shardings, replicated, batch_sharding),
        out_shardings=(layout.shardings, replicated),
        donate_argnums=(0,))
    position_metrics, revive = _bridge_position_programs(spec, layout, replicated)
    return Trainer(layout, train_step, lpips_graph, jax.device_put(lpips_state, replicated), batch_sharding,
                   position_metrics, revive)


def _bridge_position_programs(spec: TokenizerRunSpec, layout: StateLayout,
                              replicated: jax.sharding.NamedSharding) -> tuple[Callable | None, Callable | None]:
    """(position metrics, revive) programs for a type=vq quantizer with a VQBridge, else Nones (revive
    also None when quantizer.revive is 'off'). Separate programs, so the train step is the same either way."""
    q = spec.tokenizer.quantizer
    if not q.bridged:
        return None, None
    k, patch = q.codebook_size, BRIDGE_PRESETS[q.projector].patch
    token_grid = spec.data.image_size // spec.tokenizer.model.downsample_factor
    tokens_per_step = spec.train.global_batch * token_grid ** 2

    def position_metrics(model_state):
        counts = bridge_positions.position_counts(model_state["quantizer"]["usage_buffer"][...], k, patch)
        return bridge_positions.position_metrics(counts, patch)

    revive = None
    if q.revive == "copy":
        revive = jax.jit(
            functools.partial(bridge_positions.revive_dead_positions, num_codes=k, patch=patch,
                              recent=q.revive_every * tokens_per_step, noise=q.revive_noise, seed=spec.seed),
            in_shardings=(layout.shardings, replicated), out_shardings=(layout.shardings, replicated),
            donate_argnums=(0,))
    return jax.jit(position_metrics), revive


def build_parts(spec: TokenizerRunSpec, context: program.Context) -> program.Parts:
    """The tokenizer's parts of the training program: input, G + D step, reconstruction grids, evaluations, the
    revive, and the final evaluation (eval/final/)."""
    # ------------------------------------------------------------------ input
    global_batch = spec.train.global_batch
    train_iter = data_pipeline.train_iterator(spec.data, global_batch=global_batch, seed=spec.seed)

    # ------------------------------------------------------------------ model and update
    trainer = build_trainer(spec, context.mesh)

    # ------------------------------------------------------------------ evals
    evaluator = tokenizer_eval.TokenizerEvaluator(
        spec.eval, spec.data, trainer.graphs.generator, context.mesh, num_codes=spec.tokenizer.quantizer.codebook_size,
        projector=spec.tokenizer.quantizer.projector, lpips_graph=trainer.lpips_graph, lpips_state=trainer.lpips_state)

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
        hooks=[loop.Periodic(spec.train.image_every, write_images),
               loop.Periodic(spec.train.eval_every, evaluate, skip_at_stop=True)],
        updates=[loop.Periodic(spec.tokenizer.quantizer.revive_every, revive)] if trainer.revive else [],
        log_extras=lambda state: trainer.position_metrics(state.model_state) if trainer.position_metrics else {},
        data_skipped=lambda: train_iter.num_skipped,
        final=final)


RECIPE = program.Recipe("tokenizer", build_parts)


def train_and_evaluate(spec: TokenizerRunSpec, workdir: str) -> dict:
    """Train (or resume) the tokenizer `spec` (`resolve`) describes in `workdir`; returns the final evaluation
    metrics, or {"preempted_at_step": step} when SIGTERM stopped the run (its checkpoint saved)."""
    return program.train_and_evaluate(RECIPE, spec, workdir)

"""FVQ tokenizer training: `train_and_evaluate(config, workdir)`.

Reads top to bottom: setup, mesh, input, model, checkpoint, update, evals, loop. Resumes
from the newest checkpoint in `workdir` automatically; SIGTERM (preemption) saves one before
exiting; a non-finite loss stops the run naming the step and the term, and the last good
checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from fvq_jax import checkpointing, sharding
from fvq_jax.data import pipeline as data_pipeline
from fvq_jax.evaluation import tokenizer_eval
from fvq_jax.models.factory import check_tokenizer_config
from fvq_jax.models.lpips import LPIPS
from fvq_jax.train import schedules, state as state_lib
from fvq_jax.train.tokenizer_step import LOSS_TERMS, make_train_step
from fvq_jax import config_lib
from fvq_jax.train.state import Graphs, TokenizerState


class NonFiniteLoss(FloatingPointError):
    """A train step produced NaN/Inf; the message names the step and the terms."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every check that can run before anything is built; raises ConfigError naming the field."""
    check_tokenizer_config(config)
    train = config.train
    for name in ("global_batch", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        config_lib.require_number(train[name], f"train.{name}", integer=True)
    for name in ("keep_every", "image_every", "eval_every"):
        config_lib.require_number(train[name], f"train.{name}", strict=False, integer=True)
    config_lib.require_choice(config.precision, "precision", tuple(state_lib.COMPUTE_DTYPES))
    schedules.check_optim_config(config.optim, train.num_steps)
    config_lib.require_number(config.loss.disc_start, "loss.disc_start", strict=False, integer=True)
    for name in ("pixel_weight", "perceptual_weight", "codebook_weight", "disc_weight"):
        config_lib.require_number(config.loss[name], f"loss.{name}", strict=False)
    data_pipeline.check_data_config(config.data)


class _Preemption:
    """Turns SIGTERM into a flag the loop polls at step boundaries.

    With several processes the flag is all-gathered every `sync_every` steps, so all of them
    stop (and save, which is collective) at the same step.
    """

    def __init__(self, sync_every: int = 10):
        self.requested = False
        self.sync_every = sync_every
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % self.sync_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@dataclasses.dataclass
class Trainer:
    """Everything a loop needs to run tokenizer steps on a mesh (see `build_trainer`)."""

    graphs: Graphs
    abstract_state: TokenizerState  # ShapeDtypeStructs carrying the state's shardings
    state_shardings: TokenizerState
    init: Callable[[], TokenizerState]  # jitted onto the mesh
    train_step: Callable  # jitted: (state, lpips_state, batch) -> (state, metrics); donates state
    lpips_graph: nnx.GraphDef
    lpips_state: nnx.State  # replicated on the mesh
    batch_sharding: jax.sharding.NamedSharding


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
    """Optimizers, abstract state and shardings, jitted init and train step, for `config` on `mesh`."""
    total_steps, global_batch = config.train.num_steps, config.train.global_batch
    tx = state_lib.make_optimizer(config.optim, total_steps=total_steps, global_batch=global_batch)
    disc_tx = state_lib.make_optimizer(config.optim, total_steps=total_steps, global_batch=global_batch)
    lr_schedule = schedules.learning_rate_schedule(config.optim, total_steps=total_steps, global_batch=global_batch)
    graphs, abstract_state, state_shardings, init = state_lib.create_state(config, mesh, tx, disc_tx)
    lpips_graph, lpips_state = nnx.split(LPIPS.from_pretrained(dtype=state_lib.COMPUTE_DTYPES[config.precision]))
    replicated = sharding.replicated(mesh)
    batch_sharding = sharding.data_sharding(mesh)
    train_step = jax.jit(
        make_train_step(graphs, lpips_graph, config, tx, disc_tx, lr_schedule),
        in_shardings=(state_shardings, replicated, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,))
    return Trainer(graphs, abstract_state, state_shardings, init, train_step, lpips_graph,
                   jax.device_put(lpips_state, replicated), batch_sharding)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) the tokenizer in `workdir`; returns the final evaluation metrics."""
    check_config(config)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):  # the mesh in context for everything below (raw PartitionSpecs resolve on it)
        return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> dict:
    # ------------------------------------------------------------------ setup
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief, asynchronous=False)
    total_steps = config.train.num_steps
    global_batch = config.train.global_batch

    # ------------------------------------------------------------------ mesh
    logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

    # ------------------------------------------------------------------ input
    train_iter = data_pipeline.train_iterator(config.data, global_batch=global_batch, seed=config.seed)

    # ------------------------------------------------------------------ model and update
    trainer = build_trainer(config, mesh)

    # ------------------------------------------------------------------ checkpoint
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints, keep_period=config.train.keep_every)
    saved_config = dict(json.loads(config.to_json_best_effort()), run=checkpointing.run_facts(global_batch))
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(None, trainer.abstract_state, data_iterator=train_iter)
        logging.info("Resuming from step %d", int(state.step))
    else:
        state = trainer.init()
        logging.info("Initialised a new model: %s parameters", f"{sum(x.size for x in jax.tree.leaves(state.params)):,}")
    start_step = int(state.step)

    # ------------------------------------------------------------------ evals
    evaluator = tokenizer_eval.TokenizerEvaluator(config, trainer.graphs.generator, mesh,
                                                  lpips_graph=trainer.lpips_graph, lpips_state=trainer.lpips_state)

    # ------------------------------------------------------------------ loop
    preemption = _Preemption()
    progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    history: list[dict] = []
    pending = None  # (step, device metrics) of the last dispatched step, checked one step late
    metrics_log = (workdir / "metrics.jsonl").open("a") if is_chief else None
    t_log, step_log = time.time(), start_step

    def check(pending):
        step, metrics = pending
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not host.pop("finite"):
            bad = [f"{k}={host[k]}" for k in LOSS_TERMS if not np.isfinite(host[k])]
            raise NonFiniteLoss(f"step {step}: non-finite {', '.join(bad)}; state left at step {step - 1} "
                                f"(last checkpoint: {checkpointer.latest_step()})")
        history.append(dict(host, step=step))

    def save(step):
        checkpointer.save(step, state, data_iterator=train_iter, config=saved_config, force=True)

    try:
        if start_step >= total_steps:
            logging.info("Already trained %d steps; evaluating only", start_step)
        step = start_step
        while step < total_steps:
            batch = data_pipeline.to_global_batch(next(train_iter), trainer.batch_sharding)
            state, metrics = trainer.train_step(state, trainer.lpips_state, batch)
            if pending is not None:
                check(pending)
            step += 1
            pending = (step, metrics)
            progress(step)
            stop = step == total_steps or preemption.should_stop(step)
            if step % config.train.log_every == 0 or stop:
                check(pending)
                pending = None
                summary = {k: float(np.mean([h[k] for h in history])) for k in history[-1] if k != "step"}
                elapsed = time.time() - t_log
                summary["steps_per_sec"] = (step - step_log) / elapsed
                summary["images_per_sec"] = summary["steps_per_sec"] * global_batch
                summary["data_skipped"] = float(train_iter.num_skipped)
                writer.write_scalars(step, summary)
                if metrics_log:
                    metrics_log.write(json.dumps(dict(summary, step=step)) + "\n")
                    metrics_log.flush()
                eta = (total_steps - step) / max(summary["steps_per_sec"], 1e-9)
                print(f"step {step}/{total_steps}  loss {summary['loss']:.4f}  rec {summary['pixel_loss']:.4f}  "
                      f"lpips {summary['perceptual_loss']:.4f}  usage {100 * summary['usage']:.1f}%  "
                      f"lr {summary['lr']:.2e}  {summary['images_per_sec']:.1f} img/s  ETA {_format_eta(eta)}",
                      flush=True)
                history.clear()
                t_log, step_log = time.time(), step
            if config.train.image_every and step % config.train.image_every == 0:
                writer.write_images(step, {"reconstructions": evaluator.reconstruction_grid(state)[None]})
            if config.train.eval_every and step % config.train.eval_every == 0 and not stop:
                writer.write_scalars(step, evaluator.evaluate(state))
            if step % config.train.checkpoint_every == 0 or stop:
                if pending is not None:
                    check(pending)
                    pending = None
                save(step)
            if stop and step < total_steps:
                logging.warning("Preempted: checkpoint of step %d saved; exiting", step)
                checkpointer.wait()
                return {}
        checkpointer.wait()
        # -------------------------------------------------------------- final evaluation
        results = evaluator.evaluate(state, workdir=workdir)
        writer.write_scalars(total_steps, results)
        print("final evaluation: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(results.items())), flush=True)
        return results
    finally:
        preemption.restore()
        checkpointer.wait()
        writer.flush()
        if metrics_log:
            metrics_log.close()

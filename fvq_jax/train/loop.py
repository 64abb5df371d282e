"""The loop of the training program (program.py): steps, progress, metrics, checkpoints, preemption, the guard.

It runs a model's `program.Parts` (its jitted step, state, input iterator and hooks), the same for every model:
  * steps are dispatched asynchronously; each step's metrics are read one step late, so the host
    never waits on the device except when logging or saving;
  * every `log_every` steps the mean of each metric, steps/s and throughput are written once to
    TensorBoard and metrics.jsonl, and one console line is printed;
  * a step whose guard failed (fvq_jax.train.update: a loss or gradient norm not finite) stops the
    run with `NonFiniteStep` naming the step and the values, the state left at the previous step;
    so does a step whose new parameters' norms are not finite (checked by a separate small program
    after every step), before that state can be saved: the last checkpoint is always good;
  * checkpoints every `checkpoint_every` steps and at the end; SIGTERM (preemption) saves at the next
    step boundary, which every process agrees on, and the loop returns `preempted=True` (main.py
    exits with PREEMPTED_EXIT_CODE so schedulers requeue the run);
  * state updates (`Parts.updates`: `Periodic`s whose run returns the new state, i.e. periodic changes made
    outside the jitted step, such as reviving dead bridge positions) run right after their step,
    before it is logged or saved, so a checkpoint of step s holds them and a resumed run repeats them;
  * hooks (`Parts.hooks`: sample or reconstruction grids, evaluations) run after the step is logged;
  * metrics.jsonl stays consistent across a resume: lines of steps after the resumed checkpoint
    (the trajectory the crash abandoned) move to metrics.rolled_back.jsonl before logging restarts.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from fvq_jax import checkpointing
from fvq_jax.data.pipeline import to_global_batch
from fvq_jax.progress import format_eta
from fvq_jax.train.update import parameter_norms

if TYPE_CHECKING:
    from fvq_jax.train.program import Parts
    from fvq_jax.train.spec import TrainSpec

# EX_TEMPFAIL ("try again later"): a preempted run saved its checkpoint and should be started again.
PREEMPTED_EXIT_CODE = 75


_parameter_norms = jax.jit(parameter_norms)


class NonFiniteStep(FloatingPointError):
    """A train step produced NaN/Inf (or overflowing parameters); the message names the step and values."""


@dataclasses.dataclass(frozen=True)
class Periodic:
    """`run(step, state)` after every `every`-th step (0 = never), and at the last step unless `skip_at_stop`."""

    every: int
    run: Callable[[int, Any], None]
    skip_at_stop: bool = False


@dataclasses.dataclass(frozen=True)
class LoopResult:
    state: Any
    step: int
    preempted: bool


class Preemption:
    """SIGTERM -> stop at a step boundary that every process agrees on.

    One process: a signal handler sets a flag. Several: JAX's preemption service (installed by
    jax.distributed.initialize, which handles SIGTERM itself) picks the sync step.
    """

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.requested = False
        self._previous = None if self.multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self.multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class MetricsLog:
    """workdir/metrics.jsonl, one JSON line per logged step, written by process 0."""

    def __init__(self, workdir: epath.Path, resume_step: int, *, enabled: bool):
        self.path = workdir / "metrics.jsonl"
        self._file = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self._roll_back(resume_step)
        self._file = self.path.open("a")

    def _roll_back(self, resume_step: int) -> None:
        kept, dropped = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                dropped.append(line if line.endswith("\n") else line + "\n")  # a line cut by a kill
                continue
            (kept if step <= resume_step else dropped).append(line)
        if dropped:
            with (self.path.parent / "metrics.rolled_back.jsonl").open("a") as f:
                f.writelines(dropped)
            self.path.write_text("".join(kept))
            logging.info("metrics.jsonl: %d lines after step %d moved to metrics.rolled_back.jsonl",
                         len(dropped), resume_step)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._file:
            self._file.write(json.dumps(dict(scalars, step=step)) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def train_loop(state, parts: Parts, *, total_steps: int, train: TrainSpec, checkpointer: checkpointing.Checkpointer,
               saved_config: dict, writer, metrics_log: MetricsLog) -> LoopResult:
    """Run `parts.step(state, batch)` from state.step to `total_steps` on the batches of `parts.data`.

    train: the `train` block (log_every, checkpoint_every). Checkpoints hold the state, the input
    iterator's position and `saved_config`. The step's metrics must hold "finite" (the guard's verdict) and
    the values it checked.
    """
    step = start = int(state.step)
    preemption = Preemption()
    # clu's periodic actions import its metric writers, hence TensorFlow: imported here, not with the module, so
    # the step builders import on accelerator images without TensorFlow (benchmarks/suite.py).
    from clu import periodic_actions
    progress = periodic_actions.ReportProgress(num_train_steps=total_steps, every_steps=train.log_every,
                                               every_secs=None)
    history: list[dict] = []
    pending = None  # (step, device metrics) of the last dispatched step, checked one step late
    t_log, step_log = time.time(), start

    def check(pending):
        step, metrics = pending
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = ", ".join(f"{k}={v}" for k, v in host.items() if not np.isfinite(v)) or "values"
        if not host.pop("finite"):
            raise NonFiniteStep(f"step {step}: non-finite {bad}; state left at step {step - 1} "
                                f"(last checkpoint: {checkpointer.latest_step()})")
        if not all(np.isfinite(v) for v in host.values()):
            raise NonFiniteStep(f"step {step}: the update left non-finite parameters ({bad}); not saved "
                                f"(last checkpoint: {checkpointer.latest_step()})")
        history.append(host)

    def save(step):
        checkpointer.save(step, state, force=True, data_iterator=parts.data, config=saved_config)

    batches = (to_global_batch(batch, parts.batch_sharding) for batch in parts.data)

    try:
        if start >= total_steps:
            logging.info("Already trained %d steps", start)
        while step < total_steps:
            state, metrics = parts.step(state, next(batches))
            metrics = dict(metrics, **_parameter_norms(state))
            if pending is not None:
                check(pending)
            step += 1
            pending = (step, metrics)
            for update in parts.updates:
                if update.every and step % update.every == 0:
                    state = update.run(step, state)
            progress(step)
            stop = step == total_steps or preemption.should_stop(step)
            if step % train.log_every == 0 or stop:
                check(pending)
                pending = None
                summary = {k: float(np.mean([h[k] for h in history])) for k in history[-1]}
                summary["steps_per_sec"] = (step - step_log) / (time.time() - t_log)
                summary.update({name: summary["steps_per_sec"] * per_step for name, per_step in parts.rates.items()})
                summary["data_skipped"] = float(parts.data_skipped())
                summary.update({k: float(v) for k, v in jax.device_get(parts.log_extras(state)).items()})
                writer.write_scalars(step, summary)
                metrics_log.write(step, summary)
                eta = (total_steps - step) / max(summary["steps_per_sec"], 1e-9)
                if jax.process_index() == 0:
                    print(f"step {step}/{total_steps}  {parts.console(step, summary)}  ETA {format_eta(eta)}", flush=True)
                history.clear()
                t_log, step_log = time.time(), step
            for hook in parts.hooks:
                if hook.every and step % hook.every == 0 and not (stop and hook.skip_at_stop):
                    with progress.timed("hooks"):
                        hook.run(step, state)
            if step % train.checkpoint_every == 0 or stop:
                if pending is not None:
                    check(pending)
                    pending = None
                save(step)
            if stop and step < total_steps:
                logging.warning("Preempted: checkpoint of step %d saved; exiting", step)
                checkpointer.wait()
                return LoopResult(state, step, preempted=True)
        checkpointer.wait()
        return LoopResult(state, step, preempted=False)
    finally:
        preemption.restore()
        checkpointer.wait()

"""The training program every model runs: `train_and_evaluate(recipe, spec, workdir)`.

A trainer module declares what its model brings: its config resolved once into a spec (a `spec.RunSpec`
subclass, by its `resolve(config, num_devices, num_processes)`, which `tasks.resolve` calls before anything is
built), and a `Recipe` of two functions:
  prepare(spec) -> data         what the run reads besides its config, opened before the workdir exists, so that
                                bad data refuses the run before anything is created (the GPT: its codes, verified;
                                default: None);
  build(spec, context) -> Parts the state layout, the jitted step, the input iterator, the console line, periodic
                                hooks (grids, evaluations), state updates, log extras and the final evaluation.
The program owns the rest, the same for every model, in this order: prepare, the workdir and its lock
(lock.py), the mesh, the summary writer, build, the checkpointer, resume or init (resume.py: the config diff,
restore_step, a changed model refused, the fallback past broken checkpoints), metrics.jsonl, the loop (loop.py:
asynchronous steps, the non-finite guard, preemption, checkpoints), the final evaluation, the cleanup.

A third model, e.g. a masked-token generator on the codes (train/maskgit.py), writes only its parts:

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MaskGITRunSpec(RunSpec):                        # seed, precision, train, optim, mesh: every run's
        model: MaskGITConfig                              # its own blocks, each a config_lib.Spec
        codes: CodesSpec

    def resolve(config, num_devices=None, num_processes=None):
        spec = MaskGITRunSpec.from_config(config)        # ConfigError naming the field, before anything is built
        spec.check_devices(num_devices, num_processes)
        return spec

    def prepare(spec):
        return codes.open_codes(spec.codes.dir)           # refused before the workdir exists

    def build_parts(spec, context: program.Context) -> program.Parts:
        tx = make_optimizer(spec.optim, total_steps=spec.train.num_steps, global_batch=spec.train.global_batch)

        def init():
            graph, fields = model_fields(MaskGIT(spec.model, rngs=nnx.Rngs(spec.seed)), tx, keep_ema=False)
            return graph, TrainState(**fields)

        layout = create_state(init, context.mesh, spec.mesh)
        step = jax.jit(make_masked_step(layout.graphs, tx), in_shardings=..., out_shardings=..., donate_argnums=(0,))
        return program.Parts(
            layout=layout, step=step, batch_sharding=sharding.data_sharding(context.mesh),
            data=codes.train_iterator(context.data, global_batch=spec.train.global_batch, seed=spec.seed),
            console=lambda step, s: f"loss {s['loss']:.4f}  {s['tokens_per_sec']:,.0f} tok/s",
            rates={"tokens_per_sec": spec.train.global_batch * tokens_per_image},
            hooks=[loop.Periodic(spec.train.sample_every, write_samples)])

    RECIPE = program.Recipe("MaskGIT", build_parts, prepare)

    def train_and_evaluate(spec, workdir):
        return program.train_and_evaluate(RECIPE, spec, workdir)

and gets exact resume, preemption, the guard, the lock, checkpoints and metrics without a line of its own
(tests/train/test_program.py runs such a toy trainer). The step must return metrics holding "finite" (the
guard's verdict, update.keep_if_finite) and the values it checked.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
from absl import logging
from etils import epath

from fvq_jax import checkpointing, sharding
from fvq_jax.train import loop, resume
from fvq_jax.train.lock import WorkdirLock
from fvq_jax.train.spec import RunSpec
from fvq_jax.train.state import StateLayout, num_params


@dataclasses.dataclass(frozen=True)
class Context:
    """What a model's `build` gets from the program."""

    mesh: jax.sharding.Mesh
    workdir: epath.Path
    writer: Any  # clu metric writer: TensorBoard on process 0, logging elsewhere
    data: Any  # what the recipe's `prepare` returned beside the config (None by default)

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the files meant to exist once (grids, reports)."""
        return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a model plugs into the program for one run (its recipe's `build` returns them)."""

    layout: StateLayout  # the train state's graphs, abstract arrays (the restore target) and jitted init
    step: Callable[[Any, dict], tuple[Any, dict]]  # jitted (state, global batch) -> (state, metrics with "finite")
    data: Iterator[dict]  # host batches from a grain iterator: its position is saved with every checkpoint
    batch_sharding: jax.sharding.Sharding  # of the global batches made from them
    console: Callable[[int, dict], str]  # (step, logged means) -> the progress line before its ETA
    rates: Mapping[str, float]  # {name: units per step} logged beside steps_per_sec, e.g. images_per_sec
    init: Callable[[], Any] | None = None  # a fresh state (None: layout.init), e.g. holding fine-tuning weights
    hooks: Sequence[loop.Periodic] = ()  # run(step, state) after the step is logged: grids, evaluations
    updates: Sequence[loop.Periodic] = ()  # run(step, state) -> state right after the step, e.g. the revive
    log_extras: Callable[[Any], Mapping[str, Any]] = lambda state: {}  # values read from the state when logging
    data_skipped: Callable[[], int] = lambda: 0  # unreadable inputs skipped so far (logged)
    final: Callable[[Any, int], dict] | None = None  # (state, step) -> the final evaluation's metrics


def _no_data(spec: RunSpec) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A model's part of the program (see the module docstring)."""

    name: str  # for the logs
    build: Callable[[RunSpec, Context], Parts]
    prepare: Callable[[RunSpec], Any] = _no_data


def train_and_evaluate(recipe: Recipe, spec: RunSpec, workdir: str) -> dict:
    """Train (or resume) `recipe`'s model as `spec` says in `workdir`. Returns the final evaluation's metrics
    ({"step": N} without one), or {"preempted_at_step": N} when SIGTERM stopped the run (its checkpoint saved)."""
    data = recipe.prepare(spec)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(spec.mesh)
    with WorkdirLock(workdir), jax.set_mesh(mesh):  # raw PartitionSpecs in the builders resolve on the mesh
        return _run(recipe, spec, workdir, mesh, data)


def _run(recipe: Recipe, spec: RunSpec, workdir: epath.Path, mesh: jax.sharding.Mesh, data: Any) -> dict:
    # ------------------------------------------------------------------ setup
    # clu's metric writers import TensorFlow: only a training run needs them, not the step builders that the
    # benchmarks use on accelerator images without TensorFlow (benchmarks/suite.py).
    from clu import metric_writers
    is_chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief, asynchronous=False)
    logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

    # ------------------------------------------------------------------ the model's parts
    parts = recipe.build(spec, Context(mesh=mesh, workdir=workdir, writer=writer, data=data))

    # ------------------------------------------------------------------ checkpoint
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints", max_to_keep=spec.train.keep_checkpoints, keep_period=spec.train.keep_every)
    saved_config = dict(resume.config_json(spec.config), run=checkpointing.run_facts(spec.train.global_batch))
    state = resume.resume_or_init(checkpointer, spec, parts.init or parts.layout.init, parts.layout.abstract,
                                  data_iterator=parts.data)
    logging.info("%s: %s parameters, step %d", recipe.name, f"{num_params(state.params):,}", int(state.step))

    # ------------------------------------------------------------------ loop
    metrics_log = loop.MetricsLog(workdir, int(state.step), enabled=is_chief)
    try:
        result = loop.train_loop(state, parts, total_steps=spec.train.num_steps, train=spec.train,
                                 checkpointer=checkpointer, saved_config=saved_config, writer=writer,
                                 metrics_log=metrics_log)
        if result.preempted:
            return {"preempted_at_step": result.step}
        # -------------------------------------------------------------- final evaluation
        if parts.final is None:
            return {"step": result.step}
        results = parts.final(result.state, result.step)
        writer.write_scalars(result.step, results)
        print("final evaluation: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(results.items())), flush=True)
        return results
    finally:
        checkpointer.wait()
        writer.flush()
        metrics_log.close()

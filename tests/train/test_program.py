"""The training program with a third, toy model (linear regression on random data) that writes only its parts:
it gets metrics.jsonl, exact resume, preemption, the non-finite guard, the workdir lock and the final
evaluation from the program, without a line of its own."""

import dataclasses
import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fvq_jax import checkpointing, config_lib, sharding
from fvq_jax.train import loop, program
from fvq_jax.train.lock import WorkdirLock, WorkdirLocked
from fvq_jax.train.optimizer import make_optimizer
from fvq_jax.train.spec import RunSpec
from fvq_jax.train.state import TrainState, create_state, model_fields
from fvq_jax.train.update import apply_gradients, keep_if_finite
from tests.conftest import ROOT

TRUE_W = np.array([[1.0], [-1.5], [0.5], [2.0]], np.float32)  # y = x @ TRUE_W
EXAMPLES = 64


def toy_config(**train) -> ml_collections.ConfigDict:
    """A train block, the shared optim (constant LR) and mesh blocks, and the toy's own `toy` block."""
    gpt = config_lib.load_file(ROOT / "configs" / "gpt.py").get_config("")
    config = ml_collections.ConfigDict(dict(
        seed=0, precision="fp32", optim=gpt.optim.to_dict(), mesh=gpt.mesh.to_dict(),
        train=dict(global_batch=8, num_steps=6, log_every=1, checkpoint_every=2, keep_checkpoints=10, keep_every=0,
                   restore_step=0, allow_changes=""),
        toy=dict(preempt_after=0)))  # > 0: a hook sends SIGTERM to this process after that step
    config.optim.update(base_lr=0.3, lr_ref_batch=8, schedule="const", weight_decay=0.0)
    config.train.update(train)
    return config


# ---------------------------------------------------------------------- the toy model's parts: all it writes

@dataclasses.dataclass(frozen=True)
class ToySpec(config_lib.Spec):
    preempt_after: int

    def __post_init__(self):
        config_lib.require_number(self.preempt_after, "preempt_after", strict=False, integer=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyRunSpec(RunSpec):
    toy: ToySpec


def resolve(config, num_devices=None, num_processes=None):
    spec = ToyRunSpec.from_config(config)
    spec.check_devices(num_devices, num_processes)
    return spec


def build_parts(spec, context: program.Context) -> program.Parts:
    tx = make_optimizer(spec.optim, total_steps=spec.train.num_steps, global_batch=spec.train.global_batch)

    def init():
        graph, fields = model_fields(nnx.Linear(4, 1, rngs=nnx.Rngs(spec.seed)), tx, keep_ema=False)
        return graph, TrainState(**fields)

    layout = create_state(init, context.mesh, spec.mesh)

    def step(state, batch):
        def loss_fn(params):
            return jnp.mean(jnp.square(nnx.merge(layout.graphs, params, state.model_state)(batch["x"]) - batch["y"]))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        params, opt_state, norms = apply_gradients(tx, grads, state.opt_state, state.params)
        metrics = dict(norms, loss=loss)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        new_state, metrics["finite"] = keep_if_finite(new_state, state, metrics)
        return new_state, metrics

    x = np.random.default_rng(1).normal(size=(EXAMPLES, 4)).astype(np.float32)
    examples = [{"x": x[i], "y": x[i] @ TRUE_W} for i in range(EXAMPLES)]
    data = iter(grain.MapDataset.source(examples).seed(spec.seed).shuffle().repeat().to_iter_dataset()
                .batch(spec.train.global_batch))

    def preempt(step, state):
        os.kill(os.getpid(), signal.SIGTERM)

    def final(state, step):
        return {"weight_error": float(np.abs(np.asarray(state.params["kernel"][...]) - TRUE_W).max())}

    return program.Parts(
        layout=layout, step=jax.jit(step, donate_argnums=(0,)), data=data,
        batch_sharding=sharding.data_sharding(context.mesh), console=lambda step, s: f"loss {s['loss']:.4f}",
        rates={"examples_per_sec": spec.train.global_batch},
        hooks=[loop.Periodic(spec.toy.preempt_after, preempt)] if spec.toy.preempt_after else [], final=final)


TOY = program.Recipe("toy", build_parts)


def train(config, workdir):
    """What `tasks.run` does for a trainer: resolve once, then the program."""
    return program.train_and_evaluate(TOY, resolve(config), workdir)


# ---------------------------------------------------------------------- what it gets for free

def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    return [(r["step"], r["loss"], r["grad_norm"], r["param_norm"]) for r in metrics(workdir)]


def saved_steps(workdir):
    return checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).all_steps()


def kernel(workdir, step):
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    return np.asarray(checkpointer.restore_partial(step, {"params": {"kernel": {"value": jax.ShapeDtypeStruct(
        (4, 1), jnp.float32)}}})["params"]["kernel"]["value"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("toy"))
    return workdir, train(toy_config(), workdir)


def test_the_toy_trains_logs_and_is_evaluated(uninterrupted):
    workdir, results = uninterrupted
    logged = metrics(workdir)
    assert [r["step"] for r in logged] == list(range(1, 7))
    assert logged[-1]["examples_per_sec"] == pytest.approx(8 * logged[-1]["steps_per_sec"])
    assert logged[-1]["data_skipped"] == 0 and logged[-1]["param_norm"] > 0
    assert saved_steps(workdir) == [2, 4, 6] and not os.path.exists(os.path.join(workdir, "LOCK"))
    # The final evaluation: the toy's function of the last state, returned as the run's result; it learns.
    np.testing.assert_allclose(results["weight_error"], np.abs(kernel(workdir, 6) - TRUE_W).max(), rtol=1e-6)
    assert results["weight_error"] < 0.6 * np.abs(kernel(workdir, 2) - TRUE_W).max()
    saved = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).restore_config(6)
    assert saved["train"]["num_steps"] == 6 and saved["run"]["global_batch"] == 8


def test_the_toy_resumes_exactly_after_preemption(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    workdir = str(tmp_path / "run")
    stopped = train(_preempting(3), workdir)
    assert stopped == {"preempted_at_step": 4} and saved_steps(workdir) == [2, 4]  # stopped at the next boundary
    train(toy_config(allow_changes="toy.preempt_after"), workdir)
    assert losses(workdir) == losses(reference)  # the input position and the state came back exactly
    np.testing.assert_array_equal(kernel(workdir, 6), kernel(reference, 6))


def _preempting(after: int) -> ml_collections.ConfigDict:
    config = toy_config()
    config.toy.preempt_after = after
    return config


def test_the_toy_gets_the_guard_the_config_diff_and_the_lock(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    workdir = str(tmp_path / "run")
    train(toy_config(num_steps=4), workdir)
    changed = toy_config(num_steps=4)
    changed.optim.base_lr = 0.6
    with pytest.raises(config_lib.ConfigError, match=r"optim.base_lr: 0.3 -> 0.6"):
        train(changed, workdir)
    exploding = toy_config(num_steps=6, allow_changes="train.num_steps,optim.base_lr")
    exploding.optim.base_lr = 1e30
    with pytest.raises(loop.NonFiniteStep, match=r"step 5: the update left non-finite parameters .*last checkpoint: 4"):
        train(exploding, workdir)
    assert saved_steps(workdir) == [2, 4] and [r["step"] for r in metrics(workdir)] == [1, 2, 3, 4]
    with WorkdirLock(workdir), pytest.raises(WorkdirLocked):
        train(toy_config(), workdir)
    with pytest.raises(config_lib.ConfigError, match="toy.preempt_after"):  # the toy's own check, before anything
        train(_preempting(-1), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()

"""Starting a run: a fresh state, or the saved one, checked against the config before anything is read.

`resume_or_init` picks the step to resume (the newest readable one, or `train.restore_step`; the fallback is
checkpointing.newest_readable's), refuses a config
that changed any field that alters the computation (listing each as field: old -> new; fields named
in `train.allow_changes` may change), refuses an allowed change that gives the model other arrays than
the saved ones (a changed model cannot resume: it points to a new workdir, with `train.init_from` where
the trainer has it), and falls back past a broken newest checkpoint to the previous one (naming the step
and the error, the broken one set aside, never deleted).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable, TypeVar

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from fvq_jax import checkpointing, config_lib

if TYPE_CHECKING:
    from fvq_jax.train.spec import RunSpec

S = TypeVar("S")

# Fields that never change what a run computes: logging and checkpoint cadence, evaluation, the
# device mesh (checkpoints restore on any mesh), decoding threads and buffers, resume controls, and what
# only derives train.num_steps (epochs, the step floor: the resolved num_steps is saved and compared).
RESUME_SAFE_FIELDS = (
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.keep_every", "train.image_every",
    "train.eval_every", "train.sample_every", "train.allow_changes", "train.restore_step", "train.num_epochs",
    "train.min_steps", "eval", "sample", "mesh", "data.read_threads", "data.prefetch_buffer", "run",
)
# The most arrays a refusal lists by name.
LISTED = 8


class ConfigChanged(config_lib.ConfigError):
    """Resuming with a config that computes something else than the saved run."""


def config_json(config: ml_collections.ConfigDict) -> dict:
    """The config as saved in checkpoints (JSON types). A ConfigDict, not a spec: what a checkpoint saves and a
    resume compares is the config as resolved (RunSpec.config), every field as written."""
    return json.loads(config.to_json_best_effort())


def allowed_changes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """train.allow_changes (a string: TrainSpec checked it) as field names (or block prefixes)."""
    return tuple(name.strip() for name in config.train.get("allow_changes", "").split(",") if name.strip())


def with_later_fields(saved: dict) -> dict:
    """The saved config with the quantizer fields added since it was written read as the values that
    reproduce it (QuantizerSpec.later_fields), and a GPT's model block as models.gpt.upgraded_block
    reads it: a field that did not exist is not a change."""
    from fvq_jax.models.gpt import upgraded_block
    from fvq_jax.quantizers.factory import QuantizerSpec

    if saved.get("task") == "gpt":
        return dict(saved, model=upgraded_block(saved["model"]))
    if not isinstance(saved.get("quantizer"), dict):
        return saved
    return dict(saved, quantizer={**QuantizerSpec.later_fields(), **saved["quantizer"]})


def check_resume_config(saved: dict, config: ml_collections.ConfigDict, step: int) -> list[str]:
    """ConfigChanged listing every field that differs from the checkpoint's config and may not; returns the
    fields that differ because train.allow_changes allows them. `config`: the resolved config of the run
    (RunSpec.config), compared field by field with the saved JSON."""
    saved = with_later_fields(saved)
    allowed = allowed_changes(config)
    changes = config_lib.config_changes(saved, config_json(config), ignore=RESUME_SAFE_FIELDS + allowed)
    if changes:
        lines = "\n".join(f"  {field}: {old!r} -> {new!r}" for field, old, new in changes)
        names = ",".join(field for field, _, _ in changes)
        raise ConfigChanged("train.allow_changes", f"the config differs from the one saved with step {step} in a way "
                            f"that changes the computation:\n{lines}\nResume with the saved values, use a new "
                            f"--workdir, or allow these changes with --config.train.allow_changes={names}")
    permitted = config_lib.config_changes(saved, config_json(config), ignore=RESUME_SAFE_FIELDS)
    if permitted:
        logging.warning("resuming step %d with changes allowed by train.allow_changes: %s", step,
                        "; ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in permitted))
    return [field for field, _, _ in permitted]


def check_same_arrays(saved: dict[str, tuple], built: dict[str, tuple], can_init: bool, step: int,
                      allowed: list[str], workdir) -> None:
    """ConfigChanged unless the state this config builds has the arrays (names and shapes, `built`) of the one
    saved with `step` (`saved`): a model changed by an allowed field (model.preset, a width, an EMA turned on)
    cannot take the saved arrays, and restoring it would only fail as if every checkpoint were unreadable.
    The message says what can start from the saved run instead: train.init_from (`can_init`: the trainer has
    it) when the parameters agree and only the optimizer state or EMA differ, else a new workdir."""
    # In the built state's order (a TrainState lists its parameters first), then what only the saved one has.
    differ = [name for name in {**built, **saved} if saved.get(name) != built.get(name)]
    if not differ:
        return
    lines = "\n".join(f"  {name}: {saved.get(name, 'absent')} -> {built.get(name, 'absent')}"
                      for name in differ[:LISTED])
    more = f"\n  ... and {len(differ) - LISTED} more" if len(differ) > LISTED else ""
    cause = (f"the changes allowed by train.allow_changes ({', '.join(allowed)}) change the model" if allowed else
             "this version of the code builds it differently")
    if can_init and not any(name.startswith("params.") for name in differ):
        start = f"start a new run from its weights instead: --workdir=NEW_DIR --config.train.init_from={workdir}"
    else:
        start = "train it in a new --workdir instead" + (
            " (train.init_from cannot start it from these weights either: their shapes differ)" if can_init else "")
    raise ConfigChanged("train.allow_changes", f"the checkpoint of step {step} holds other arrays than the state this "
                        f"config builds ({len(differ)} differ, saved -> built):\n{lines}{more}\n{cause}, and a changed "
                        f"model cannot resume: {start}")


def _set_aside(checkpointer: checkpointing.Checkpointer, steps, reason: str) -> None:
    if jax.process_index() == 0:
        for step in steps:
            checkpointer.set_aside(step, reason)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside {reason}")
    checkpointer.reload()


def resume_or_init(checkpointer: checkpointing.Checkpointer, spec: RunSpec, init: Callable[[], S], abstract: S,
                   data_iterator=None) -> S:
    """The state to train from: the chosen saved step restored onto `abstract` (its shardings; the input
    iterator `data_iterator` set to the saved position), or `init()` when none is saved."""
    steps = sorted(checkpointer.all_steps())
    requested = spec.train.restore_step or None
    if requested is not None:
        config_lib.require(requested in steps, "train.restore_step",
                           f"no checkpoint of step {requested} in {checkpointer.directory}; saved steps: {steps}")
        later = [s for s in steps if s > requested]
        if later:
            logging.warning("train.restore_step=%d: steps %s move aside so the run can save them again", requested, later)
            _set_aside(checkpointer, later, f"after-restore-step-{requested}")
        steps = [s for s in steps if s <= requested]
    if not steps:
        return init()

    def read(step: int) -> S:
        allowed = check_resume_config(checkpointer.restore_config(step), spec.config, step)
        check_same_arrays(checkpointer.saved_shapes(step), checkpointing.array_shapes(abstract),
                          hasattr(spec.train, "init_from"), step, allowed, checkpointer.directory.parent)
        return checkpointer.restore(step, abstract, data_iterator=data_iterator)

    _, state, broken = checkpointing.newest_readable(checkpointer, read, step=requested)
    if broken:
        _set_aside(checkpointer, broken, "unreadable")
    return state

"""Starting a run: a fresh state, or the saved one, checked against the config before anything is read.

`resume_or_init` picks the step to resume (the newest, or `train.restore_step`), refuses a config
that changed any field that alters the computation (listing each as field: old -> new; fields named
in `train.allow_changes` may change), and falls back past a broken newest checkpoint to the
previous one (naming the step and the error, the broken one set aside, never deleted).
"""

from __future__ import annotations

import json
from typing import Callable, TypeVar

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from fvq_jax import checkpointing, config_lib

S = TypeVar("S")

# Fields that never change what a run computes: logging and checkpoint cadence, evaluation, the
# device mesh (checkpoints restore on any mesh), decoding threads and buffers, resume controls.
RESUME_SAFE_FIELDS = (
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.keep_every", "train.image_every",
    "train.eval_every", "train.sample_every", "train.allow_changes", "train.restore_step", "eval", "sample", "mesh",
    "data.read_threads", "data.prefetch_buffer", "run",
)


class ConfigChanged(config_lib.ConfigError):
    """Resuming with a config that computes something else than the saved run."""


def config_json(config: ml_collections.ConfigDict) -> dict:
    """The config as saved in checkpoints (JSON types)."""
    return json.loads(config.to_json_best_effort())


def allowed_changes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """train.allow_changes: a comma-separated string of field names (or block prefixes)."""
    value = config.train.get("allow_changes", "")
    config_lib.require(isinstance(value, str), "train.allow_changes",
                       f"must be a comma-separated string of field names, got {value!r}")
    return tuple(name.strip() for name in value.split(",") if name.strip())


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


def check_resume_config(saved: dict, config: ml_collections.ConfigDict, step: int) -> None:
    """ConfigChanged listing every field that differs from the checkpoint's config and may not."""
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


def _everyone(ok: bool) -> bool:
    """True when `ok` holds on every process (the same verdict everywhere)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _set_aside(checkpointer: checkpointing.Checkpointer, steps, reason: str) -> None:
    if jax.process_index() == 0:
        for step in steps:
            checkpointer.set_aside(step, reason)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside {reason}")
    checkpointer.reload()


def resume_or_init(checkpointer: checkpointing.Checkpointer, config: ml_collections.ConfigDict,
                   init: Callable[[], S], restore: Callable[[int], S]) -> S:
    """The state to train from: `restore(step)` of the chosen saved step, or `init()` when none is saved.

    restore(step) must raise checkpointing.CheckpointUnreadable for a step that cannot be read.
    """
    steps = sorted(checkpointer.all_steps())
    requested = config.train.get("restore_step", 0) or None
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
    broken = []
    for step in reversed(steps):
        try:
            saved = checkpointer.restore_config(step)
            check_resume_config(saved, config, step)
            state = restore(step)
            ok = True
        except checkpointing.CheckpointUnreadable as error:
            if requested is not None:
                raise
            logging.error("%s; falling back to the previous checkpoint", error)
            ok = False
        if _everyone(ok):
            if broken:
                _set_aside(checkpointer, broken, "unreadable")
            return state
        broken.append(step)
    raise FileNotFoundError(f"no readable checkpoint in {checkpointer.directory}: steps {sorted(broken)} are all "
                            "unreadable (see the errors above)")

"""Checkpoints: the only module that touches Orbax.

A checkpoint step holds three items:
  state   the train state pytree (sharded arrays; restored against an abstract target that
          carries the *new* shardings, so a run saved on N devices restores on any mesh);
  data    the grain iterator state of every process (exact resume of the input stream);
  config  JSON: the resolved config plus run facts (global batch, devices, versions), so every
          number can be traced to the settings that produced it.
Saves are atomic (Orbax writes to a temporary directory and renames), so a run killed
mid-save leaves the previous checkpoint intact. A step that cannot be read anyway (an empty or
partial step directory, a truncated array file) raises `CheckpointUnreadable` naming the step;
`set_aside` moves such a step (or steps a run goes back behind) out of the managed directory into
`<checkpoints>.aside/`: checkpoints are never deleted by anything but Orbax's keep-N policy.

An export (`save_export` / `load_export`) is one standalone checkpoint directory for inference:
  arrays  a pytree of plain nested dicts of arrays (readable without Flax);
  config  JSON: what is needed to rebuild the module the arrays belong to.

Reading: `newest_readable` is the one place that picks "the newest step that can be read, else the one before"
(resuming, loading for inference, evaluation, export and sampling all go through it), and `Saved` opens a run
or an export once for any reader.
"""

from __future__ import annotations

import logging as std_logging
import time
from typing import Any, Callable, TypeVar

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

T = TypeVar("T")


def absolute(directory) -> epath.Path:
    """Orbax rejects relative paths (the README's --workdir=workdir/run): local paths are made
    absolute; URLs (gs://...) are left as they are."""
    path = epath.Path(directory)
    return path if "://" in str(directory) else path.absolute()


class CheckpointUnreadable(RuntimeError):
    """A saved step whose items cannot be read; the message names the step, the directory and the cause."""

    def __init__(self, step: int, directory, cause: BaseException):
        first_line = (str(cause).strip().splitlines() or [""])[0][:400]
        super().__init__(f"checkpoint of step {step} in {directory} is unreadable: {type(cause).__name__}: {first_line}")
        self.step = step


class _ReadOnlyNotice(std_logging.Filter):
    """Orbax warns "Given directory is read only=..." whenever a manager opens a directory for reading, which is
    what reading a run (loading, evaluation, sampling, export) is: not worth a warning on every such command."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


logging.get_absl_logger().addFilter(_ReadOnlyNotice())


class Checkpointer:
    """Keeps the newest `max_to_keep` checkpoints plus every `keep_period`-th step for good."""

    def __init__(self, directory, *, max_to_keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True, read_only: bool = False):
        self.directory = absolute(directory)
        # Read-only: nothing to keep or save (Orbax warns when told otherwise).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep, keep_period=keep_period or None,
            save_interval_steps=0 if read_only else 1, create=not read_only,
            enable_async_checkpointing=async_save, read_only=read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, *, data_iterator=None, config: dict | None = None,
             force: bool = False) -> bool:
        """Start saving `step` (asynchronously for the arrays); returns whether it saved."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("Checkpoint of step %d -> %s", step, self.directory)
        return saved

    def saved_step(self, step: int | None = None) -> int:
        """`step` if it was saved (default: the latest step); FileNotFoundError naming the saved steps if not."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; saved steps: {sorted(steps)}")
        return step

    def restore(self, step: int | None, abstract_state, *, data_iterator=None):
        """The state at `step` (default: latest), laid out as `abstract_state`'s shardings.

        `data_iterator`, when given, is set to the saved position in place.
        """
        step = self.saved_step(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._restore(step, items)
        logging.info("Restored step %d from %s", step, self.directory)
        return restored["state"]

    def restore_partial(self, step: int | None, abstract_subtree: dict) -> dict:
        """Only the named fields of the saved state, e.g. {"params": abstract params}: the other arrays
        (optimizer moments, discriminator) are never read. Laid out as the target's shardings."""
        step = self.saved_step(step)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
        item = ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args, partial_restore=True)
        return self._restore(step, {"state": item})["state"]

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{name: shape} of every array of the state saved with `step`, read from its metadata (no array is
        read), named as `array_shapes` names a state in memory; CheckpointUnreadable when there is none."""
        try:
            metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
            return array_shapes(metadata.tree)
        except Exception as error:  # a missing or partial step directory: Orbax and the OS raise many types
            raise CheckpointUnreadable(step, self.directory, error) from error

    def restore_config(self, step: int | None = None) -> dict:
        """The JSON config saved with `step` (default: latest)."""
        step = self.saved_step(step)
        return self._restore(step, {"config": ocp.args.JsonRestore()})["config"]

    def _restore(self, step: int, items: dict):
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # Orbax, TensorStore and the OS raise many types for one broken file
            raise CheckpointUnreadable(step, self.directory, error) from error

    def set_aside(self, step: int, reason: str) -> epath.Path:
        """Move step `step` out of the managed directory to `<directory>.aside/<step>-<reason>-<time>`
        (call from one process). Returns the new location."""
        aside = epath.Path(str(self.directory) + ".aside")
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / f"{step}-{reason}-{time.strftime('%Y%m%d-%H%M%S')}"
        (self.directory / str(step)).rename(target)
        logging.warning("checkpoint of step %d set aside (%s): %s", step, reason, target)
        return target

    def reload(self) -> None:
        """Re-read the saved steps (after another process moved some)."""
        self._manager.reload()

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _everyone(ok: bool) -> bool:
    """True when `ok` holds on every process (the same verdict everywhere)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def newest_readable(checkpointer: Checkpointer, read: Callable[[int], T], *,
                    step: int | None = None) -> tuple[int, T, list[int]]:
    """`read(s)` of the newest saved step s that every process reads, or of exactly `step` when one is asked for:
    the one place that falls back past a broken checkpoint. Returns (s, its value, the newer steps that were
    unreadable). A step whose read raises CheckpointUnreadable is reported by step and cause and the previous
    one is read, unless `step` was asked for (then the error stands); any other error (a config refused, a model
    of another task) stands at once. FileNotFoundError when nothing is saved or every step is unreadable."""
    candidates = [checkpointer.saved_step(step)] if step is not None else sorted(checkpointer.all_steps(), reverse=True)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    broken = []
    for candidate in candidates:
        value, ok = None, True
        try:
            value = read(candidate)
        except CheckpointUnreadable as error:
            if step is not None:
                raise
            logging.error("%s; falling back to the previous checkpoint", error)
            ok = False
        if _everyone(ok):
            return candidate, value, broken
        broken.append(candidate)
    raise FileNotFoundError(f"no readable checkpoint in {checkpointer.directory}: steps {sorted(broken)} are all "
                            "unreadable (see the errors above)")


class Saved:
    """A model saved for reading: a training run (holds checkpoints/) or an export (config/ and arrays/),
    told apart and checked to exist once, when opened.

    `read(fn, step)` calls fn(config, restore, step) once, on the newest readable checkpoint of a run (or `step`;
    `newest_readable`) or on the export: `config` is the JSON config saved with the arrays, `restore(target)`
    reads the arrays `target` names (a run: any fields of its state, e.g. {"params": ..., "model_state": ...},
    nothing else read; an export: its whole tree), laid out as the target's shardings.
    """

    def __init__(self, path):
        self.path = epath.Path(path)
        self.is_run = (self.path / "checkpoints").exists()
        if not self.is_run and not (self.path / "config").exists():
            raise FileNotFoundError(f"no checkpoint under {path}: train first, or check --workdir (a training run "
                                    "holds checkpoints/, an export config/ and arrays/)")
        self.checkpointer = Checkpointer(self.path / "checkpoints", read_only=True,
                                         async_save=False) if self.is_run else None

    def read(self, fn: Callable[[dict, Callable[[Any], Any], int | None], T], step: int | None = None) -> T:
        if not self.is_run:
            if step is not None:
                raise ValueError(f"{self.path} is an export (one set of weights): a step applies to training runs")
            return fn(load_export_config(self.path), lambda target: load_export(self.path, target), None)
        checkpointer = self.checkpointer
        _, value, _ = newest_readable(checkpointer, lambda s: fn(
            checkpointer.restore_config(s), lambda target: checkpointer.restore_partial(s, target), s), step=step)
        return value

    def config(self, step: int | None = None) -> dict:
        """The config saved with the arrays (a run: of `step`, or the newest readable checkpoint)."""
        return self.read(lambda config, restore, step: config, step)


def save_export(directory, arrays, config: dict) -> None:
    """Write `arrays` (a pytree of jax.Arrays) and the JSON `config` as one checkpoint in `directory`,
    which must not exist yet (blocks until written)."""
    directory = absolute(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new directory")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                             config=ocp.args.JsonSave(config)))
    logging.info("Exported to %s", directory)


def _export_item(directory, **item):
    directory = absolute(directory)
    if not (directory / "config").exists():
        raise FileNotFoundError(f"no exported checkpoint in {directory}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(directory, args=ocp.args.Composite(**item))


def load_export_config(directory) -> dict:
    """The JSON config of the export in `directory`."""
    return _export_item(directory, config=ocp.args.JsonRestore())["config"]


def load_export(directory, abstract_arrays):
    """The arrays of the export in `directory`, laid out as `abstract_arrays`' shardings (whose tree
    must match the saved one)."""
    return _export_item(directory, arrays=ocp.args.StandardRestore(abstract_arrays))["arrays"]


def array_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{dotted name: shape} of the arrays of a pytree (arrays, abstract arrays or saved metadata), named as
    Orbax names them in a checkpoint ("params.decoder.conv_in.kernel.value", "opt_state.0.mu...")."""
    return {name: tuple(leaf.shape) for name, leaf in ocp.tree.to_flat_dict(tree, sep=".").items()
            if leaf is not None}


def run_facts(global_batch: int) -> dict:
    """What, beyond the config, a checkpoint records about the run that wrote it."""
    return {
        "global_batch": global_batch,
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
    }

"""Load a trained model for inference, on whatever devices are present now.

`load_tokenizer(path)` (evaluation, export, code extraction, sampling) and `load_gpt(path)` (sampling, fine-tuning)
serve every reader alike. `path` is
  a training run (holds checkpoints/): the newest step (or `step`), its EMA weights when the run
      kept them and `use_ema`, else the raw ones, plus the model's other state (usage window, EMA
      codebook statistics); nothing else is read: no discriminator, no optimizer moments;
  an export (`python -m fvq_jax.tools.export_vq`, `python -m fvq_jax.tools.import_torch`): its arrays.
The module is rebuilt from the config saved beside the arrays, which are restored against an abstract
target carrying the current mesh's shardings (a run saved on 8 devices loads on 1 CPU, and back).
A newest checkpoint that cannot be read is reported and the previous one loaded (when no step was asked):
`checkpointing.Saved` opens the run once and `checkpointing.newest_readable` is the one fallback.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import ml_collections
from etils import epath
from flax import nnx

from fvq_jax import checkpointing, sharding
from fvq_jax.models.factory import VQGANSpec, build_gpt, build_tokenizer, compute_dtype
from fvq_jax.models.gpt import GPT, stack_layers, unstack_layers


def choose_weights(has_ema: bool, use_ema: bool) -> str:
    """Which weights inference uses: "ema" when the run kept an EMA and it is wanted, else "raw"."""
    return "ema" if use_ema and has_ema else "raw"


@dataclasses.dataclass
class Loaded:
    model: nnx.Module
    config: ml_collections.ConfigDict  # the config saved with the arrays (a run's training config)
    step: int | None  # the checkpoint step (an export: the step it was exported from, if known)
    weights: str  # "ema" | "raw"
    source: str  # the run or export directory
    mesh: jax.sharding.Mesh


def is_run(path) -> bool:
    return (epath.Path(path) / "checkpoints").exists()


def saved_config(path, step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved in a run's checkpoint (`step`, or the newest readable one) or with an export."""
    return ml_collections.ConfigDict(checkpointing.Saved(path).config(step))


def _abstract(build: Callable[[ml_collections.ConfigDict], nnx.Module], config, mesh, mesh_cfg):
    graph, params, rest = nnx.split(nnx.eval_shape(lambda: build(config)), nnx.Param, ...)
    shard = lambda tree: sharding.with_shardings(tree, sharding.config_shardings(tree, mesh, mesh_cfg))  # noqa: E731
    return graph, shard(params), shard(rest)


def load_model(path, *, task: str | None, step: int | None = None, use_ema: bool = True,
               mesh_cfg: sharding.MeshSpec | None = None,
               check: Callable[[ml_collections.ConfigDict], None] | None = None) -> Loaded:
    """The model saved in `path` (see module docstring): of task `task` ("tokenizer" | "gpt"; None: whichever it
    holds). `check(config)`, when given, runs on the saved config before any array is read (its errors stand:
    no fallback)."""
    saved = checkpointing.Saved(path)
    if not saved.is_run and (step is not None or not use_ema):
        raise ValueError(f"{path} is an export (one set of weights): a step and the EMA choice apply to training runs")
    mesh_cfg = mesh_cfg or sharding.MeshSpec.default()
    mesh = sharding.make_mesh(mesh_cfg)

    def read(config: dict, restore: Callable, step: int | None) -> Loaded:
        config = ml_collections.ConfigDict(config)
        saved_task = config.get("task", "tokenizer")
        if task is not None and saved_task != task:
            raise ValueError(f"{path} holds a {saved_task!r} model, not a {task!r} one")
        if saved_task not in BUILDERS:
            raise ValueError(f"{path} holds a {saved_task!r} model: not a tokenizer or a GPT")
        if check is not None:
            check(config)
        graph, params, rest = _abstract(BUILDERS[saved_task], config, mesh, mesh_cfg)
        if not saved.is_run:
            arrays = restore({"params": nnx.to_pure_dict(params), "state": nnx.to_pure_dict(rest)})
            nnx.replace_by_pure_dict(params, arrays["params"])
            nnx.replace_by_pure_dict(rest, arrays["state"])
            record = config.get("export", {})
            return Loaded(nnx.merge(graph, params, rest), config, record.get("step"), record.get("weights", "raw"),
                          str(path), mesh)
        weights = choose_weights(bool(config.optim.get("ema_decay", 0.0)), use_ema)
        field = "ema_params" if weights == "ema" else "params"
        restored = restore({field: params, "model_state": rest})
        return Loaded(nnx.merge(graph, restored[field], restored["model_state"]), config, step, weights, str(path),
                      mesh)

    return saved.read(read, step)


def build_tokenizer_for_inference(config: ml_collections.ConfigDict) -> nnx.Module:
    """The VQGAN `config` describes, in its compute precision (weights are overwritten on load)."""
    return build_tokenizer(VQGANSpec.from_config(config), dtype=compute_dtype(config.precision), rngs=nnx.Rngs(0))


def load_tokenizer(path, *, step: int | None = None, use_ema: bool = True,
                   mesh_cfg: sharding.MeshSpec | None = None,
                   check: Callable[[ml_collections.ConfigDict], None] | None = None) -> Loaded:
    """The tokenizer (VQGAN) of a training run or an export; see the module docstring and `load_model`."""
    return load_model(path, task="tokenizer", step=step, use_ema=use_ema, mesh_cfg=mesh_cfg, check=check)


def build_gpt_for_inference(config: ml_collections.ConfigDict) -> nnx.Module:
    """The GPT a GPT run's (or export's) config describes, in its compute precision."""
    return build_gpt(config.model, dtype=compute_dtype(config.precision), rngs=nnx.Rngs(0))


# What builds each task's model from its saved config (weights are overwritten on load).
BUILDERS = {"tokenizer": build_tokenizer_for_inference, "gpt": build_gpt_for_inference}


def load_gpt(path, *, step: int | None = None, use_ema: bool = True,
             mesh_cfg: sharding.MeshSpec | None = None, scan_layers: bool | None = None) -> Loaded:
    """The GPT of a training run or an export; see the module docstring. scan_layers: the layout of the model
    returned (None: the one it was saved in, which `config` describes; saved parameters of the other layout are
    converted by models.gpt.stack_layers / unstack_layers)."""
    loaded = load_model(path, task="gpt", step=step, use_ema=use_ema, mesh_cfg=mesh_cfg)
    if scan_layers is None or scan_layers == loaded.model.config.scan_layers:
        return loaded
    return dataclasses.replace(loaded, model=_with_layers(loaded.model, scan_layers))


def _with_layers(model: GPT, scan_layers: bool) -> GPT:
    """`model` (nothing but parameters) rebuilt in the other layout of its layers, holding the same weights."""
    config = dataclasses.replace(model.config, scan_layers=scan_layers)
    graph, params = nnx.split(nnx.eval_shape(lambda: GPT(config, dtype=model.dtype, rngs=nnx.Rngs(0))))
    convert = stack_layers if scan_layers else unstack_layers
    nnx.replace_by_pure_dict(params, convert(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    return nnx.merge(graph, params)


def load_recorded_tokenizer(record, *, mesh_cfg: sharding.MeshSpec | None = None) -> Loaded:
    """The tokenizer a record {path, step, weights} names (code extraction writes one into its manifest and
    the GPT run keeps it): the same step and weights of a run, or the export."""
    if is_run(record["path"]):
        return load_tokenizer(record["path"], step=record.get("step"), use_ema=record.get("weights") == "ema",
                              mesh_cfg=mesh_cfg)
    return load_tokenizer(record["path"], mesh_cfg=mesh_cfg)


def tokenizer_record(loaded: Loaded) -> dict:
    """What `load_recorded_tokenizer` needs to load `loaded` again."""
    return dict(path=str(epath.Path(loaded.source).absolute()), step=loaded.step, weights=loaded.weights)

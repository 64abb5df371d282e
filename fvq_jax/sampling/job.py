"""The sampling job (configs/sample.py): class-conditional samples of a GPT run, decoded, written as ADM .npz.

Work is split by global sample index: batch b holds indices [b B, (b + 1) B) of the global batch B, cut
over every device of every host (data x fsdp); its labels (class-balanced: floor(i C / N)) and keys
(fold_in(key(seed), i)) are computed from the indices on the device, so a sample does not depend on
the batch it lands in or the number of devices. Each process writes the rows it holds; a batch is
skipped on a rerun when every process has written it.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from fvq_jax import config_lib, sharding
from fvq_jax.evaluation import reports
from fvq_jax.models.load import load_gpt, load_recorded_tokenizer, load_tokenizer, tokenizer_record
from fvq_jax.sampling.images import decode_fn
from fvq_jax.sampling.sampler import SamplingConfig, generation_fn
from fvq_jax.progress import format_eta


def check_config(config: ml_collections.ConfigDict) -> SamplingConfig:
    s = config.sample
    for name in ("num_samples", "step"):
        config_lib.require_number(s[name], f"sample.{name}", strict=False, integer=True)
    for name in ("per_class", "batch_size", "grid_classes", "grid_per_class"):
        config_lib.require_number(s[name], f"sample.{name}", integer=True)
    config_lib.require(isinstance(s.use_ema, bool), "sample.use_ema", f"must be true or false, got {s.use_ema!r}")
    try:
        return SamplingConfig(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale,
                              cfg_schedule=s.cfg_schedule, cfg_interval=tuple(s.cfg_interval))
    except ValueError as e:
        raise config_lib.ConfigError("sample", str(e)) from None


def output_name(s: ml_collections.ConfigDict, step: int, num_samples: int) -> str:
    if s.name:
        return s.name
    parts = [f"step{step}", f"n{num_samples}", f"cfg{s.cfg_scale:g}", f"seed{s.seed}"]
    if s.cfg_schedule != "constant":
        parts.append(s.cfg_schedule)
    if tuple(s.cfg_interval) != (0.0, 1.0):
        parts.append("interval{:g}-{:g}".format(*s.cfg_interval))
    parts += [f"{k}{s[k]:g}" for k, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)) if s[k] != default]
    return "-".join(parts)


class Sampler:
    """The sharded generate-and-decode step of a GPT and its tokenizer on one mesh."""

    def __init__(self, gpt: nnx.Module, tokenizer: nnx.Module, config: SamplingConfig, *, seed: int,
                 num_samples: int, mesh: jax.sharding.Mesh, rules):
        self.grid = gpt.config.grid
        self.num_classes = gpt.config.num_classes
        self.batch_sharding = sharding.data_sharding(mesh)
        self.mesh = mesh
        gpt_graph, self.gpt_params = nnx.split(gpt)
        tok_graph, self.tok_params, self.tok_rest = nnx.split(tokenizer, nnx.Param, ...)
        generate, decode = generation_fn(gpt_graph, config), decode_fn(tok_graph)
        classes, grid = self.num_classes, self.grid
        # Labels are computed in int32 on the device (JAX's default integers): i * classes must fit.
        config_lib.require(num_samples * classes < 2 ** 31, "sample.num_samples",
                           f"{num_samples} samples x {classes} classes overflows the int32 label arithmetic")

        def step(gpt_params, tok_params, tok_rest, indices):
            with sharding.axis_rules(rules):
                labels = indices.astype(jnp.int32) * classes // num_samples
                keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
                codes = generate(gpt_params, labels, keys)
                images = decode(tok_params, tok_rest, codes.reshape(-1, grid, grid))
            return codes, images, labels

        self._step = jax.jit(step, out_shardings=(self.batch_sharding,) * 3)

    def __call__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sample indices [B] (this process passes its share) -> this process's (codes, uint8 images,
        labels) as numpy."""
        global_indices = jax.make_array_from_process_local_data(self.batch_sharding, indices.astype(np.int32))
        out = self._step(self.gpt_params, self.tok_params, self.tok_rest, global_indices)
        return tuple(np.asarray(multihost_utils.global_array_to_host_local_array(x, self.mesh, self.batch_sharding.spec))
                     for x in out)


def sample_run(config: ml_collections.ConfigDict, workdir, out=None) -> epath.Path:
    """Sample the GPT run in `workdir` as `config.sample` says into `out` (None: workdir/samples/<name>);
    returns the output directory."""
    sampling = check_config(config)
    s = config.sample
    mesh = sharding.make_mesh(config.mesh)
    shards = sharding.batch_shards(config.mesh, jax.device_count())
    config_lib.require(s.batch_size % shards == 0 and s.batch_size % jax.process_count() == 0, "sample.batch_size",
                       f"{s.batch_size} does not split over the {shards} data-parallel devices and "
                       f"{jax.process_count()} processes")
    with jax.set_mesh(mesh):
        gpt = load_gpt(workdir, step=s.step or None, use_ema=s.use_ema, mesh_cfg=config.mesh)
        if s.tokenizer:
            tokenizer = load_tokenizer(s.tokenizer, mesh_cfg=config.mesh)
        else:
            record = gpt.config.codes.get("tokenizer")
            config_lib.require(record is not None, "sample.tokenizer",
                               f"the run in {workdir} records no tokenizer; name one (a run or an export)")
            tokenizer = load_recorded_tokenizer(record, mesh_cfg=config.mesh)
        num_classes = gpt.model.config.num_classes
        num_samples = s.num_samples or s.per_class * num_classes
        out = epath.Path(out or epath.Path(workdir) / "samples" / output_name(s, gpt.step, num_samples))
        out.mkdir(parents=True, exist_ok=True)
        sampler = Sampler(gpt.model, tokenizer.model, sampling, seed=s.seed, num_samples=num_samples, mesh=mesh,
                          rules=sharding.rules_of(config.mesh))
        _write_manifest(out, config, gpt, tokenizer, num_samples, num_classes)
        _sample_batches(sampler, out, num_samples, s.batch_size)
        _write_grid(sampler, out, num_samples, num_classes, s)
    print(f"{num_samples} samples of step {gpt.step} ({gpt.weights} weights) in {out}", flush=True)
    return out


def _sample_batches(sampler: Sampler, out: epath.Path, num_samples: int, batch_size: int) -> None:
    p, count = jax.process_index(), jax.process_count()
    local = batch_size // count
    num_batches = -(-num_samples // batch_size)
    start, done = time.time(), 0
    for b in range(num_batches):
        path = out / f"batch_{b:05d}_p{p:03d}.npz"
        if bool(multihost_utils.process_allgather(np.asarray(path.exists())).all()) if count > 1 else path.exists():
            continue
        indices = b * batch_size + p * local + np.arange(local)
        codes, images, labels = sampler(indices)
        keep = indices < num_samples  # the last batch runs padded
        with path.open("wb") as f:
            np.savez(f, arr_0=images[keep], arr_1=labels[keep], indices=indices[keep], codes=codes[keep])
        done += 1
        rate = done / (time.time() - start)
        if p == 0:
            print(f"batch {b + 1}/{num_batches}  {rate * batch_size:.1f} img/s  "
                  f"ETA {format_eta((num_batches - b - 1) / max(rate, 1e-9))}", flush=True)


def _write_grid(sampler: Sampler, out: epath.Path, num_samples: int, num_classes: int, s) -> None:
    """grid.png: the first samples of the first classes, regenerated from their indices (the same images)."""
    classes = min(s.grid_classes, num_classes)
    per_class = max(1, min(s.grid_per_class, num_samples // num_classes))
    firsts = [-(-c * num_samples // num_classes) for c in range(classes)]  # the first index of class c
    wanted = np.array([f + j for f in firsts for j in range(per_class)])
    p, count = jax.process_index(), jax.process_count()
    local = s.batch_size // count
    padded = np.resize(wanted, -(-wanted.size // s.batch_size) * s.batch_size)
    images = []
    for chunk in padded.reshape(-1, s.batch_size):
        _, batch_images, _ = sampler(chunk[p * local:(p + 1) * local])
        images.append(multihost_utils.process_allgather(batch_images, tiled=True) if count > 1 else batch_images)
    if p == 0:
        grid = reports.image_grid(np.concatenate(images)[:wanted.size], columns=per_class)
        reports.save_png(grid, out / "grid.png")


def _write_manifest(out: epath.Path, config, gpt, tokenizer, num_samples: int, num_classes: int) -> None:
    if jax.process_index():
        return
    record = dict(
        sampling=config.sample.to_dict(), num_samples=num_samples, num_classes=num_classes,
        labels="floor(index * num_classes / num_samples)",
        gpt=dict(path=str(epath.Path(gpt.source).absolute()), step=gpt.step, weights=gpt.weights,
                 preset=gpt.config.model.preset),
        tokenizer=dict(tokenizer_record(tokenizer), codebook_size=int(tokenizer.model.quantizer.num_codes)),
        devices=jax.device_count(), processes=jax.process_count(), device_kind=jax.devices()[0].device_kind,
        jax_version=jax.__version__)
    (out / "sampling.json").write_text(json.dumps(record, indent=1, default=str))
    logging.info("sampling settings in %s", out / "sampling.json")

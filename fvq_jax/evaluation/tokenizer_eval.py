"""Tokenizer evaluation: reconstruct an eval split and measure it.

Used by the trainer (periodically and at the end) and by the eval entry
(`python -m fvq_jax.main --config=configs/eval_tokenizer.py --workdir=RUN`). Metrics:
  psnr, ssim  on uint8-rounded reconstructions (data range 255, the published convention);
  lpips       LPIPS-VGG16 between input and clipped reconstruction;
  usage       exact union of the codes used over the whole split, perplexity, dead codes,
              plus codebook health (effective rank, near-duplicate codes) of the searched codebook;
  rfid        Fréchet distance of Inception pool features, reconstructions vs the real images of
              the same split (reference statistics computed once and cached, or given).
Everything per image is reduced on device inside one jitted step, so it runs on any mesh and
on several hosts; only per-batch sums (and Inception features, for rFID) reach the host.
The reconstruction grid (reconstructions.png) shows images across the classes of the split
(`GridPicker`): in a class-sorted folder its first images would all be of one class.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from fvq_jax import config_lib, sharding
from fvq_jax.sharding import MeshSpec
from fvq_jax.data import pipeline as data_pipeline
from fvq_jax.data.spec import DataSpec
from fvq_jax.data.value_range import to_model_range, to_pixel_levels
from fvq_jax.evaluation import codebook_health, image_metrics, reports
from fvq_jax.evaluation.host import to_host
from fvq_jax.models.load import load_tokenizer
from fvq_jax.models.lpips import LPIPS
from fvq_jax.quantizers import ops
from fvq_jax.quantizers.vqbridge import BRIDGE_PRESETS
from fvq_jax.quantizers.usage import UsageCounter

METRICS = ("psnr", "ssim", "lpips", "usage", "rfid")
GRID_IMAGES = 8  # input / reconstruction pairs in a grid (reports.reconstruction_grid shows up to 8)


@dataclasses.dataclass(frozen=True)
class EvalSpec(config_lib.Spec):
    """The `eval` block of a tokenizer run resolved (configs/tokenizer.py describes each field)."""

    batch_size: int  # global
    num_images: int  # the first N of the eval split; 0 = all
    metrics: tuple[str, ...]  # of METRICS
    reference_stats: str  # .npz of the real images' Inception statistics; '' = computed once and cached

    def __post_init__(self):
        metrics = self.metrics
        config_lib.require(isinstance(metrics, (tuple, list)) and all(isinstance(m, str) for m in metrics),
                           "metrics", f"must be a tuple of metric names from {METRICS}, got {metrics!r}")
        unknown = sorted(set(metrics) - set(METRICS))
        config_lib.require(not unknown, "metrics", f"unknown {unknown}; choose from {METRICS}")
        object.__setattr__(self, "metrics", tuple(metrics))
        config_lib.require_number(self.batch_size, "batch_size", integer=True)
        config_lib.require_number(self.num_images, "num_images", strict=False, integer=True)
        config_lib.require(isinstance(self.reference_stats, str), "reference_stats",
                           f"must be a path or '', got {self.reference_stats!r}")


def _indices_counts(indices, mask: jax.Array, num_codes: int) -> jax.Array:
    """Code counts over the unmasked images; indices: one array [B, ...] or a list of them."""
    counts = jnp.zeros((num_codes,), jnp.int32)
    for idx in jax.tree.leaves(indices):
        keep = mask.reshape((-1,) + (1,) * (idx.ndim - 1))
        counts += ops.code_counts(jnp.where(keep, idx, num_codes), num_codes)  # num_codes: dropped
    return counts


class GridPicker:
    """The eval images a reconstruction grid shows, picked while the batches stream: the first `size` in
    round-robin order over the classes (the first image of each class by label, then the second of each, ...),
    holding no more than `size` pairs on the host. Labels and masks come from the global batch, so every process
    picks the same rows (and takes part in the same gathers)."""

    def __init__(self, size: int = GRID_IMAGES):
        self.size = size
        self._seen: collections.Counter = collections.Counter()  # label -> images met so far
        self._kept: list[tuple[tuple[int, int], np.ndarray, np.ndarray]] = []  # ((rank, label), input, recon)

    def add(self, batch: dict[str, jax.Array], recon: jax.Array) -> None:
        """batch: {"image": uint8 [B, H, W, 3], "label": [B], "mask": [B]}; recon: [B, H, W, 3] in [-1, 1]."""
        labels, mask = to_host(batch["label"]), to_host(batch["mask"])
        offered = []
        for row in np.flatnonzero(mask):
            label = int(labels[row])
            offered.append(((self._seen[label], label), row))
            self._seen[label] += 1
        cut = sorted([key for key, _, _ in self._kept] + [key for key, _ in offered])[:self.size]
        rows = [(key, row) for key, row in offered if key in cut]
        if not rows:
            return
        # Only the batches that bring an image into the pick reach the host whole; copies keep just their rows.
        images, recons = to_host(batch["image"]), to_host(recon)
        picked = [(key, images[row].copy(), recons[row].copy()) for key, row in rows]
        self._kept = sorted([k for k in self._kept if k[0] in cut] + picked, key=lambda k: k[0])

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs uint8 [n, H, W, 3], reconstructions [n, H, W, 3] in [-1, 1]) in the picked order, n <= size."""
        return np.stack([k[1] for k in self._kept]), np.stack([k[2] for k in self._kept])


class TokenizerEvaluator:
    """Evaluates a tokenizer (its graph `generator_graph`, with `num_codes` codes and the quantizer's `projector`)
    on the eval split of `data`, as `spec` says."""

    def __init__(self, spec: EvalSpec, data: DataSpec, generator_graph: nnx.GraphDef, mesh: jax.sharding.Mesh,
                 *, num_codes: int, projector: str, lpips_graph: nnx.GraphDef | None = None,
                 lpips_state: nnx.State | None = None):
        self.spec, self.data_spec = spec, data
        self.metrics = spec.metrics
        if "lpips" in self.metrics and lpips_graph is None:
            raise ValueError("the lpips metric needs the LPIPS module")
        self.mesh = mesh
        self.batch_sharding = sharding.data_sharding(mesh)
        self.data = data_pipeline.eval_batches(data, batch_size=spec.batch_size, num_images=spec.num_images)
        self.num_codes, self.projector = num_codes, projector
        self._lpips_graph, self._lpips_state = lpips_graph, lpips_state
        self._inception = None
        self._step = jax.jit(self._eval_step(generator_graph))
        self._codebook = jax.jit(lambda params, rest: nnx.merge(generator_graph, params, rest).quantizer.codebook())

    def _eval_step(self, graph):
        num_codes, lpips_graph = self.num_codes, self._lpips_graph
        with_lpips = "lpips" in self.metrics

        def step(params, model_state, lpips_state, images_u8, mask):
            images = to_model_range(images_u8)
            recon, aux = nnx.merge(graph, params, model_state)(images, train=False)
            recon = jnp.clip(recon, -1.0, 1.0)
            w = mask.astype(jnp.float32)
            target = images_u8.astype(jnp.float32)
            rounded = to_pixel_levels(recon)
            sums = {
                "count": jnp.sum(w),
                "psnr": jnp.sum(w * image_metrics.psnr(rounded, target, data_range=255.0)),
                "ssim": jnp.sum(w * image_metrics.ssim(rounded, target, data_range=255.0)),
                "mse": jnp.sum(w * jnp.mean(jnp.square(recon - images), axis=(1, 2, 3))),
            }
            if with_lpips:
                sums["lpips"] = jnp.sum(w * nnx.merge(lpips_graph, lpips_state)(recon, images))
            return sums, _indices_counts(aux["indices"], mask, num_codes), recon

        return step

    # ------------------------------------------------------------------ helpers

    def _batches(self):
        for batch in self.data:
            yield data_pipeline.to_global_batch(batch, self.batch_sharding)

    def _inception_metrics(self):
        from fvq_jax.evaluation.inception_metrics import InceptionMetrics
        from fvq_jax.models.inception import load_inception

        if self._inception is None:
            self._inception = load_inception()
        return (InceptionMetrics(self._inception, data_range=(-1.0, 1.0), mesh=self.mesh),
                InceptionMetrics(self._inception, data_range=(0.0, 255.0), mesh=self.mesh))

    def _reference_stats_path(self) -> epath.Path:
        """Where the real images' Inception statistics of this eval split are cached."""
        if self.spec.reference_stats:
            return epath.Path(self.spec.reference_stats)
        d = self.data_spec
        key = json.dumps([d.source, d.tfds_name, d.folder, d.eval_split, d.image_size, len(self.data),
                          self.spec.batch_size, self.spec.num_images, self._inception.weights_sha256])
        cache = epath.Path(os.environ.get("FVQ_CACHE", "~/.cache/fvq_jax")).expanduser() / "fid_stats"
        return cache / f"{d.source}-{d.eval_split}-{d.image_size}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"

    # ------------------------------------------------------------------ public

    def reconstruction_grid(self, params: nnx.State, model_state: nnx.State) -> np.ndarray:
        """uint8 grid: inputs of the first eval batch, across its classes (GridPicker), over their
        reconstructions by the tokenizer (params, model_state) of the graph this evaluator was built with."""
        batch = next(self._batches())
        _, _, recon = self._step(params, model_state, self._lpips_state, batch["image"], batch["mask"])
        picker = GridPicker()
        picker.add(batch, recon)
        return reports.reconstruction_grid(*picker.pairs())

    def evaluate(self, params: nnx.State, model_state: nnx.State, *, weights: str = "raw", workdir=None,
                 step: int | None = None, folder: str | None = None) -> dict[str, float]:
        """Metrics of the tokenizer (params, model_state) over the eval split; with `workdir`, also
        metrics.json and the PNG reports in workdir/eval/<folder> (default step_<step>). `weights` ("ema" |
        "raw") and `step` (the train step of the weights) are recorded in the protocol."""
        totals, counts = None, None
        picker = GridPicker() if workdir is not None else None
        fid_recon = fid_real = None
        if "rfid" in self.metrics:
            fid_recon, fid_real = self._inception_metrics()
            stats_path = self._reference_stats_path()
            if stats_path.exists():
                fid_real = None
        for batch in self._batches():
            sums, batch_counts, recon = self._step(params, model_state, self._lpips_state,
                                                   batch["image"], batch["mask"])
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            counts = batch_counts if counts is None else counts + batch_counts
            if picker is not None:
                # On every process: an all-gather that only process 0 ran would hang.
                picker.add(batch, recon)
            if fid_recon is not None:
                fid_recon.update(recon, mask=batch["mask"])
                if fid_real is not None:
                    fid_real.update(batch["image"], mask=batch["mask"])
        totals = {k: float(to_host(v)) for k, v in totals.items()}
        n = totals.pop("count")
        if not n:
            raise ValueError("the eval split yielded no images")
        results = {k: v / n for k, v in totals.items() if k in ("psnr", "ssim", "lpips", "mse")}
        results["num_images"] = n
        counter = UsageCounter(self.num_codes)
        counter.counts = to_host(counts).astype(np.int64)
        if "usage" in self.metrics:
            results.update({f"eval_{k}" if k == "perplexity" else k: v
                            for k, v in codebook_health.usage_summary(counter).items()})
            codes = self._codebook(params, model_state)
            results.update(codebook_health.codebook_health(codes))
            if self.projector in BRIDGE_PRESETS:
                results.update(codebook_health.bridge_position_summary(counter.counts,
                                                                       BRIDGE_PRESETS[self.projector].patch))
        data = self.data_spec
        protocol = {"dataset": data.name, "split": data.eval_split,
                    "image_size": data.image_size, "num_images": int(n),
                    "crop": "held-out fixed crops" if data.source == "photos" else "ADM center crop",
                    "weights": weights, "step": step}
        if fid_recon is not None:
            stats_path = self._reference_stats_path()
            if fid_real is not None:
                reference = fid_real.feature_stats(f"real {protocol['dataset']}/{protocol['split']} images")
                if jax.process_index() == 0:
                    stats_path.parent.mkdir(parents=True, exist_ok=True)
                    reference.save(stats_path)
            else:
                from fvq_jax.evaluation.feature_stats import load_stats
                reference = load_stats(stats_path)
            results["rfid"] = fid_recon.fid(reference)
            protocol.update(reference_stats=str(stats_path), reference_count=int(reference.count),
                            inception_sha256=fid_recon.weights_sha256)
        if workdir is not None and jax.process_index() == 0:
            out = epath.Path(workdir) / "eval" / (folder or f"step_{step}")
            out.mkdir(parents=True, exist_ok=True)
            reports.save_reconstruction_grid(*picker.pairs(), out / "reconstructions.png")
            reports.save_usage_histogram(counter.counts, out / "code_usage.png")
            reports.write_metrics_json(dict(results, protocol=protocol), out / "metrics.json")
            logging.info("Wrote evaluation reports to %s", out)
        return results


@dataclasses.dataclass(frozen=True)
class EvalTaskSpec(config_lib.Spec):
    """configs/eval_tokenizer.py resolved (`resolve`): which weights of the run (eval.step, eval.use_ema), on which
    mesh. Its `data` and `eval` fields that are not None override the run's saved blocks: they are judged with
    them, by `resolve_run`, once the run's config is read."""

    step: int  # 0: the newest
    use_ema: bool
    mesh: MeshSpec
    data_overrides: Mapping[str, Any]
    eval_overrides: Mapping[str, Any]

    def __post_init__(self):
        config_lib.require_number(self.step, "step", strict=False, integer=True)
        config_lib.require(isinstance(self.use_ema, bool), "use_ema", f"must be true or false, got {self.use_ema!r}")

    def resolve_run(self, saved: ml_collections.ConfigDict) -> tuple[DataSpec, EvalSpec]:
        """(data, eval) of the evaluation: the run's saved `data` and `eval` blocks with the overrides; ConfigError
        naming data.<field> / eval.<field>."""
        def overridden(block: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> dict:
            return {**block.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}

        return (DataSpec.from_config(overridden(saved.data, self.data_overrides), "data"),
                EvalSpec.from_config(overridden(saved.eval, self.eval_overrides), "eval"))


def resolve(config: ml_collections.ConfigDict) -> EvalTaskSpec:
    """configs/eval_tokenizer.py as an EvalTaskSpec; ConfigError naming `eval.<field>` / `mesh.<field>`."""
    return EvalTaskSpec.from_config(config.eval, "eval", mesh=MeshSpec.from_config(config.mesh, "mesh"),
                                    data_overrides=config.data.to_dict(), eval_overrides=config.eval.to_dict())


def evaluate_checkpoint(spec: EvalTaskSpec, workdir: str) -> dict[str, float]:
    """The eval entry (configs/eval_tokenizer.py): load the tokenizer in `workdir` (a run at `spec.step`, 0 =
    latest; or an export) and evaluate it on its own data and eval settings, overridden by the spec's.

    Writes workdir/eval/step_N/{metrics.json, reconstructions.png, code_usage.png}. Errors of the overrides
    against the run (and a missing checkpoint or step) are raised before any array is restored.
    """
    resolved = []

    def check(saved: ml_collections.ConfigDict) -> None:  # before any array is read
        resolved.append(spec.resolve_run(saved))

    loaded = load_tokenizer(workdir, step=spec.step or None, use_ema=spec.use_ema, mesh_cfg=spec.mesh, check=check)
    data, evaluation = resolved[-1]
    lpips_graph = lpips_state = None
    if "lpips" in evaluation.metrics:
        lpips_graph, lpips_state = nnx.split(LPIPS.from_pretrained(dtype=loaded.model.dtype))
        lpips_state = jax.device_put(lpips_state, sharding.replicated(loaded.mesh))
    graph, params, model_state = nnx.split(loaded.model, nnx.Param, ...)
    quantizer = loaded.model.quantizer
    evaluator = TokenizerEvaluator(evaluation, data, graph, loaded.mesh, num_codes=quantizer.num_codes,
                                   projector=quantizer.projector_name, lpips_graph=lpips_graph,
                                   lpips_state=lpips_state)
    results = evaluator.evaluate(params, model_state, weights=loaded.weights, workdir=workdir, step=loaded.step)
    print(f"evaluation of step {loaded.step} ({len(evaluator.data)} batches): " + "  ".join(
        f"{k} {v:.4g}" for k, v in sorted(results.items())), flush=True)
    print(f"reports: {epath.Path(workdir) / 'eval' / f'step_{loaded.step}'}", flush=True)
    return results

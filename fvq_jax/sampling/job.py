"""The sampling job (configs/sample.py): class-conditional samples of a GPT run, decoded, written as ADM .npz.

Work is split by global sample index: batch b holds indices [b B, (b + 1) B) of the global batch B, cut
over every device of every host (data x fsdp); labels are class-balanced (`balanced_labels`: floor(i C / N))
and keys come from (seed, index), so a sample does not depend on the batch it lands in or the number of
devices (the front end, sampling/images.py). Each process writes the rows it holds, to a temporary name
that is renamed when complete.

A samples folder holds one setting: sampling.json records it (`identity`), and a rerun into the folder with
a setting that changes the pixels (sampling numbers, seed, sample count, batch layout, GPT or tokenizer
checkpoint) is refused, naming each field. A rerun skips the batches every process has written, after
reading each back; a file that does not read back with its expected samples is sampled again.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from fvq_jax import config_lib, files, sharding
from fvq_jax.data.pipeline import local_batch_size
from fvq_jax.evaluation import reports
from fvq_jax.models.load import Loaded, load_gpt, tokenizer_record
from fvq_jax.progress import Progress
from fvq_jax.sampling.images import MAX_SEED, Painter, balanced_labels, decoding_tokenizer, first_of_class
from fvq_jax.sampling.sampler import SamplingConfig
from fvq_jax.sharding import MeshSpec

# The fields of sampling.json that decide the pixels (and the batch files' layout); the rest is description.
IDENTITY = ("sampling.temperature", "sampling.top_k", "sampling.top_p", "sampling.cfg_scale", "sampling.cfg_schedule",
            "sampling.cfg_interval", "sampling.seed", "sampling.batch_size", "num_samples", "processes",
            "gpt.path", "gpt.step", "gpt.weights", "tokenizer.path", "tokenizer.step", "tokenizer.weights")


@dataclasses.dataclass(frozen=True)
class SampleSpec(config_lib.Spec):
    """configs/sample.py's `sample` block, resolved once (`resolve`); `sampling` holds the sampling numbers."""

    sampling: SamplingConfig = config_lib.inline()
    num_samples: int  # 0: per_class x the GPT's classes
    per_class: int
    batch_size: int  # global: split over every device of every host
    seed: int
    step: int  # 0: the newest
    use_ema: bool
    tokenizer: str  # "": the tokenizer recorded with the GPT
    name: str  # "": `output_name`
    grid_classes: int  # grid.png: every class up to this many (0: no grid)
    grid_per_class: int

    def __post_init__(self):
        config_lib.require_number(self.num_samples, "num_samples", strict=False, integer=True)
        config_lib.require(self.num_samples < MAX_SEED, "num_samples", f"must be < {MAX_SEED}, got {self.num_samples}")
        for name in ("per_class", "batch_size", "grid_per_class"):
            config_lib.require_number(getattr(self, name), name, integer=True)
        for name in ("step", "grid_classes"):
            config_lib.require_number(getattr(self, name), name, strict=False, integer=True)
        config_lib.require_number(self.seed, "seed", strict=False, integer=True)
        config_lib.require(self.seed < MAX_SEED, "seed", f"must be < {MAX_SEED}, got {self.seed}")
        config_lib.require(isinstance(self.use_ema, bool), "use_ema", f"must be true or false, got {self.use_ema!r}")
        for name in ("tokenizer", "name"):
            value = getattr(self, name)
            config_lib.require(isinstance(value, str), name, f"must be a string, got {value!r}")
        config_lib.require("/" not in self.name and self.name not in (".", ".."), "name",
                           f"must be a folder name under RUN/samples/, got {self.name!r}")

    def record(self) -> dict:
        """The settings as sampling.json's `sampling` entry."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sampling"}
        return dict(dataclasses.asdict(self.sampling), **fields)


@dataclasses.dataclass(frozen=True)
class SampleTaskSpec(config_lib.Spec):
    """configs/sample.py resolved: the `sample` block and the mesh it samples on."""

    sample: SampleSpec
    mesh: MeshSpec

    def check_devices(self, num_devices: int | None, num_processes: int | None) -> None:
        """ConfigError(sample.batch_size) unless it splits over the data-parallel devices and the processes (None:
        not known, not checked)."""
        if num_devices is not None:
            self.mesh.check_batch(self.sample.batch_size, "sample.batch_size", num_devices)
        if num_processes is not None:
            local_batch_size(self.sample.batch_size, num_processes, "sample.batch_size")


def resolve(config: ml_collections.ConfigDict, num_devices: int | None = None,
            num_processes: int | None = None) -> SampleTaskSpec:
    """configs/sample.py as a SampleTaskSpec; ConfigError naming `sample.<field>` / `mesh.<field>` for a bad value,
    or a batch that does not split over the devices and processes (when their counts are given)."""
    spec = SampleTaskSpec.from_config(config)
    spec.check_devices(num_devices, num_processes)
    return spec


def output_name(spec: SampleSpec, gpt: Loaded, tokenizer: Loaded, num_samples: int) -> str:
    """The samples folder's name: `spec.name`, else every setting that changes the pixels away from its default."""
    if spec.name:
        return spec.name
    s = spec.sampling
    parts = [f"step{gpt.step}", f"n{num_samples}", f"cfg{s.cfg_scale:g}", f"seed{spec.seed}"]
    if s.cfg_schedule != "constant":
        parts.append(s.cfg_schedule)
    if s.cfg_interval != (0.0, 1.0):
        parts.append("interval{:g}-{:g}".format(*s.cfg_interval))
    parts += [f"{k}{getattr(s, k):g}" for k, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))
              if getattr(s, k) != default]
    if not spec.use_ema:
        parts.append("raw")
    if spec.tokenizer:
        step = "" if tokenizer.step is None else f"-step{tokenizer.step}"
        parts.append(f"tok-{epath.Path(tokenizer.source).name}{step}-{tokenizer.weights}")
    return "-".join(parts)


def identity(record: dict) -> dict:
    """{field: value} of sampling.json's IDENTITY fields."""
    flat = config_lib.flat_fields(record)
    return {field: flat.get(field, config_lib.MISSING) for field in IDENTITY}


def sample_run(task: SampleTaskSpec, workdir, out=None) -> epath.Path:
    """Sample the GPT run in `workdir` as `task` (`resolve`) says into `out` (None: workdir/samples/<name>);
    returns the output directory."""
    spec = task.sample
    mesh = sharding.make_mesh(task.mesh)
    with jax.set_mesh(mesh):
        gpt = load_gpt(workdir, step=spec.step or None, use_ema=spec.use_ema, mesh_cfg=task.mesh)
        tokenizer = decoding_tokenizer(spec.tokenizer, gpt, task.mesh, field="sample.tokenizer")
        num_classes = gpt.model.config.num_classes
        num_samples = spec.num_samples or spec.per_class * num_classes
        config_lib.require(num_samples < MAX_SEED, "sample.per_class",
                           f"{spec.per_class} x {num_classes} classes exceeds {MAX_SEED - 1} samples")
        out = epath.Path(out or epath.Path(workdir) / "samples" / output_name(spec, gpt, tokenizer, num_samples))
        _claim(out, _record(spec, gpt, tokenizer, num_samples, num_classes))
        painter = Painter(gpt.model, tokenizer.model, spec.sampling, mesh=mesh, rules=task.mesh.rules)
        _sample_batches(painter, out, spec, num_samples)
        _write_grid(painter, out, spec, num_samples)
    print(f"{num_samples} samples of step {gpt.step} ({gpt.weights} weights) in {out}", flush=True)
    return out


def _record(spec: SampleSpec, gpt: Loaded, tokenizer: Loaded, num_samples: int, num_classes: int) -> dict:
    return dict(
        sampling=spec.record(), num_samples=num_samples, num_classes=num_classes,
        labels="floor(index * num_classes / num_samples)",
        gpt=dict(path=str(epath.Path(gpt.source).absolute()), step=gpt.step, weights=gpt.weights,
                 preset=gpt.config.model.preset),
        tokenizer=dict(tokenizer_record(tokenizer), codebook_size=int(tokenizer.model.quantizer.num_codes)),
        devices=jax.device_count(), processes=jax.process_count(), device_kind=jax.devices()[0].device_kind,
        jax_version=jax.__version__)


def _everyone(ok: bool) -> bool:
    """True when `ok` holds on every process."""
    return bool(multihost_utils.process_allgather(np.asarray(ok)).all()) if jax.process_count() > 1 else ok


def _claim(out: epath.Path, record: dict) -> None:
    """Make `out` the folder of `record`'s setting: refuse one that holds another setting (naming every field),
    else write sampling.json (process 0, atomically)."""
    path = out / "sampling.json"
    changes = []
    if jax.process_index() == 0 and path.exists():
        changes = config_lib.config_changes(identity(json.loads(path.read_text())), identity(record))
    if not _everyone(not changes):
        lines = "\n".join(f"  {field}: {old!r} -> {new!r}" for field, old, new in changes)
        raise config_lib.ConfigError("sample.name", f"{out} holds samples of another setting:\n{lines}\nRerun with "
                                     "the same settings to complete it, or name another folder (sample.name)")
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        files.write_atomically(path, lambda f: f.write(json.dumps(record, indent=1, default=str).encode()))
        logging.info("sampling settings in %s", path)


def _batch_problem(path: epath.Path, indices: np.ndarray, num_samples: int, num_classes: int,
                   seq_len: int) -> str | None:
    """Why the batch file at `path` does not hold the samples `indices` (None: it does)."""
    if not path.exists():
        return "missing"
    try:
        with path.open("rb") as f, np.load(f) as data:
            arrays = {k: data[k] for k in ("arr_0", "arr_1", "indices", "codes")}
    except Exception as error:  # noqa: BLE001 - any unreadable file is sampled again
        return f"unreadable ({type(error).__name__}: {error})"
    n = indices.size
    if not np.array_equal(arrays["indices"], indices):
        return f"holds samples {arrays['indices'][:4].tolist()}..., expected {indices[:4].tolist()}..."
    if not np.array_equal(arrays["arr_1"], balanced_labels(indices, num_samples, num_classes)):
        return "labels differ from the indices' classes"
    if arrays["arr_0"].dtype != np.uint8 or arrays["arr_0"].ndim != 4 or len(arrays["arr_0"]) != n:
        return f"images {arrays['arr_0'].dtype} {arrays['arr_0'].shape}, expected uint8 [{n}, H, W, 3]"
    if arrays["codes"].shape != (n, seq_len):
        return f"codes {arrays['codes'].shape}, expected ({n}, {seq_len})"
    return None


def _sample_batches(painter: Painter, out: epath.Path, spec: SampleSpec, num_samples: int) -> None:
    p, count = jax.process_index(), jax.process_count()
    local = spec.batch_size // count
    num_batches = -(-num_samples // spec.batch_size)
    todo = []
    for b in range(num_batches):
        path = out / f"batch_{b:05d}_p{p:03d}.npz"
        indices = b * spec.batch_size + p * local + np.arange(local)
        kept = indices[indices < num_samples]  # the last batch runs padded
        problem = _batch_problem(path, kept, num_samples, painter.num_classes, painter.seq_len)
        if problem not in (None, "missing"):
            logging.warning("%s: %s; sampling it again", path, problem)
        if not _everyone(problem is None):
            todo.append((b, path, indices))
    progress = Progress("sample", num_samples, done=min(num_samples, (num_batches - len(todo)) * spec.batch_size))
    for b, path, indices in todo:
        labels = balanced_labels(np.minimum(indices, num_samples - 1), num_samples, painter.num_classes)
        codes, images = painter(labels, np.full(local, spec.seed), indices)
        keep = indices < num_samples
        files.write_atomically(path, lambda f: np.savez(f, arr_0=images[keep], arr_1=labels[keep], indices=indices[keep],
                                                   codes=codes[keep]))
        progress.update(min(num_samples, (b + 1) * spec.batch_size) - b * spec.batch_size)


def _write_grid(painter: Painter, out: epath.Path, spec: SampleSpec, num_samples: int) -> None:
    """grid.png: the first samples of every class up to `grid_classes`, one row per class, regenerated from their
    indices (the same images as in the batch files)."""
    classes = min(spec.grid_classes, painter.num_classes)
    if not classes:
        return
    per_class = max(1, min(spec.grid_per_class, num_samples // painter.num_classes))
    wanted = (first_of_class(np.arange(classes), num_samples, painter.num_classes)[:, None]
              + np.arange(per_class)).ravel()
    wanted = np.minimum(wanted, num_samples - 1)
    p, count = jax.process_index(), jax.process_count()
    local = spec.batch_size // count
    padded = np.resize(wanted, -(-wanted.size // spec.batch_size) * spec.batch_size)
    images = []
    for chunk in padded.reshape(-1, spec.batch_size):
        indices = chunk[p * local:(p + 1) * local]
        labels = balanced_labels(indices, num_samples, painter.num_classes)
        _, batch_images = painter(labels, np.full(local, spec.seed), indices)
        images.append(multihost_utils.process_allgather(batch_images, tiled=True) if count > 1 else batch_images)
    if p == 0:
        grid = reports.image_grid(np.concatenate(images)[:wanted.size], columns=per_class)
        reports.save_png(grid, out / "grid.png")

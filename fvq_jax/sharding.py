"""Device mesh from config, logical-axis sharding rules, and the data sharding.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose devices also split the
large parameters and their optimizer state) and `tensor` (model parallelism: attention heads, MLP
hidden units, the vocabulary). The batch is split over `data` and `fsdp`.

Parameters carry *logical* axis names as Variable metadata, e.g.
    nnx.Linear(dim, hidden, kernel_metadata={"logical_axes": ("embed", "mlp")}, rngs=rngs)
and a rules table (config.mesh.rules, MaxText's `logical_axis_rules`) maps each name to mesh axes:
    ("embed", "fsdp"), ("mlp", "tensor"), ...
A dimension stays whole where its mesh axes do not divide it (or have size 1). The names live in
our own metadata key (`logical_axes`), not Flax's eager `out_sharding`, so modules build without a
mesh and the rules apply only when a train state is laid out.

Arrays without names (the tokenizer's convolutions, optimizer counters, the usage window) fall back
to the size rule: arrays with at least `fsdp_min_size` elements are split along their largest
dimension that the fsdp axis divides; everything else is replicated. The same shape and names give
the same sharding, so Adam's moments (which keep their parameter's metadata) follow their parameter.

Activations are pinned with `constrain(x, ("act_batch", "act_length", "act_embed"))` inside model
code; it resolves names through the rules set by `axis_rules(...)` around the trace, and is a no-op
outside one (single-device tests, eager code).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fvq_jax import config_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXES_KEY = "logical_axes"

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical name -> mesh axes. Parameter names first, then activation names (prefixed act_), so a
# parameter's embed dimension can be FSDP-split while the activations' embed dimension stays whole.
DEFAULT_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("classes", None),
    ("norm", None),
    ("layers", None),  # the stacked dimension of scanned layers: every device holds every layer's slice
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def default_mesh_config(**overrides) -> dict:
    """`config.mesh` as the configs write it: data parallel over every device, no tensor parallelism."""
    return dict(dict(data=-1, fsdp=1, tensor=1, fsdp_min_size=2 ** 18, rules=DEFAULT_RULES), **overrides)


# ----------------------------------------------------------------------------- mesh


@dataclasses.dataclass(frozen=True)
class MeshSpec(config_lib.Spec):
    """The `mesh` block resolved: the axis sizes (one of them may be -1: all remaining devices), the size rule's
    `fsdp_min_size` and the logical-axis `rules` table. `shape(num_devices)` fits it to the devices present.
    tensor, fsdp_min_size and rules came after the first configs were written (`later`)."""

    data: int
    fsdp: int
    tensor: int = config_lib.later(1)
    fsdp_min_size: int = config_lib.later(2 ** 18)
    rules: Rules = config_lib.later(DEFAULT_RULES)

    def __post_init__(self):
        sizes = dict(zip(MESH_AXES, (self.data, self.fsdp, self.tensor)))
        for axis, size in sizes.items():
            config_lib.require(isinstance(size, int) and not isinstance(size, bool) and (size == -1 or size >= 1),
                               axis, f"must be a positive int or -1, got {size!r}")
        for axis in [axis for axis, size in sizes.items() if size == -1][1:]:
            config_lib.require(False, axis, f"at most one axis may be -1, got {sizes}")
        config_lib.require_number(self.fsdp_min_size, "fsdp_min_size", strict=False, integer=True)
        rules = self.rules
        config_lib.require(isinstance(rules, (tuple, list)), "rules",
                           f"must be a tuple of (name, mesh axes) pairs, got {rules!r}")
        table = []
        for rule in rules:
            ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            config_lib.require(ok, "rules", f"each rule is a (logical name, mesh axes) pair, got {rule!r}")
            name, axes = rule
            axes = tuple(axes) if isinstance(axes, (tuple, list)) else axes
            for axis in (axes if isinstance(axes, tuple) else (axes,)):
                config_lib.require(axis is None or axis in MESH_AXES, "rules",
                                   f"rule {name!r} maps to {axis!r}, which is not a mesh axis {MESH_AXES}")
            table.append((name, axes))
        object.__setattr__(self, "rules", tuple(table))

    @classmethod
    def default(cls, **overrides) -> MeshSpec:
        """The configs' default mesh block (`default_mesh_config`), resolved."""
        return cls.from_config(default_mesh_config(**overrides), "mesh")

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """The axis sizes on `num_devices` devices (-1 filled in); ConfigError("mesh") when they do not fit."""
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            config_lib.require(num_devices % known == 0, "mesh",
                               f"{num_devices} devices do not split into the fixed axes {dict(zip(MESH_AXES, sizes))}")
            sizes[sizes.index(-1)] = num_devices // known
        config_lib.require(math.prod(sizes) == num_devices, "mesh",
                           f"{dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, {num_devices} are present")
        return tuple(sizes)

    def batch_shards(self, num_devices: int) -> int:
        """How many ways the batch is split (data x fsdp) on `num_devices` devices."""
        sizes = dict(zip(MESH_AXES, self.shape(num_devices)))
        return math.prod(sizes[a] for a in BATCH_AXES)

    def check_batch(self, batch: int, field: str, num_devices: int) -> None:
        """ConfigError(field) unless `batch` splits over the data-parallel devices (data x fsdp)."""
        shards = self.batch_shards(num_devices)
        config_lib.require(batch % shards == 0, field, f"{batch} does not split over the {shards} data-parallel "
                           f"devices (mesh data x fsdp of {num_devices} devices)")


def make_mesh(spec: MeshSpec, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(spec.shape(len(devices)), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dimension split over the data and fsdp axes (replicated over tensor)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- rules


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh | jax.sharding.AbstractMesh,
                    rules: Rules) -> P:
    """The PartitionSpec that `rules` give an array of `shape` whose dimensions are `names`.

    A name without a rule, a mesh axis of size 1, an axis already used by an earlier dimension, or
    axes whose size does not divide the dimension leave that dimension (or that axis) unsplit.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {tuple(shape)}")
    table = dict(rules)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for axis in axes:
            size = sizes.get(axis, 1)
            if size > 1 and axis not in used and dim % (math.prod(sizes[a] for a in kept) * size) == 0:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def array_spec(shape: tuple[int, ...], fsdp_size: int, fsdp_min_size: int) -> P:
    """The fallback rule for arrays without logical names (see module docstring)."""
    if fsdp_size <= 1 or math.prod(shape) < fsdp_min_size:
        return P()
    for dim in np.argsort(shape)[::-1]:
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes_of(x) -> tuple[str | None, ...] | None:
    """The logical names a Variable carries (None for unnamed Variables and plain arrays)."""
    if _is_variable(x):
        names = x.get_metadata().get(LOGICAL_AXES_KEY)
        return tuple(names) if names is not None else None
    return None


def state_shardings(abstract_state, mesh: Mesh, *, rules: Rules = DEFAULT_RULES, fsdp_min_size: int = 2 ** 18):
    """A pytree of NamedShardings matching `abstract_state` (arrays or ShapeDtypeStructs, possibly inside
    nnx Variables): named arrays through `rules`, the others through the size rule."""
    fsdp_size = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("fsdp", 1)

    def spec_of(x):
        names = logical_axes_of(x)
        shape = tuple(x.shape)
        if names is not None:
            return logical_to_spec(names, shape, mesh, rules)
        return array_spec(shape, fsdp_size, fsdp_min_size)

    def rule(x):
        sharding = NamedSharding(mesh, spec_of(x))
        return x.replace(sharding) if _is_variable(x) else sharding

    return jax.tree.map(rule, abstract_state, is_leaf=_is_variable)


def config_shardings(abstract_state, mesh: Mesh, spec: MeshSpec):
    """`state_shardings` with the rules and fsdp_min_size of the mesh block `spec`."""
    return state_shardings(abstract_state, mesh, rules=spec.rules, fsdp_min_size=spec.fsdp_min_size)


def with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying `shardings`: the target for a sharded restore or init."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


# ----------------------------------------------------------------------------- activations

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("fvq_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules: Rules):
    """Resolve `constrain` names through `rules` (a MeshSpec's) while tracing inside this block."""
    token = _RULES.set(rules)
    try:
        yield
    finally:
        _RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x with a sharding constraint from its logical `names`; a no-op without rules or a mesh in context."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))

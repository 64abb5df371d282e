"""Device mesh from config, parameter/state sharding rules, and the data sharding.

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices also
split the large parameters and their optimizer state). The batch is split over both axes.

Rule for every array in the train state (parameters, optimizer moments, EMA, codebook):
arrays with at least `fsdp_min_size` elements are split along their largest dimension that
the fsdp axis divides; everything else (biases, norms, scalars, the usage window) is
replicated. The same shape gives the same sharding, so Adam's moments follow their parameter.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fvq_jax import config_lib

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Axis sizes for `config.mesh` (one of them may be -1: all remaining devices)."""
    sizes = [mesh_cfg.get(axis, 1) for axis in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):
        config_lib.require(isinstance(size, int) and (size == -1 or size >= 1), f"mesh.{axis}",
                           f"must be a positive int or -1, got {size!r}")
    config_lib.require(sizes.count(-1) <= 1, "mesh", f"at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        config_lib.require(num_devices % known == 0, "mesh",
                           f"{num_devices} devices do not split into the fixed axes {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    config_lib.require(math.prod(sizes) == num_devices, "mesh",
                       f"{dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, {num_devices} are present")
    return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def array_spec(shape: tuple[int, ...], fsdp_size: int, fsdp_min_size: int) -> P:
    """The PartitionSpec the rule gives an array of `shape` (see module docstring)."""
    if fsdp_size <= 1 or math.prod(shape) < fsdp_min_size:
        return P()
    for dim in np.argsort(shape)[::-1]:
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh, fsdp_min_size: int = 2 ** 18):
    """A pytree of NamedShardings matching `abstract_state` (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape["fsdp"]

    def rule(x):
        return NamedSharding(mesh, array_spec(tuple(x.shape), fsdp_size, fsdp_min_size))

    return jax.tree.map(rule, abstract_state)


def with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying `shardings`: the target for a sharded restore or init."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)

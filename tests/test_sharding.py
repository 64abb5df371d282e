"""Mesh construction and the parameter sharding rule (on 8 simulated CPU devices)."""

import json

import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from fvq_jax import config_lib, sharding


def mesh_spec(**kw):
    return sharding.MeshSpec.from_config(ml_collections.ConfigDict(dict(dict(data=-1, fsdp=1), **kw)), "mesh")


def test_mesh_shape_fills_minus_one():
    assert mesh_spec().shape(8) == (8, 1, 1)
    assert mesh_spec(data=2, fsdp=-1).shape(8) == (2, 4, 1)
    assert mesh_spec(data=4, fsdp=2).shape(8) == (4, 2, 1)
    assert mesh_spec(data=2, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    assert mesh_spec(data=2, fsdp=-1).batch_shards(8) == 8 and mesh_spec(tensor=2).batch_shards(8) == 4


def test_a_mesh_block_written_before_tensor_and_rules_reads_as_their_defaults():
    spec = mesh_spec()
    assert (spec.tensor, spec.fsdp_min_size, spec.rules) == (1, 2 ** 18, sharding.DEFAULT_RULES)
    assert sharding.MeshSpec.default() == sharding.MeshSpec.from_config(sharding.default_mesh_config(), "mesh")
    listed = mesh_spec(rules=[["embed", ["data", "fsdp"]], ["mlp", None]]).rules  # as read back from JSON
    assert listed == (("embed", ("data", "fsdp")), ("mlp", None))


@pytest.mark.parametrize("cfg,message", [
    (dict(data=3, fsdp=-1), "config field mesh: 8 devices do not split"),
    (dict(data=4, fsdp=4), "config field mesh: .* needs 16 devices"),
    (dict(data=-1, fsdp=-1), "mesh.fsdp: at most one axis"),
    (dict(data=0, fsdp=1), "mesh.data"),
])
def test_bad_meshes_are_rejected(cfg, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        mesh_spec(**cfg).shape(8)


def test_array_rule():
    assert sharding.array_spec((256,), 4, 1000) == P()  # small: replicated
    assert sharding.array_spec((3, 3, 256, 512), 4, 1000) == P(None, None, None, "fsdp")
    assert sharding.array_spec((16384, 256), 4, 1000) == P("fsdp", None)
    assert sharding.array_spec((6, 10), 4, 10) == P()  # nothing divisible
    assert sharding.array_spec((1024, 1024), 1, 10) == P()  # no fsdp axis


def test_state_shardings_on_8_devices(python_runner):
    out = python_runner("""
        import json, jax, jax.numpy as jnp, ml_collections
        from fvq_jax import sharding
        mesh = sharding.make_mesh(sharding.MeshSpec.from_config(dict(data=2, fsdp=4)))
        tree = {"kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
                "bias": jax.ShapeDtypeStruct((128,), jnp.float32)}
        s = sharding.state_shardings(tree, mesh, fsdp_min_size=1000)
        x = jax.device_put(jnp.ones((3, 3, 64, 128)), s["kernel"])
        print(json.dumps({"kernel": str(s["kernel"].spec), "bias": str(s["bias"].spec),
                          "shard": list(x.addressable_shards[0].data.shape),
                          "batch": str(sharding.data_sharding(mesh).spec), "mesh": dict(mesh.shape)}))
    """, num_devices=8)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert got["kernel"] == str(P(None, None, None, "fsdp")) and got["bias"] == str(P())
    assert got["shard"] == [3, 3, 64, 32]
    assert got["batch"] == str(P(("data", "fsdp")))


def test_logical_rules_split_named_dimensions(python_runner):
    out = python_runner("""
        import json, jax, jax.numpy as jnp, ml_collections
        from flax import nnx
        from fvq_jax import sharding
        mesh = sharding.make_mesh(sharding.MeshSpec.from_config(dict(data=2, fsdp=2, tensor=2)))
        rules = sharding.DEFAULT_RULES

        class Block(nnx.Module):
            def __init__(self, rngs):
                self.up = nnx.Linear(16, 64, kernel_metadata={"logical_axes": ("embed", "mlp")}, rngs=rngs)
                self.odd = nnx.Linear(16, 5, kernel_metadata={"logical_axes": ("embed", "mlp")}, rngs=rngs)
                self.conv = nnx.Conv(8, 64, (3, 3), rngs=rngs)  # unnamed: the size rule

        state = nnx.state(nnx.eval_shape(lambda: Block(nnx.Rngs(0))))
        s = sharding.state_shardings(state, mesh, rules=rules, fsdp_min_size=1000)
        spec = lambda v: str(v.get_value().spec)
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            act = jax.jit(lambda x: sharding.constrain(x * 2, ("act_batch", "act_length", "act_mlp")))(
                jnp.ones((8, 3, 64)))
        print(json.dumps({"up": spec(s["up"]["kernel"]), "up_bias": spec(s["up"]["bias"]),
                          "odd": spec(s["odd"]["kernel"]), "conv": spec(s["conv"]["kernel"]),
                          "act": str(act.sharding.spec), "act_shard": list(act.addressable_shards[0].data.shape)}))
    """, num_devices=8)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["up"] == str(P("fsdp", "tensor")) and got["up_bias"] == str(P())
    assert got["odd"] == str(P("fsdp", None))  # 5 hidden units: tensor=2 does not divide them
    assert got["conv"] == str(P(None, None, None, "fsdp"))  # 3*3*8*64 = 4608 >= 1000, largest dim
    assert got["act"] == str(P(("data", "fsdp"), None, "tensor")) and got["act_shard"] == [2, 3, 32]


def test_logical_to_spec_rules():
    import jax
    mesh = jax.sharding.AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("other", None))
    assert sharding.logical_to_spec(("batch", "embed"), (16, 8), mesh, rules) == P(("data", "fsdp"), None)  # fsdp used
    assert sharding.logical_to_spec(("batch", "mlp"), (6, 8), mesh, rules) == P("data", "tensor")  # 6 % 8 != 0
    assert sharding.logical_to_spec(("other", None, "unknown"), (4, 4, 4), mesh, rules) == P(None, None, None)
    with pytest.raises(ValueError, match="do not match"):
        sharding.logical_to_spec(("embed",), (4, 4), mesh, rules)
    with pytest.raises(config_lib.ConfigError, match="mesh.rules: rule 'embed' maps to 'model', which is not a mesh axis"):
        mesh_spec(rules=(("embed", "model"),))
    with pytest.raises(config_lib.ConfigError, match="mesh.rules: each rule is a"):
        mesh_spec(rules=(("embed",),))

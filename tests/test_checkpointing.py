"""fvq_jax.checkpointing with a relative directory (the README's --workdir=workdir/...): Orbax
needs absolute paths, the Checkpointer makes them so; arrays, config and steps round-trip."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from fvq_jax.checkpointing import Checkpointer


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(7, jnp.int32)}
    checkpointer = Checkpointer("workdir/run/checkpoints", async_save=False)
    assert checkpointer.directory.is_absolute()
    assert checkpointer.save(7, state, config={"lr": 0.5}, force=True)
    checkpointer.wait()
    assert (tmp_path / "workdir" / "run" / "checkpoints" / "7").is_dir()

    caplog.set_level(logging.WARNING)
    reader = Checkpointer("workdir/run/checkpoints", read_only=True)
    # Reading a run is not worth Orbax's "Given directory is read only" warning on every command.
    assert not [r for r in caplog.records if "read only" in r.getMessage()]
    restored = reader.restore(None, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert int(restored["step"]) == 7 and reader.restore_config() == {"lr": 0.5}
    assert reader.all_steps() == [7]


def test_absolute_leaves_urls_alone(tmp_path, monkeypatch):
    from fvq_jax.checkpointing import absolute
    monkeypatch.chdir(tmp_path)
    assert str(absolute("runs/a")) == str(tmp_path / "runs" / "a")
    assert str(absolute("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert str(absolute(tmp_path / "b")) == str(tmp_path / "b")

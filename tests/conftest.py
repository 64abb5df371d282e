"""Shared test helpers.

Tests run on the CPU. Multi-device code runs in a subprocess whose XLA_FLAGS simulate 8
devices (the flag must be set before jax is imported, so never in this process).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One persistent compilation cache for this process and every subprocess a test starts: the tiny
# training config compiles the same train step in many tests and processes. Set
# FVQ_TEST_JIT_CACHE='' to compile everything afresh.
JIT_CACHE = os.environ.get("FVQ_TEST_JIT_CACHE", os.path.join(tempfile.gettempdir(), "fvq_jax_test_jit_cache"))
JIT_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": JIT_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"} if JIT_CACHE else {}
if JIT_CACHE:
    jax.config.update("jax_compilation_cache_dir", JIT_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def subprocess_env(num_devices: int = 1, **extra) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--ignored")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env["JAX_PLATFORMS"] = "cpu"
    env.update(JIT_CACHE_ENV)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code: str, *, num_devices: int = 1, timeout: float = 600, **env) -> str:
    """Run `code` in a fresh interpreter with `num_devices` CPU devices; returns its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=subprocess_env(num_devices, **env),
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result.stdout


@pytest.fixture
def python_runner():
    return run_python


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny tokenizer run on the built-in photos (tests/train/tiny.py), shared by the tests that
    need a trained checkpoint: 2 steps with an EMA of the weights, checkpoints at steps 1 and 2.
    -> (workdir, the run's final in-process evaluation)."""
    from tests.train.tiny import tiny_config, train

    config = tiny_config(num_steps=2, checkpoint_every=1)
    config.optim.update(warmup_steps=1, ema_decay=0.5)  # EMA and raw weights differ after a step
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    return workdir, train(config, workdir)

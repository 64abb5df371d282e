"""The fault-injection tool at its smallest: a 3-step tiny run (its warmup is 2 steps) killed once, while it writes
a checkpoint, and resumed ends bit-identical to the uninterrupted run, no finalised checkpoint lost, exit status 0."""

import json

from fvq_jax.tools import fault_injection
from tests.conftest import JIT_CACHE


def test_a_killed_run_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    if JIT_CACHE:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", JIT_CACHE)  # its runs' programs, compiled by other tests
    out = tmp_path / "faults"
    status = fault_injection.main([f"--out={out}", "--kills=1", "--steps=3", "--checkpoint_every=1"])
    report = json.loads((out / "report.json").read_text())
    assert len(report["kills"]) == 1 and report["lost_checkpoints"] == []
    assert report["losses_identical"] and report["params_identical"] and report["logged_steps"]
    assert status == 0

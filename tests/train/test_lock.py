"""The workdir lock: a second run is refused naming the holder; stale locks are taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from fvq_jax.train.lock import WorkdirLock, WorkdirLocked
from tests.train.tiny import tiny_config, train


def write_lock(workdir, **record):
    (workdir / "LOCK").write_text(json.dumps(record))


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    with WorkdirLock(tmp_path) as lock:
        holder = json.loads((tmp_path / "LOCK").read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        with pytest.raises(WorkdirLocked, match=rf"in use by another run: host {socket.gethostname()}, "
                                                rf"pid {os.getpid()}, started 20\d\d-"):
            train(tiny_config(num_steps=4), str(tmp_path))
        assert lock.path.exists()
    assert not (tmp_path / "LOCK").exists()  # released on exit
    assert sorted(os.listdir(tmp_path)) == []  # the refused run wrote nothing


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    write_lock(tmp_path, host=socket.gethostname(), pid=pid, started=time.time(), heartbeat=time.time())
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_is(tmp_path):
    write_lock(tmp_path, host="elsewhere", pid=1, started=time.time() - 50, heartbeat=time.time() - 10)
    with pytest.raises(WorkdirLocked, match="host elsewhere, pid 1"):
        WorkdirLock(tmp_path, stale_after=300).acquire()
    write_lock(tmp_path, host="elsewhere", pid=1, started=time.time() - 5000, heartbeat=time.time() - 1000)
    with WorkdirLock(tmp_path, stale_after=300):
        assert json.loads((tmp_path / "LOCK").read_text())["host"] == socket.gethostname()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    with WorkdirLock(tmp_path, heartbeat_every=0.05):
        first = json.loads((tmp_path / "LOCK").read_text())["heartbeat"]
        deadline = time.time() + 30
        while json.loads((tmp_path / "LOCK").read_text())["heartbeat"] == first:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.02)

"""One run per workdir: a lock file naming its holder.

`<workdir>/LOCK` holds JSON {host, pid, started, heartbeat}. A second run on the same workdir is
refused with the holder's host, pid and start time, before it builds anything (two runs would
collide on checkpoint temporary directories one save later and interleave their metric files).
A lock left by a dead run is taken over: on the same host when its pid is gone, on any host when
its heartbeat (refreshed by a background thread every `heartbeat_every` seconds) is older than
`stale_after` seconds, which is how a preempted pod restarting on new machines gets its workdir
back. In a multi-host run process 0 holds the lock for all processes and tells them the outcome.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _format_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


class WorkdirLock:
    """Context manager: acquire on enter (WorkdirLocked if held by a live run), release on exit."""

    def __init__(self, workdir, *, stale_after: float = 300.0, heartbeat_every: float = 30.0):
        self.path = epath.Path(workdir) / "LOCK"
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every
        self._record = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ holder checks

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError, ValueError):
            return {}  # unreadable: judged by its age alone

    def _stale_reason(self, holder: dict) -> str | None:
        """Why `holder`'s lock may be taken over, or None while it looks alive."""
        now = time.time()
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return f"its process {holder['pid']} on this host has exited"
            return None
        heartbeat = holder.get("heartbeat")
        if heartbeat is None:
            try:
                heartbeat = self.path.stat().mtime
            except (FileNotFoundError, OSError, AttributeError):
                return "it vanished"
        if now - heartbeat > self.stale_after:
            return f"its heartbeat is {now - heartbeat:.0f} s old (> {self.stale_after:.0f} s)"
        return None

    def _try_acquire(self) -> str | None:
        """Take the lock; returns None on success, else a description of the live holder."""
        holder = self._read()
        if holder is not None:
            reason = self._stale_reason(holder)
            if reason is None:
                return (f"{self.path.parent} is in use by another run: host {holder.get('host')}, pid {holder.get('pid')}, "
                        f"started {_format_time(holder['started']) if 'started' in holder else 'at an unknown time'}. "
                        f"Wait for it to finish, or use another --workdir; if that run is certainly dead, delete "
                        f"{self.path}.")
            logging.warning("taking over the stale lock %s (%s): %s", self.path, reason, holder)
        now = time.time()
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        # Two runs racing here both wrote; the file keeps the last writer. Re-read to see who won.
        time.sleep(0.05)
        if self._read() != self._record:
            return f"{self.path.parent} was locked by another run starting at the same moment ({self._read()})"
        return None

    def _write(self) -> None:
        """Replace the file in one rename, so readers never see half a record."""
        tmp = self.path.parent / f"LOCK.{socket.gethostname()}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self._record))
        tmp.replace(self.path)

    # ------------------------------------------------------------------ public

    def acquire(self) -> None:
        error = self._try_acquire() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not ok and error is None:
                error = f"process 0 could not lock {self.path.parent}: another run holds it (see process 0's log)"
        if error:
            self._record = None
            raise WorkdirLocked(error)
        if self._record is not None:
            self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
            self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            try:
                if self._read() != self._record:
                    logging.error("the lock %s was taken by another run: %s", self.path, self._read())
                    return
                self._record = dict(self._record, heartbeat=time.time())
                self._write()
            except OSError as error:  # a flaky filesystem must not kill training
                logging.warning("could not refresh %s: %s", self.path, error)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._record is not None and self._read() == self._record:
            self.path.unlink()
        self._record = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

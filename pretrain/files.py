"""Atomic file writes, the run folder's lock, and its record of a preemption.

Atomic writes: a reader sees the old file or the new one, never a half-written one.

Every file a later run or another rank reads (``latest``, checkpoint state, exported weights, the
resolved config, a fine-tuning stage's result) goes through here: written to a temporary name in
the same folder, flushed to disk, then renamed over the target (``os.replace`` is atomic on POSIX).

The lock (``RUN_DIR/.lock``, ``RunLock``): one job per run folder. It names the host, pid and job id
of its holder and a nonce (the other ranks read it to confirm they see rank 0's folder); the holder
also keeps an ``flock`` on it. A lock is stale when its holder is dead: on the same host, its pid is
gone (or no longer holds the ``flock``); on another host, its ``flock`` can be taken (on a filesystem
without working ``flock`` such a lock is never judged stale: delete it by hand).

The preemption record (``RUN_DIR/preempted.json``): written by rank 0 once every rank saved and is
about to exit 0 for a stop signal; removed when a run starts. The launch scripts read it because the
deepspeed launcher exits 1 whenever it was signalled, even when every rank saved and exited 0.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time
import uuid
from typing import Any, Callable, IO

import torch

__all__ = ["PREEMPTED_FILE", "RunFolderLocked", "RunLock", "atomic_torch_save", "atomic_write_json",
           "atomic_write_text", "clear_preemption", "record_preemption"]

PREEMPTED_FILE = "preempted.json"


def _atomic(path: str, write: Callable[[IO], None], mode: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1))


def atomic_torch_save(obj: Any, path: str) -> None:
    _atomic(path, lambda f: torch.save(obj, f), "wb")


def record_preemption(run_dir: str, **where: Any) -> None:
    """Rank 0, after every rank saved for a stop signal; ``where``: e.g. step=N, or stage=NAME."""
    atomic_write_json(os.path.join(run_dir, PREEMPTED_FILE), {**where, "time": time.time()})


def clear_preemption(run_dir: str) -> None:
    """Rank 0, when a run starts: a record is only ever about the latest launch."""
    try:
        os.remove(os.path.join(run_dir, PREEMPTED_FILE))
    except FileNotFoundError:
        pass


class RunFolderLocked(RuntimeError):
    """Another live job holds the run folder's lock."""


def _job_id() -> str:
    for key in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID"):
        if os.environ.get(key):
            return os.environ[key]
    return "-"


def _flock_free(path: str) -> bool | None:
    """True when nobody holds an ``flock`` on ``path``, False when someone does, None when this
    filesystem cannot tell."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``RUN_DIR/.lock``: taken by rank 0 for the whole run (``acquire``), released at its end."""

    NAME = ".lock"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.NAME)
        self.info: dict | None = None
        self._fd: int | None = None

    @classmethod
    def read(cls, run_dir: str) -> dict | None:
        """The holder's record, or None when there is no readable lock."""
        return cls.read_file(os.path.join(run_dir, cls.NAME))

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # unreadable: a holder died while writing it, or one is writing it now
            try:
                return time.time() - os.path.getmtime(self.path) > 30
            except FileNotFoundError:
                return True
        free = _flock_free(self.path)
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid", -1))) or free is True
        return free is True

    def acquire(self) -> dict:
        """Takes the lock (over a stale one); returns its record. Raises ``RunFolderLocked``."""
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(),
                "nonce": uuid.uuid4().hex, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read(os.path.dirname(self.path))
                if not self._stale(holder):
                    who = (f"host {holder.get('host')}, pid {holder.get('pid')}, job {holder.get('job')}, "
                           f"since {holder.get('since')}") if holder else "a job writing it now"
                    raise RunFolderLocked(
                        f"run folder {os.path.dirname(self.path)} is in use by another job ({who}): "
                        f"one job per run_dir. Stop that job or pick another run_dir (if that job is "
                        f"dead, delete {self.path}).")
                # Stale: move it aside, and take it over only if what moved is what was judged.
                aside = f"{self.path}.stale.{os.getpid()}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                moved = self.read_file(aside)
                if (moved or {}).get("nonce") != (holder or {}).get("nonce"):
                    os.rename(aside, self.path)  # someone else's fresh lock: put it back, look again
                    continue
                os.remove(aside)
                print(f"run folder lock: taking over the stale lock of host {(holder or {}).get('host')}, "
                      f"pid {(holder or {}).get('pid')}, job {(holder or {}).get('job')}", flush=True)
                continue
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # no flock here: host and pid alone tell a stale lock
            self._fd, self.info = fd, info
            atexit.register(self.release)
            return info
        raise RunFolderLocked(f"could not take the lock {self.path}: it keeps changing hands")

    @staticmethod
    def read_file(path: str) -> dict | None:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Removes the lock if it is still this holder's; idempotent."""
        if self.info is None:
            return
        if (self.read_file(self.path) or {}).get("nonce") == self.info["nonce"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.info = None, None

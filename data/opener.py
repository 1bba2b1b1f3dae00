"""Opening a shard URL for sequential reading, with the same failure handling for every kind.

- a local path: opened here (1 MiB buffer; seekable, which a restore uses);
- ``pipe:COMMAND``: the user's shell command, run here in its own process group with its stderr
  kept (the last ``STDERR_TAIL`` bytes go into the skip message when it fails);
- any URL with a scheme (``http(s)://``, ``gs://``, ``s3://``, ``file:``, ...): webdataset's
  ``gopen`` and its ``gopen_schemes`` table (curl for http, gsutil for gs; ``s3`` is added here,
  as ``aws s3 cp URL -``, only when webdataset has no handler for it). Those commands run from an
  argument list, never through a shell.

Every process stream is read with a timeout (``read_timeout_s`` without a byte raises
``TimeoutError``), and closing one never waits unboundedly: a process still running when we stop
reading (we have what we need, or the consumer abandoned the shard) is killed, and its exit status
is then not a failure; neither is SIGPIPE (141, or -13), nor the statuses webdataset's Pipe
ignores for its commands (curl's 23), which only say we stopped reading. A worker that ends with
shards still open (its rank stopped it, or exits) kills their processes first
(``kill_open_processes``): a stuck command would otherwise outlive the job.
"""
from __future__ import annotations

import atexit
import importlib
import io
import os
import re
import select
import signal
import subprocess
import tempfile
from typing import IO

# The module, not the function of the same name that ``webdataset/__init__`` exports over it.
wds_gopen = importlib.import_module("webdataset.gopen")

STDERR_TAIL = 2000  # bytes of a failed command's stderr quoted in the log
EXIT_WAIT_S = 5.0  # how long a finished process gets to report its exit status
SIGPIPE_STATUSES = (141, -signal.SIGPIPE)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


_OPEN: set["ShardStream"] = set()  # shards of this process still backed by a running command


def kill_open_processes() -> None:
    """Kills the command of every shard still open in this process (at its exit)."""
    for shard in list(_OPEN):
        shard._kill()


atexit.register(kill_open_processes)


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def is_local(url: str) -> bool:
    """A plain path (no ``scheme:`` prefix): the only kind whose existence is checked up front."""
    return _URL.match(url) is None or os.path.isabs(url)


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    """webdataset has no s3 handler; the AWS CLI streams an object to stdout like gsutil cat."""
    if mode[0] != "r":
        raise ValueError(f"{url}: s3 shards are read-only here")
    return wds_gopen.Pipe(["aws", "s3", "cp", url, "-"], mode=mode, bufsize=bufsize,
                          ignore_status=[141])


wds_gopen.gopen_schemes.setdefault("s3", _gopen_s3)


class _TimedRaw(io.RawIOBase):
    """A process's stdout read with a timeout: no byte for ``timeout_s`` is a TimeoutError."""

    def __init__(self, pipe: IO[bytes], timeout_s: float, url: str):
        self.pipe, self.fd, self.timeout_s, self.url = pipe, pipe.fileno(), timeout_s, url

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        super().close()
        self.pipe.close()

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            raise TimeoutError(f"no data for {self.timeout_s:g} s from {self.url}")
        return os.readv(self.fd, [buffer])


class ShardStream:
    """A readable binary stream of one shard; ``close`` says whether its source failed: None, or
    a message with the exit status and the end of the command's stderr."""

    def __init__(self, stream: IO[bytes], url: str, process: subprocess.Popen | None = None,
                 stderr: IO[bytes] | None = None):
        self.stream, self.url, self.process, self.stderr = stream, url, process, stderr
        self.owner: object = None  # whatever must outlive the stream (webdataset's Pipe)
        # Exit statuses that only say we stopped reading: SIGPIPE, and for webdataset's commands
        # the ones its Pipe ignores (curl's 23, "failed writing body").
        self.stopped_statuses: tuple[int, ...] = SIGPIPE_STATUSES
        self.read = stream.read

    def seekable(self) -> bool:
        return self.process is None and self.stream.seekable()

    def seek(self, offset: int) -> None:
        self.stream.seek(offset)

    def close(self, abandoned: bool = False) -> str | None:
        """Close; for a process, None unless it exited on its own with a failure status.

        ``abandoned``: we stopped reading on purpose (or it stalled): a process still running is
        killed at once instead of being given ``EXIT_WAIT_S`` to finish.
        """
        self.stream.close()
        if self.process is None:
            return None
        try:
            status = self.process.wait(0 if abandoned else EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            status = None  # still running after we stopped reading: we did not need the rest
        _OPEN.discard(self)
        if status is None:
            self._kill()
        failure = None
        if status not in (0, None) + self.stopped_statuses:
            failure = f"exited with {status}{self._stderr_tail()}"
        if self.stderr is not None:
            self.stderr.close()
        return failure

    def _kill(self) -> None:
        _OPEN.discard(self)
        try:
            if self.stderr is not None:  # our pipe: command runs in its own process group
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        except ProcessLookupError:
            pass
        self.process.wait()

    def _stderr_tail(self) -> str:
        if self.stderr is None:
            return ""
        self.stderr.seek(0, os.SEEK_END)
        self.stderr.seek(max(0, self.stderr.tell() - STDERR_TAIL))
        text = self.stderr.read().decode("utf-8", "replace").strip()
        return f"; stderr: {text}" if text else ""


def open_shard(url: str, read_timeout_s: float = 300.0) -> ShardStream:
    """Open ``url`` for reading; raises OSError or ValueError when it cannot be opened."""
    if is_pipe(url):
        stderr = tempfile.TemporaryFile()
        process = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                   stderr=stderr, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        return _process_stream(process, url, read_timeout_s, stderr)
    if is_local(url):
        return ShardStream(open(url, "rb", buffering=1 << 20), url)
    opened = wds_gopen.gopen(url, "rb")
    if isinstance(opened, wds_gopen.Pipe):
        # Read its stdout ourselves: webdataset's Pipe.read raises on a non-zero exit mid-read
        # and waits without bound; we want the timeout and one verdict at close.
        shard = _process_stream(opened.proc, url, read_timeout_s)
        shard.owner = opened  # its __del__ closes the stdout we read: keep it alive as long
        shard.stopped_statuses += tuple(opened.ignore_status)
        return shard
    return ShardStream(opened, url)


def _process_stream(process: subprocess.Popen, url: str, read_timeout_s: float,
                    stderr: IO[bytes] | None = None) -> ShardStream:
    raw = _TimedRaw(process.stdout, read_timeout_s, url)
    shard = ShardStream(io.BufferedReader(raw, 1 << 20), url, process, stderr)
    _OPEN.add(shard)
    return shard

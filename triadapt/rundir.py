"""One writer per run dir: an advisory lock on ``<run_dir>/.lock``.

Two processes writing one run dir interleave their files (a ``result.json`` of one run beside
the adapter of another), so a run holds an exclusive ``flock`` on ``.lock`` from before it
reads the dir's state until it has written its final status. A second process refuses with
one line naming the holder (pid, host, start time, written into the file). The kernel drops
the lock when its process dies, however it dies, so the lock of a killed run is taken over
without any clean-up; the file itself stays (removing it would let two processes lock two
different files of the same name). On NFS, Linux maps ``flock`` onto NFS byte-range locks.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from triadapt.errors import TriadaptError

LOCK_FILE = ".lock"


class RunDirBusy(TriadaptError):
    """Another live process writes this run dir."""


class RunDirLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides who may read it
        except OSError as e:  # read-only, no permission, no space: one line, not a traceback
            raise TriadaptError(f"cannot create the run dir lock {self.path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(
                f"{self.run_dir} is in use by {holder}; wait for it to end or choose another run dir"
            ) from None
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds all the same; only the holder's name is lost
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

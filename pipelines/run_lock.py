"""One run of a pipeline at a time: an flock on <workspace>/.conveyor/run.lock.

The kernel drops an flock when its process dies, however it dies, so a lock left by a crashed run is
simply free: the next run takes it over (and says whose it was). The file holds the holder's PID and
start time for the message a second run prints."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from conveyor_ml.base.clock import utc_now
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.process_lifetime import process_running
from conveyor_ml.pipelines.workspace import STATE_DIRECTORY

HELD = "another run of this pipeline is in progress"  # how RunLockHeld begins (the scheduler looks for it)


class RunLockHeld(ConveyorError):
    pass


class RunLock:
    def __init__(self, workspace: Path):
        self.path = workspace / STATE_DIRECTORY / "run.lock"
        self._fd: int | None = None

    def holder(self) -> dict:
        """What the file says of the holder ({pid, started}), each kept only if it is what a run writes: the
        file is a note for messages, and anything may have been written into it."""
        try:
            written = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        if not isinstance(written, dict):
            return {}
        pid, started = written.get("pid"), written.get("started")
        return {**({"pid": pid} if type(pid) is int and 0 < pid <= MAX_PID else {}),
                **({"started": started[:40]} if isinstance(started, str) else {})}

    def live_holder(self) -> dict | None:
        """Who holds the lock now, read without taking it (a probe must never make a starting run fail): the
        kernel's own record of the flock (/proc/locks), so a PID written into the file by hand, or left by a
        killed run and since reused, is never waited on; None when the lock is free."""
        holder = self.holder()
        locked_by = _flock_holder(self.path)
        if locked_by is None:
            return None
        if locked_by is _UNKNOWN:  # no /proc/locks (not Linux): the file's word, checked for a live process
            return holder if holder.get("pid") and process_running(holder["pid"]) else None
        return holder if holder.get("pid") == locked_by else {"pid": locked_by}

    def acquire(self) -> str | None:
        """Takes the lock; returns a note when it took over one left by a dead process."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            raise RunLockHeld(f"{HELD} (pid {holder.get('pid', '?')}, "
                              f"started {holder.get('started', '?')}); wait for it or stop it") from None
        previous = self.holder()
        note = None
        if previous.get("pid") and not process_running(previous["pid"]):
            note = f"took over the run lock of pid {previous['pid']}, which died without releasing it"
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": utc_now()}).encode())
        self._fd = fd
        return note

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        note = self.acquire()
        if note:
            print(f"conveyor: {note}", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


MAX_PID = 2 ** 22  # Linux's pid_max ceiling
_UNKNOWN = object()


def _flock_holder(path: Path):
    """The pid holding an flock on `path` per /proc/locks, None if none does (or the file is missing),
    _UNKNOWN where /proc/locks cannot be read."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    try:
        with open("/proc/locks") as locks:
            table = locks.read()
    except OSError:
        return _UNKNOWN
    # "1: FLOCK  ADVISORY  WRITE 17507 fe:00:3211481 0 EOF": the holder's pid, then major:minor:inode in hex.
    wanted = (os.major(status.st_dev), os.minor(status.st_dev), status.st_ino)
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # a process waiting for a lock has "->" there
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                return int(fields[4])
        except ValueError:
            continue
    return None

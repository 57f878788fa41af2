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


class RunLockHeld(ConveyorError):
    pass


class RunLock:
    def __init__(self, workspace: Path):
        self.path = workspace / ".conveyor" / "run.lock"
        self._fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def live_holder(self) -> dict | None:
        """Who holds the lock now, read without taking it (a probe must never make a starting run fail): the
        holder the file names while its process lives; None when the lock is free or its holder died."""
        holder = self.holder()
        return holder if holder.get("pid") and _alive(holder["pid"]) else None

    def acquire(self) -> str | None:
        """Takes the lock; returns a note when it took over one left by a dead process."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            raise RunLockHeld(f"another run of this pipeline is in progress (pid {holder.get('pid', '?')}, "
                              f"started {holder.get('started', '?')}); wait for it or stop it") from None
        previous = self.holder()
        note = None
        if previous.get("pid") and not _alive(previous["pid"]):
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


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

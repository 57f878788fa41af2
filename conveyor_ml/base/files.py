"""Writing files so that a reader, or a crash, never sees half of one."""
from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Makes a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flushes every file and directory under `root` to disk (before renaming the tree into place)."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(Path(directory))


def write_atomically(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Writes to a temporary file in the same directory, fsyncs, then renames over `path`:
    a reader sees the old file or the new one, never a partial one.

    A symbolic link is followed (its target is replaced, the link kept), and a FIFO or device such as
    /dev/null or /dev/stdout is written to as it is: a rename would put a regular file in their place."""
    path = Path(os.path.realpath(path))
    payload = data.encode() if isinstance(data, str) else data
    if path.exists() and not path.is_file() and not path.is_dir():
        with open(path, "wb") as handle:
            handle.write(payload)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@contextmanager
def exclusive_lock(lock_file: Path, waiting: Callable[[Path], None] | None = None) -> Iterator[None]:
    """An flock on `lock_file` (made if missing) held for the block; the kernel drops it however its holder
    dies. `waiting(lock_file)` is called once if another process holds it, and this one then waits."""
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting(lock_file)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

"""Writing files so that a reader, or a crash, never sees half of one."""
from __future__ import annotations

import os
import tempfile
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

"""How long Conveyor's processes live: SIGTERM is handled like Ctrl-C, and children die with their parent.

A `conveyor run` stopped by SIGTERM (systemd, Kubernetes, `conveyor schedule` stopping its run) used to die at
once: its trainer processes trained on as orphans and their scratch directory stayed. With
`raise_on_sigterm()`, SIGTERM raises `Terminated`, a KeyboardInterrupt, in the main thread, so every clean-up a
Ctrl-C runs (children stopped, temporary files removed, a release change put back) runs for it too.

A kill (SIGKILL, the OOM killer) runs no clean-up at all, so a child that must not outlive its parent (a
trainer, the InfraValidator's server, a server process of `--server_processes`) asks the kernel to signal it
when the parent dies: `die_with_parent()`, in a child started with `child_environment()`. Nor can it remove
its temporary files: those named with `owned_scratch_prefix()` are removed by the next process that calls
`remove_orphaned_scratch()`. Libraries name theirs without an owner (Apache Beam makes a `beam-pipeline-temp…`
directory for every pipeline, and removes it only if the pipeline returns), so a command that runs them makes
the temporary directory one of its own for their lifetime: `private_temporary_directory()`.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("conveyor")
# The pid of the process that started this one, set by child_environment(): the child checks it after
# asking for the signal, since the parent may have died before the request took effect.
PARENT_ENVIRONMENT = "CONVEYOR_PARENT_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises Terminated in the main thread (call it from there). A SIGTERM the process
    was started ignoring stays ignored."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _raise_terminated)


def child_environment() -> dict[str, str]:
    """What a child's environment needs for die_with_parent() to know its parent."""
    return {PARENT_ENVIRONMENT: str(os.getpid())}


def die_with_parent(signum: int) -> bool:
    """In a child started with child_environment(): the kernel sends it `signum` when the parent dies, even
    by SIGKILL. Does nothing (False) in a process started without it. The variable is removed, so this
    process's own children do not take its parent for theirs.

    Set in the child, not in a pre-exec hook of the parent's fork: a parent running TensorFlow's threads
    must not run Python between fork and exec. The kernel ties the request to the thread that started the
    child, so that thread must outlive it: here it is the main thread, or the thread that waits for it."""
    parent = os.environ.pop(PARENT_ENVIRONMENT, "")
    if not parent.isdigit():
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):  # not glibc Linux: the child may then outlive a killed parent
        log.warning("cannot ask to be stopped with the parent process (prctl unavailable)")
        return False
    if os.getppid() != int(parent):  # the parent died before the request above took effect
        os.kill(os.getpid(), signum)
    return True


def owned_scratch_prefix(prefix: str) -> str:
    """`prefix` with this process's pid, for a temporary file or directory (tempfile's random part follows):
    remove_orphaned_scratch() can then tell whether its owner still runs."""
    return f"{prefix}{os.getpid()}-"


def remove_orphaned_scratch(prefix: str, directory: str | Path | None = None, *,
                            pattern: re.Pattern[str] | None = None) -> list[Path]:
    """Removes this user's temporary files and directories named `<prefix><pid>-…` (owned_scratch_prefix)
    whose process no longer runs, in `directory` (default: the temporary directory); returns them. A name
    without a pid is left alone, and so is one whose process runs (or might: another user's). Names that
    carry the pid elsewhere give `pattern`, matched against the whole name, with the pid as group `pid`."""
    removed = []
    for path in Path(directory or tempfile.gettempdir()).glob(glob.escape(prefix) + "*"):
        owner = _owner(path.name, prefix, pattern)
        try:
            if owner is None or path.lstat().st_uid != os.getuid() or process_running(owner):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # removed meanwhile, or not ours to remove: left as it is
            continue
        removed.append(path)
    return removed


@contextlib.contextmanager
def private_temporary_directory(prefix: str) -> Iterator[Path]:
    """For the block, a directory of this process's own (`<prefix><pid>-…` in the temporary directory) is
    the temporary directory of the process (tempfile) and of the children it starts (TMPDIR); it is removed
    after the block. Whatever a killed process left in it, named by whichever library, goes with it: each
    call first removes the directories of this prefix whose process no longer runs."""
    parent = tempfile.gettempdir()
    remove_orphaned_scratch(prefix, parent)
    directory = tempfile.mkdtemp(prefix=owned_scratch_prefix(prefix), dir=parent)
    saved_tempdir, saved_environment = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = directory, directory
    try:
        yield Path(directory)
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_environment is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_environment
        shutil.rmtree(directory, ignore_errors=True)


def _owner(name: str, prefix: str, pattern: re.Pattern[str] | None) -> int | None:
    """The pid a scratch name carries, or None when it carries none."""
    if pattern is not None:
        match = pattern.fullmatch(name)
        return int(match.group("pid")) if match else None
    owner, separator, _ = name[len(prefix):].partition("-")
    return int(owner) if owner.isdigit() and separator else None


def process_running(pid: int) -> bool:
    """Whether the process runs: another user's counts, a zombie (dead, not yet waited for) does not, nor does a
    number no pid can be."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: the signal said it exists

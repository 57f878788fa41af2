"""Writing a file whole: a symbolic link keeps pointing where it did, and a FIFO or a device is written to,
not replaced by a regular file (`-o /dev/null` replaced /dev/null before)."""
from __future__ import annotations

import os
import stat
import threading

from conveyor_ml.base.files import write_atomically


def test_a_new_file_appears_whole_with_its_mode(tmp_path):
    target = tmp_path / "deep" / "out.json"
    write_atomically(target, '{"a": 1}\n', mode=0o600)
    assert target.read_text() == '{"a": 1}\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no temporary file left


def test_a_symbolic_link_is_followed_and_kept(tmp_path):
    (tmp_path / "real.txt").write_text("old\n")
    (tmp_path / "link.txt").symlink_to("real.txt")
    write_atomically(tmp_path / "link.txt", "new\n")
    assert (tmp_path / "link.txt").is_symlink()
    assert (tmp_path / "real.txt").read_text() == "new\n"


def test_a_fifo_is_written_to_not_replaced(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    write_atomically(fifo, "through the pipe\n")
    reader.join(timeout=10)
    assert received == ["through the pipe\n"]
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_a_character_device_is_written_to_not_replaced():
    before = os.lstat("/dev/null")
    write_atomically("/dev/null", "discarded\n")
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev

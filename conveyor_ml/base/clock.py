"""The project's timestamp formats: ISO 8601 in UTC for people and files, a sortable id for directories."""
from __future__ import annotations

import time


def utc_now() -> str:
    """'2026-11-25T15:47:43Z'."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def utc_from_milliseconds(milliseconds: int) -> str:
    """An MLMD timestamp (ms since the epoch) as utc_now() prints it; '' for none."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(milliseconds / 1000)) if milliseconds else ""


def compact_utc_now() -> str:
    """'20261125-154743': a directory name that sorts by time."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())

"""Sections of files that are generated from code (the README's reference tables, the JSON Schema), kept current
by one command (`make reference`) and checked by tests."""
from __future__ import annotations

from pathlib import Path


def with_section(text: str, start: str, end: str, body: str, where: Path) -> str:
    """`text` with what stands between the `start` and `end` marker lines replaced by `body`."""
    if start not in text or end not in text:
        raise SystemExit(f"{where}: the markers {start!r} ... {end!r} are missing")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def refresh(wanted: dict[Path, str], root: Path, check: bool) -> int:
    """Writes each file whose content differs from what is wanted; with `check`, writes nothing and returns 1
    when any differs."""
    stale = [path for path, text in wanted.items() if path.read_text() != text]
    if check:
        if stale:
            print("out of date (run `make reference`): " + ", ".join(str(p.relative_to(root)) for p in stale))
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(root)}")
    return 0

"""The span layout ImportExampleGen reads: `<data_root>/span-N/` holds `train/` and `eval/` TFRecord files and a
`span.json` manifest; a span exists once its manifest does (it is renamed into place whole)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from conveyor_ml.base.errors import ConveyorError

SPAN_PATTERN = re.compile(r"^span-(\d+)$")
MANIFEST = "span.json"


def span_numbers(data_root: Path) -> list[int]:
    """The complete spans under data_root, ascending (temporary directories are not spans)."""
    if not data_root.is_dir():
        return []
    numbers = []
    for child in data_root.iterdir():
        match = SPAN_PATTERN.match(child.name)
        if match and (child / MANIFEST).is_file():
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def span_dir(data_root: Path, span: int) -> Path:
    return data_root / f"span-{span}"


def check_span_names(data_root: Path) -> None:
    """Refuses a `span-N` name with leading zeros (`span-03`): it counts as span 3, but TFX's ExampleGen and
    everything else look for `span-3`."""
    if not data_root.is_dir():
        return
    for child in sorted(data_root.iterdir()):
        match = SPAN_PATTERN.match(child.name)
        if match and child.name != span_dir(data_root, int(match.group(1))).name:
            canonical = span_dir(data_root, int(match.group(1)))
            raise ConveyorError(f"data: {child} is not a span name Conveyor reads (span-N, N without leading "
                                f"zeros); rename it to {canonical.name} (if that name is free) or remove it")


def occupied_slot(data_root: Path, span: int) -> str | None:
    """What stands where span-N would be written, as an error to show, or None when the name is free."""
    target = span_dir(data_root, span)
    if not os.path.lexists(target):
        return None
    if target.is_symlink() and not target.exists():
        return (f"data: {target} is a dangling symbolic link (to {os.readlink(target)}); remove it, "
                "then run the command again")
    if not target.is_dir():
        return f"data: {target} is a file, not a span; move or remove it, then run the command again"
    if not (target / MANIFEST).is_file():
        return (f"data: {target} is an incomplete span (no {MANIFEST}: an interrupted copy, or made by hand); "
                f"remove it, or complete it (train/, eval/ and {MANIFEST} as `conveyor data` writes them), "
                "then run the command again")
    return f"span {span} already exists at {target}; spans are immutable, add a new one"


def parse_manifest(content: str | bytes, path: str | Path) -> dict:
    """A span's manifest from the text of its span.json; a damaged one is a ConveyorError naming the file."""
    try:
        manifest = json.loads(content)
    except (ValueError, UnicodeDecodeError) as exc:
        problem = f"not valid JSON ({exc})"
    else:
        if isinstance(manifest, dict):
            return manifest
        problem = f"not a span manifest (a JSON {type(manifest).__name__}, not an object)"
    raise ConveyorError(f"{path}: {problem}; the span is damaged: restore its directory from a backup, or "
                        "remove the directory (and add the data again with `conveyor data add-span`)")


def read_manifest(data_root: Path, span: int) -> dict:
    path = span_dir(data_root, span) / MANIFEST
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ConveyorError(f"{path}: cannot read it ({exc.strerror}); restore span {span} from a backup "
                            "or remove its directory") from None
    return parse_manifest(content, path)

"""The span layout ImportExampleGen reads: `<data_root>/span-N/` holds `train/` and `eval/` TFRecord files and a
`span.json` manifest; a span exists once its manifest does (it is renamed into place whole)."""
from __future__ import annotations

import json
import re
from pathlib import Path

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


def read_manifest(data_root: Path, span: int) -> dict:
    return json.loads((span_dir(data_root, span) / MANIFEST).read_text())

"""What every benchmark records beside its numbers: the machine, the versions, the date, and the spread."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    from importlib.metadata import version

    packages = {}
    for name in ("tensorflow", "tfx", "ai-edge-litert", "tensorflow-serving-api", "apache-beam", "grpcio", "aiohttp"):
        try:
            packages[name] = version(name)
        except Exception:
            packages[name] = "not installed"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "packages": packages}


def spread(values: list[float]) -> dict:
    """Median and min..max of repeated runs."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def write_results(name: str, document: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps({"machine": machine(), **document}, indent=2, default=float) + "\n")
    md_path.write_text(markdown)
    print(f"wrote {md_path}")
    return json_path, md_path


def replace_section(path: Path, start: str, end: str, section: str, heading: str) -> None:
    """Writes `section` (which begins with `start` and ends with `end`) into the results file `path` in place
    of its previous version, keeping the sections other benchmarks wrote there; a new file starts with
    `heading`."""
    text = path.read_text() if path.is_file() else f"{heading}\n\n"
    if start in text and end in text:
        text = text[:text.index(start)] + section.rstrip("\n") + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_reliability_section(start: str, end: str, section: str, name: str, figures: dict) -> None:
    """One benchmark's section of results/reliability.md (the others' kept), and its figures, with the
    machine, in results/reliability-<name>.json."""
    path = RESULTS / "reliability.md"
    replace_section(path, start, end, section, "# Reliability")
    (RESULTS / f"reliability-{name}.json").write_text(json.dumps({"machine": machine(), **figures}, indent=2) + "\n")
    print(f"wrote {path}")

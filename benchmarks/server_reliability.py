"""The model server's fault-injection figures: runs tests/e2e/test_server_reliability.py (the hostile corpus,
overload with batching on and off, a restart on a corrupt newest version) and writes what it measured to
benchmarks/results/reliability.md, in its own section (the releases-and-CLI section, written by
benchmarks/release_reliability.py, is kept as it is).

Run: .venv/bin/python -m benchmarks.server_reliability   (a pipeline run first, for the model: ~8 minutes here)
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, write_reliability_section

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- server: start -->", "<!-- server: end -->"


def run_suite() -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "server.json"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--basetemp", str(Path(scratch) / "pytest"), "tests/e2e/test_server_reliability.py"],
                       cwd=ROOT, check=True, env={**os.environ, "CONVEYOR_SERVER_RELIABILITY_REPORT": str(report)})
        return json.loads(report.read_text()), time.monotonic() - started


def _answers(answers: dict) -> str:
    return ", ".join(f"{key} {count:,}" for key, count in sorted(answers.items(), key=lambda item: -item[1]))


def _without_scratch_path(message: str) -> str:
    """The test's temporary directory taken out of a message: `/tmp/.../mnist/2/x` reads `mnist/2/x`."""
    return re.sub(r"/\S*/(mnist/\d+/)", r"\1", message)


def section(figures: dict, seconds: float) -> str:
    info = machine()
    hostile = figures["hostile"]
    lines = [START, "## The model server under hostile input and overload", "",
             f"{info['date']}, {info['cores']} cores ({info['cpu']}), shared with other work, so times are upper "
             f"bounds; the suite took {seconds:.0f} s (its pipeline run for the model included). Source: "
             "`python -m benchmarks.server_reliability` (tests/e2e/test_server_reliability.py). "
             "`--max_request_body_bytes` is 1 MiB in these tests (the default 16 MiB runs the same code).", "",
             f"**Hostile corpus**: {hostile['requests']:,} requests of {hostile['kinds']} kinds over gRPC and REST "
             "(declared-huge shapes, ranks and strings, negative dimensions, short tensor_content, empty batches, "
             "wrong dtypes, ranks and aliases, garbage tf.Examples, random bytes, invented models, labels and "
             f"versions, oversize messages) from 8 threads, and {hostile['special_bodies']} bodies sent too slowly, "
             f"declared too large, growing too large while chunked or abandoned halfway, in {hostile['seconds']:.1f} s.",
             "", "| figure | value |", "| --- | --- |",
             f"| violations (an answer other than 4xx / INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION / "
             f"RESOURCE_EXHAUSTED / 503, or a server down or not ready) | {hostile['violations']} |",
             f"| peak resident memory (VmHWM) | {hostile['peak_rss_mb']:.0f} MB (bound {hostile['rss_bound_mb']} MB) |",
             f"| Prometheus series before → after the corpus | {hostile['series_before']} → {hostile['series_after']} |",
             f"| answers | {_answers(hostile['answers'])} |", "",
             "Every answer is also counted under the status it was given (`conveyor_requests_total`): the OK and "
             "error counts per protocol equal what the clients received, 413s, 408s and abandoned bodies "
             "included.", "",
             "**Overload**: 200 clients at once, half REST and half gRPC, each with a valid Predict body just under "
             "the limit; then 50 more, and SIGTERM while they run.", "",
             "| batching | answers | slowest answer | liveness probe (own process) | resident memory idle → peak "
             "| exit after SIGTERM |", "| --- | --- | --- | --- | --- | --- |"]
    for state in ("on", "off"):
        overload = figures.get(f"overload, batching {state}")
        if overload:
            lines.append(f"| {state} | {_answers(overload['answers'])} | {overload['slowest_s']:.1f} s | "
                         f"{overload['probes']} probes, all answered, slowest {overload['probe_max_ms']:.0f} ms | "
                         f"{overload['rss_idle_mb']:.0f} → {overload['rss_peak_mb']:.0f} MB | "
                         f"{overload['sigterm_exit_s']:.1f} s, status {overload['exit_status']} |")
    restart = figures.get("restart")
    if restart:
        lines += ["", "**Restart on a corrupt newest version**: versions 2 (empty `saved_model.pb`) and 3 (garbage) "
                      f"are marked END with their error and version {restart['served_version']} serves at once "
                      f"(version 2: \"{_without_scratch_path(restart['broken_versions']['2'])}\")."]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main() -> int:
    figures, seconds = run_suite()
    write_reliability_section(START, END, section(figures, seconds), "server", {"figures": figures, "seconds": seconds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The fault-injection figures for releases and the command line: runs the two suites that prove them
(tests/e2e/test_release_crashes.py: push, promote and rollback SIGKILLed at 100 seeded moments each under
a serving `conveyor serve`; tests/unit/test_cli_mistakes.py: every known CLI mistake) and writes their
figures to benchmarks/results/reliability.md, in its own section (the model server's section, written by
another benchmark, is kept as it is).

Run: .venv/bin/python -m benchmarks.release_reliability
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, write_reliability_section

ROOT = Path(__file__).resolve().parent.parent
KILLS_PER_OPERATION = 100  # the suite runs 30 each to keep CI short
START, END = "<!-- releases-and-cli: start -->", "<!-- releases-and-cli: end -->"


def run_suites() -> tuple[dict, dict, float]:
    with tempfile.TemporaryDirectory() as scratch:
        crashes, cli = Path(scratch) / "crashes.json", Path(scratch) / "cli.json"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/e2e/test_release_crashes.py", "tests/unit/test_cli_mistakes.py"], cwd=ROOT, check=True,
                       env={**os.environ, "CONVEYOR_RELEASE_KILLS": str(KILLS_PER_OPERATION),
                            "CONVEYOR_RELIABILITY_REPORT": str(crashes),
                            "CONVEYOR_RELIABILITY_REPORT_CLI": str(cli)})
        return json.loads(crashes.read_text()), json.loads(cli.read_text()), time.monotonic() - started


def section(crashes: dict, cli: dict, seconds: float) -> str:
    info = machine()
    lines = [START, "## Releases under SIGKILL, and command-line mistakes", "",
             f"{info['date']}, {info['cores']} cores ({info['cpu']}), shared with other work, so times are upper "
             f"bounds; both suites took {seconds:.0f} s. Source: `python -m benchmarks.release_reliability`.", "",
             "Each operation is a real process (the ServingPusher between TFX's register and publish calls, or "
             "`conveyor promote|rollback`) SIGKILLed at a seeded uniform offset over its measured duration, "
             "against one base path served by one `conveyor serve`. A violation is any failed check: state "
             "not parsing or neither before nor after, traffic weighing a label models.config lacks, a partial "
             "version, a leftover after the next command, MLMD missing or duplicating a change, a failed request.",
             "", "| operation | kills | violations | killed before the commit | killed after the commit, "
             "record repaired by the next command | killed after the record | runs that finished first | "
             "operation (ms) | series (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("push", "promote", "rollback"):
        figures = crashes[name]
        outcomes = figures["outcomes"]
        lines.append(
            f"| {name}{' (keep_versions 2)' if name == 'push' else ''} | {figures['kills']} | {figures['violations']} | "
            f"{outcomes.get('killed before the commit', 0)} | "
            f"{outcomes.get('killed after the commit, before the MLMD record: repaired', 0)} | "
            f"{outcomes.get('killed after the MLMD record', 0)} | {outcomes.get('finished before the kill', 0)} | "
            f"{figures['operation_ms']:.0f} | {figures['seconds']:.0f} |")
    requests = crashes["requests"]
    lines += ["", f"The server answered {sum(requests.values())} unversioned predictions during the kills "
                  f"({requests.get('rest', 0)} REST, {requests.get('grpc', 0)} gRPC), **{crashes['failed_requests']} "
                  f"failed**; its resident memory was {crashes.get('server_rss_mib_start', 0):.0f} MiB after the "
                  f"first version loaded and {crashes.get('server_rss_mib_end', 0):.0f} MiB after "
                  f"{crashes.get('versions_pushed', 0)} pushes and every promotion and rollback.", "",
              "| command-line mistake | exit | seconds | peak memory (MiB) | the one line |",
              "| --- | --- | --- | --- | --- |"]
    for name, figures in cli.items():
        message = figures["message"].replace("|", "\\|")
        lines.append(f"| {name} | 2 | {figures['seconds']:.2f} | {figures['peak_mib']} | `{message}` |")
    lines += ["", "Every case also left its directory byte-for-byte unchanged.", END]
    return "\n".join(lines) + "\n"


def main() -> int:
    crashes, cli, seconds = run_suites()
    write_reliability_section(START, END, section(crashes, cli, seconds), "releases",
                              {"crashes": crashes, "cli": cli, "seconds": seconds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Every command-line mistake we know of costs one line naming the flag or file, exit status 2, nothing
written, and a moment: the real `conveyor` in a child process, in a directory whose every file is compared
before and after, with its own peak memory read from the kernel (wait4).

Set CONVEYOR_RELIABILITY_REPORT_CLI to a file to get each case's seconds and peak memory as JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_spec

FIGURES: dict = {}


def _nested(levels: int) -> str:
    return "name: nested\ndata: " + "[" * levels + "]" * levels + "\n"


def _alias_bomb() -> str:
    """Nine levels of nine aliases (9^9 = 387 million strings once expanded) in a typed field, 1.4 KB."""
    lines = ['lol: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\nname: bomb\ncomponents:\n  trainer:\n    train_steps: *a8\n"


def _foreign_sqlite() -> bytes:
    """The bytes of a SQLite database some other program wrote (one table of its own)."""
    import sqlite3

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "other.sqlite"
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        db.close()
        return path.read_bytes()


class Link(str):
    """A symbolic link to this target, as a file to create."""


SPAN_1 = {"workspace/data/span-1/span.json": "{}"}  # a span, as far as choosing the next number goes

# (name, files to create {relative path: text, bytes, a Link or None for a directory}, argv, what the one line
# must name)
CASES = [
    ("yaml nested 20k levels", {"deep.yaml": _nested(20_000)}, ["validate", "deep.yaml"],
     ["deep.yaml:2:", "nested deeper than 64 levels"]),
    ("yaml nested 100k levels", {"deep.yaml": _nested(100_000)}, ["run", "deep.yaml"],
     ["deep.yaml:2:", "nested deeper than 64 levels"]),
    ("yaml nested 5k block levels", {"deep.yaml": "name: x\n" + "".join(" " * i + f"k{i}:\n" for i in range(700))},
     ["validate", "deep.yaml"], ["deep.yaml:", "nested deeper than 64 levels"]),
    ("yaml alias bomb in a typed field", {"bomb.yaml": _alias_bomb()}, ["validate", "bomb.yaml"],
     ["bomb.yaml:", "with its aliases (*name) expanded, has more than 100000 nodes"]),
    ("yaml recursive alias", {"cycle.yaml": "name: &a [*a]\n"}, ["validate", "cycle.yaml"], ["cycle.yaml:1:", "cycle"]),
    ("50 MB spec", {"big.yaml": "name: big\n#" + "x" * (50 * 1024 * 1024) + "\n"}, ["validate", "big.yaml"],
     ["big.yaml", "too large for a pipeline spec"]),
    ("directory as spec", {"specs": None}, ["validate", "specs"], ["argument spec", "specs is a directory"]),
    ("directory as --spec", {"specs": None}, ["status", "--spec", "specs"], ["argument --spec", "is a directory"]),
    ("imbalance fraction out of range", {}, ["data", "add-span", "--spec", "spec.yaml", "--imbalance", "3:1.5"],
     ["argument --imbalance", "between 0 and 1"]),
    ("imbalance class out of range", {}, ["data", "add-span", "--spec", "spec.yaml", "--imbalance", "12:0.5"],
     ["argument --imbalance", "class must be 0..9"]),
    ("imbalance not CLASS:FRACTION", {}, ["data", "add-span", "--spec", "spec.yaml", "--imbalance", "3"],
     ["argument --imbalance", "CLASS:FRACTION"]),
    ("brightness not positive", {}, ["data", "add-span", "--spec", "spec.yaml", "--brightness", "-1"],
     ["argument --brightness", "greater than 0"]),
    ("add-span from a missing file", {}, ["data", "add-span", "--spec", "spec.yaml", "--from", "gone.csv"],
     ["argument --from", "gone.csv"]),
    ("compile -o under a file", {"file.txt": "x"}, ["compile", "spec.yaml", "-o", "file.txt/pipeline.json"],
     ["argument -o/--output", "file.txt is not a directory"]),
    ("compile -o where nothing can be written", {}, ["compile", "spec.yaml", "-o", "/proc/conveyor/pipeline.json"],
     ["argument -o/--output", "/proc"]),
    ("compile -o not json", {}, ["compile", "spec.yaml", "-o", "pipeline.yaml"], ["argument -o/--output", ".json"]),
    ("schedule negative retries", {}, ["schedule", "spec.yaml", "--every", "1h", "--retries", "-3"],
     ["argument --retries", "at least 0"]),
    ("schedule zero max runs", {}, ["schedule", "spec.yaml", "--every", "1h", "--max-runs", "0"],
     ["argument --max-runs", "at least 1"]),
    ("schedule bad interval", {}, ["schedule", "spec.yaml", "--every", "0s"], ["argument --every", "duration"]),
    ("schedule bad poll", {}, ["schedule", "spec.yaml", "--on-new-data", "--poll", "soon"], ["argument --poll"]),
    ("runs negative limit", {}, ["runs", "--spec", "spec.yaml", "--limit", "-5"], ["argument --limit", "at least 1"]),
    ("promote weight 0", {}, ["promote", "mnist", "--spec", "spec.yaml", "--weight", "0"],
     ["argument --weight", "between 1 and 100"]),
    ("promote weight 101", {}, ["promote", "mnist", "--spec", "spec.yaml", "--weight", "101"], ["argument --weight"]),
    ("rollback to version 0", {}, ["rollback", "mnist", "--spec", "spec.yaml", "--to", "0"],
     ["argument --to", "at least 1"]),
    ("rollback to a word", {}, ["rollback", "mnist", "--spec", "spec.yaml", "--to", "last"],
     ["argument --to", "whole number"]),
    ("status url not http", {}, ["status", "--spec", "spec.yaml", "--url", "localhost:8501"], ["argument --url"]),
    ("canary steps not ending at 100", {}, ["release", "canary", "mnist", "--version", "2", "--spec", "spec.yaml",
                                            "--steps", "10,50"], ["argument --steps", "last step must be 100"]),
    ("canary error rate over 100%", {}, ["release", "canary", "mnist", "--version", "2", "--spec", "spec.yaml",
                                         "--max-error-rate", "150%"], ["argument --max-error-rate", "percent"]),
    ("canary without a version", {}, ["release", "canary", "mnist", "--spec", "spec.yaml"],
     ["give one of --version N", "--variant V"]),
    ("canary route key not a header", {}, ["release", "canary", "mnist", "--version", "2", "--spec", "spec.yaml",
                                           "--route-key", "user id"], ["argument --route-key", "header name"]),
    ("shadow percent 0", {}, ["release", "shadow", "mnist", "--version", "2", "--percent", "0", "--spec",
                              "spec.yaml"], ["argument --percent", "between 1 and 100"]),
    ("shadow of an unknown model", {}, ["release", "shadow", "nope", "--version", "2", "--spec", "spec.yaml"],
     ["unknown model 'nope'"]),
    ("monitor interval 0", {}, ["monitor", "--once", "--interval", "0"], ["argument --interval", "greater than 0"]),
    ("monitor drift threshold 2", {}, ["monitor", "--once", "--drift-threshold", "2"],
     ["argument --drift-threshold", "at most 1"]),
    ("lineage version -1", {}, ["lineage", "--spec", "spec.yaml", "--version", "-1"], ["argument --version"]),
    ("models -o a directory", {"out": None}, ["models", "--spec", "spec.yaml", "-o", "out"],
     ["argument -o/--output", "out is a directory"]),
    ("deploy render -o a file", {"file.txt": "x"}, ["deploy", "render", "--target", "k8s", "--spec", "spec.yaml",
                                                     "-o", "file.txt"], ["argument -o/--output", "is a file"]),
    ("damaged release state", {"workspace/serving/release_state.json": "{\"format\": 1, \"models\": ",
                               "workspace/serving/.conveyor.lock": ""},
     ["status", "--spec", "spec.yaml"], ["release_state.json", "not valid JSON", "restore it from a backup"]),
    ("damaged release history", {"workspace/serving/release_history.json": "{\"mnist\": [1, ",
                                 "workspace/serving/models.config": "model_config_list {}\n",
                                 "workspace/serving/.conveyor.lock": ""},
     ["status", "--spec", "spec.yaml"], ["release_history.json", "not a valid release history"]),
    ("yaml key twice", {"twice.yaml": "name: a\nname: b\n"}, ["validate", "twice.yaml"],
     ["twice.yaml:2:1:", "key 'name' appears twice", "first on line 1"]),
    ("yaml integer of 5000 digits", {"digits.yaml": "name: x\nworkspace: " + "9" * 5000 + "\n"},
     ["validate", "digits.yaml"], ["digits.yaml:", "more than 4,300 digits"]),
    ("spec number nan", {"nan.yaml": "extends: spec.yaml\ncomponents:\n  evaluator:\n    min_accuracy: .nan\n"},
     ["validate", "nan.yaml"], ["nan.yaml: invalid spec: components.evaluator.min_accuracy", "finite number"]),
    ("spec cron of two lines", {"cron.yaml": 'extends: spec.yaml\nschedule:\n  cron: "*/5 * * * *\\n* * * * * x"\n'},
     ["validate", "cron.yaml"], ["cron.yaml: invalid spec: schedule.cron", "not a valid value"]),
    ("cron for 25 hours", {}, ["schedule", "spec.yaml", "--print-cron", "--every", "25h"],
     ["--print-cron", "90000 s has no cron expression"]),
    ("cron for 90 minutes", {}, ["schedule", "spec.yaml", "--print-cron", "--every", "90m"],
     ["--print-cron", "5400 s has no cron expression"]),
    ("local promote dry run", {}, ["promote", "mnist", "--dry-run", "--spec", "spec.yaml"],
     ["promote --dry-run", "needs --target gcp"]),
    ("local rollback dry run", {}, ["rollback", "mnist", "--dry-run", "--spec", "spec.yaml"],
     ["rollback --dry-run", "needs --target gcp"]),
    ("doctor spec missing", {}, ["doctor", "--spec", "gone.yaml"], ["spec file not found: gone.yaml"]),
    ("doctor url not http", {}, ["doctor", "--url", "ftp://x"], ["argument --url", "http://"]),
    ("monitor interval huge", {}, ["monitor", "--once", "--interval", "1e308"],
     ["argument --interval", "at most 86400"]),
    ("serve poll wait inf", {}, ["serve", "--model_name", "m", "--model_base_path", ".",
                                 "--file_system_poll_wait_seconds", "inf"],
     ["--file_system_poll_wait_seconds", "finite number"]),
    ("serve poll wait huge", {}, ["serve", "--model_name", "m", "--model_base_path", ".",
                                  "--model_config_file_poll_wait_seconds", "1e12"],
     ["--model_config_file_poll_wait_seconds", "at most 2147483647"]),
    ("serve spec and model name", {}, ["serve", "--spec", "spec.yaml", "--model_name", "other"],
     ["serve --spec", "drop --model_name"]),
    ("schema file not text", {"binary.pbtxt": b"\x89PNG\r\n\x1a\n\x00\xff",
                              "bin.yaml": "extends: spec.yaml\ndata:\n  schema: binary.pbtxt\n"},
     ["run", "bin.yaml"], ["data.schema", "binary.pbtxt: not a text file"]),
    ("schema file not a schema", {"wrong.pbtxt": "feature { colour: 1 }\n",
                                  "wrong.yaml": "extends: spec.yaml\ndata:\n  schema: wrong.pbtxt\n"},
     ["data", "init", "--spec", "wrong.yaml"], ["data.schema", "wrong.pbtxt: not a Schema", 'no field named "colour"']),
    ("beam runner unknown", {"runner.yaml": "extends: spec.yaml\nbeam:\n  args: [--runner=BogusRunner]\n"},
     ["run", "runner.yaml"], ["beam.args: --runner BogusRunner", "Valid values are"]),
    ("deploy render into an empty path", {}, ["deploy", "render", "--target", "k8s", "--spec", "spec.yaml", "-o", ""],
     ["argument -o/--output", "is empty; name a directory"]),
    ("models into an empty path", {}, ["models", "--spec", "spec.yaml", "-o", ""],
     ["argument -o/--output", "is empty; name a file"]),
    ("release shadow end with a version", {}, ["release", "shadow", "mnist", "--end", "--version", "2", "--spec",
                                              "spec.yaml"], ["release shadow --end", "drop --version"]),
    ("metadata store not a database", {"workspace/metadata.sqlite": "not a database\n"},
     ["runs", "--spec", "spec.yaml"],
     ["cannot open the metadata store", "file is not a database; it is not an ML Metadata database"]),
    ("metadata store of another program", {"workspace/metadata.sqlite": _foreign_sqlite()},
     ["status", "--spec", "spec.yaml"], ["metadata.sqlite is a SQLite database of another program (tables invoices)",
                                         "not an ML Metadata store"]),
    ("workspace is a file", {"afile": "x\n", "ws.yaml": "extends: spec.yaml\nworkspace: afile\n"},
     ["run", "ws.yaml"], ["workspace afile is a file", "to a directory"]),
    ("serving base path is a file", {"afile": "x\n", "base.yaml": "extends: spec.yaml\ncomponents:\n  "
                                     "serving_pusher:\n    model_name: mnist\n    base_path: afile\n"},
     ["status", "--spec", "base.yaml"], ["serving base path afile is a file", "base_path"]),
    ("serve rest host empty", {}, ["serve", "--model_name", "m", "--model_base_path", ".", "--rest_api_host", ""],
     ["--rest_api_host is empty", "0.0.0.0 (every interface)"]),
    ("add-span over an incomplete span", {**SPAN_1, "workspace/data/span-2/train": None},
     ["data", "add-span", "--spec", "spec.yaml"],
     ["workspace/data/span-2 is an incomplete span (no span.json", "remove it, or complete it"]),
    ("add-span over a dangling span link", {**SPAN_1, "workspace/data/span-2": Link("gone")},
     ["data", "add-span", "--spec", "spec.yaml"], ["data/span-2 is a dangling symbolic link (to gone)", "remove it"]),
    ("add-span beside a span numbered 03", {**SPAN_1, "workspace/data/span-03/span.json": "{}"},
     ["data", "add-span", "--spec", "spec.yaml"], ["data/span-03 is not a span name", "rename it to span-3"]),
    ("add-span from /dev/zero", {**SPAN_1, "zero.csv": Link("/dev/zero")},
     ["data", "add-span", "--spec", "spec.yaml", "--from", "zero.csv"],
     ["data.path: zero.csv is not a regular file", "reads one .csv file"]),
    ("data init where the data directory is a file", {"workspace/data": "spans?\n"},
     ["data", "init", "--spec", "spec.yaml"], ["workspace/data is a file", "move or remove the file"]),
    ("serve session config not text", {"session.cfg": b"\xff\xfe\x00binary"},
     ["serve", "--model_name", "m", "--model_base_path", ".", "--tensorflow_session_config_file", "session.cfg"],
     ["session.cfg", "not a text file"]),
]


def _tree(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


# A small Python starts the command and reports its rusage: a child forked straight from pytest would
# inherit pytest's own peak resident size (Linux carries it across fork and exec).
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "conveyor_ml.cli", *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss], report)
"""


def _run_measured(argv: list[str], cwd: Path, report: Path) -> tuple[int, str, str, float, float]:
    """(exit status, stdout, stderr, seconds, peak resident MiB) of `conveyor argv` in `cwd`."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, str(report), *argv], cwd=cwd, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)})
    seconds = time.monotonic() - started
    code, peak_kib = json.loads(report.read_text())
    assert result.returncode == 0, result.stderr
    return code, result.stdout, result.stderr, seconds, peak_kib / 1024


@pytest.mark.parametrize("name, files, argv, named", CASES, ids=[case[0] for case in CASES])
def test_a_cli_mistake_is_one_line_exit_2_nothing_written_at_once(tmp_path, name, files, argv, named):
    write_spec(tmp_path)
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, Link):
            path.symlink_to(text)
        elif text is None:
            path.mkdir()
        else:
            path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    before = _tree(tmp_path)

    with tempfile.TemporaryDirectory() as scratch:
        code, stdout, stderr, seconds, peak_mib = _run_measured(argv, tmp_path, Path(scratch) / "rusage.json")

    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert all(part in lines[0] for part in named), lines[0]
    assert stdout == ""
    assert _tree(tmp_path) == before, "the command wrote something"
    # Bounds the failures of the past stay far from (53 s and 5.5 GB for the alias bomb, 55 s for 50 MB).
    assert seconds < 20 and peak_mib < 600, (seconds, peak_mib)
    FIGURES[name] = {"seconds": round(seconds, 2), "peak_mib": round(peak_mib), "message": lines[0]}
    if os.environ.get("CONVEYOR_RELIABILITY_REPORT_CLI"):
        Path(os.environ["CONVEYOR_RELIABILITY_REPORT_CLI"]).write_text(json.dumps(FIGURES, indent=2))

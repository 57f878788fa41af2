"""`conveyor schedule --print-cron`: an interval becomes a cron expression only when cron's clock times keep
it, every path in the line is quoted for the shell, and a cron expression in the spec is one line."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.pipelines.scheduler import cron_line


@pytest.mark.parametrize("seconds, expression", [
    (60, "* * * * *"), (20 * 60, "*/20 * * * *"), (30 * 60, "*/30 * * * *"), (3600, "0 * * * *"),
    (6 * 3600, "0 */6 * * *"), (86400, "0 0 * * *"),
])
def test_intervals_cron_can_keep(seconds, expression, tmp_path):
    line = cron_line(tmp_path / "spec.yaml", seconds, None, tmp_path, Path("workspace"))
    assert line.startswith(expression + " cd ")


@pytest.mark.parametrize("seconds", [30, 7 * 60, 90 * 60, 25 * 3600, 5 * 3600, 2 * 86400])
def test_intervals_cron_cannot_keep_are_refused(seconds, tmp_path):
    with pytest.raises(ConveyorError, match=f"an interval of {seconds} s has no cron expression"):
        cron_line(tmp_path / "spec.yaml", seconds, None, tmp_path, Path("workspace"))


def test_paths_are_quoted_and_the_spec_cron_is_one_line(tmp_path):
    project = tmp_path / "my project; rm -rf x"
    line = cron_line(project / "spec one.yaml", None, "*/5  *\t* * *", project, Path("workspace"))
    expression, command = line[:len("*/5 * * * *")], line[len("*/5 * * * * "):]
    assert expression == "*/5 * * * *" and "\n" not in line
    words = shlex.split(command, comments=True)
    assert words[:2] == ["cd", str(project)]
    assert words[3:6] == [words[3], "run", str(project / "spec one.yaml")] and words[3].endswith("conveyor")
    assert words[6:] == [">>", str(project / "workspace" / ".conveyor" / "cron.log"), "2>&1"]


def test_on_new_data_says_cron_runs_every_tick(tmp_path):
    line = cron_line(tmp_path / "spec.yaml", None, None, tmp_path, Path("workspace"), on_new_data=True)
    assert line.startswith("*/30 * * * * ")
    assert line.endswith("cron cannot watch for data: a tick with no new span is answered from the cache")


def test_a_duration_is_at_most_a_year():
    """400 nines of days was infinity: `--print-cron` ended in OverflowError and a scheduler logged 'every infs'."""
    import argparse

    from conveyor_ml.base.cli_values import duration

    assert duration("366d") == 366 * 86400
    for text in ("367d", "8785h", "9" * 400 + "d"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be at most 366d"):
            duration(text)

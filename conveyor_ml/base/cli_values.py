"""Argument types for the command line: each turns a flag's text into its value or says, in one line, what is
wrong with it (argparse prints "argument --FLAG: <message>" and exits 2, before anything is read or written).

Every flag with a range or a form gets one, so a negative count, a port out of range or an unwritable
output path is refused by name instead of silently doing something else (`--retries -3` ran nothing,
`--limit -5` skipped the five oldest runs).
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_DAYS = 366


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An int within [minimum, maximum] (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        _check_range(value, text, minimum, maximum)
        return value

    return parse


def number(minimum: float | None = None, maximum: float | None = None, *,
           above: float | None = None) -> Callable[[str], float]:
    """A finite float within [minimum, maximum], or strictly greater than `above`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be greater than {above:g}, not {text}")
        _check_range(value, text, minimum, maximum)
        return value

    return parse


def _check_range(value, text: str, minimum, maximum) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise argparse.ArgumentTypeError(f"must be between {minimum} and {maximum}, not {text}")
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {text}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum}, not {text}")


def duration(text: str) -> float:
    """Seconds from a duration such as 90s, 30m, 6h or 1d (more than zero, at most MAX_DURATION_DAYS: a longer
    one is a typo, and 400 nines of days was infinity)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 30m, 6h or 1d, not {text!r}")
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds > MAX_DURATION_DAYS * DURATION_UNITS["d"]:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_DURATION_DAYS}d, not {text[:40]!r}")
    return seconds


def share(text: str) -> float:
    """A share from 0 to 1, written as a percent ("1%", "98.5%") or a fraction ("0.01")."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(%?)", text.strip())
    value = float(match.group(1)) / (100 if match.group(2) else 1) if match else -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a percent such as 1% or 98%, or a fraction from 0 to 1, not {text!r}")
    return value


def points(text: str) -> float:
    """Percentage points, from -100 to 100: "-1pt", "-0.5pt" or a plain number."""
    match = re.fullmatch(r"([-+]?\d+(?:\.\d+)?)\s*(?:pts?|pp)?", text.strip())
    if not match or not -100 <= float(match.group(1)) <= 100:
        raise argparse.ArgumentTypeError(f"expected percentage points such as -1pt, not {text!r}")
    return float(match.group(1))


def percent_steps(text: str) -> tuple[int, ...]:
    """Comma-separated percents that rise and end at 100, e.g. 10,25,50,100."""
    from conveyor_ml.base.spec import canary_steps_problem

    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected percents such as 10,25,50,100, not {text!r}") from None
    problem = canary_steps_problem(steps)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return steps


def header_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", text):
        raise argparse.ArgumentTypeError(f"expected an HTTP header name such as X-User-Id, not {text!r}")
    return text


def url_problem(url: str) -> str | None:
    """Why `url` is not a server's address (http or https, a host, a port 1..65535 if given), or None."""
    if not isinstance(url, str) or any(c.isspace() or not c.isprintable() for c in url):
        return "it contains spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port out of range or not a number, a broken [IPv6] host
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return f"the scheme is {parts.scheme + '://' if parts.scheme else 'missing'}, not http:// or https://"
    if not parts.hostname:
        return "it names no host"
    if port is not None and not 1 <= port <= 65535:
        return f"port {port} is not in 1..65535"
    return None


def http_url(text: str) -> str:
    """An http(s) URL with a host (and a port within 1..65535 if given)."""
    if url_problem(text):
        raise argparse.ArgumentTypeError(f"expected an http:// URL such as http://127.0.0.1:8501, not {text!r}")
    return text


def spec_path(text: str) -> str:
    """A pipeline spec path: refused here when it names a directory; a missing file is the loader's to name
    (some commands read a spec only if it exists)."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; pass a pipeline YAML file "
                                         "(e.g. pipelines/mnist.yaml)")
    return text


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return text


def _writable_place(start: Path, shown: str) -> None:
    """The nearest existing directory at or above `start` must take new files (the command creates the rest);
    checked before any work, so a long command does not fail at its last step."""
    ancestor = start
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {shown}: {ancestor} is not a directory")
    try:  # permission bits do not tell (root, read-only mounts, /proc): try it, leaving nothing behind
        fd, probe = tempfile.mkstemp(prefix=".conveyor-write-test-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {shown}: {ancestor}: {exc.strerror}") from None


def output_file(suffix: str | None = None) -> Callable[[str], str]:
    """A file this process can create or replace (with `suffix`, e.g. ".json", if given)."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError("is empty; name a file")
        path = Path(text)
        if suffix and path.suffix != suffix:
            raise argparse.ArgumentTypeError(f"{text}: name a {suffix} file")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a directory; name a file")
        _writable_place(path.parent, text)
        return text

    return parse


def output_directory(text: str) -> str:
    """A directory this process can create or write into."""
    if not text.strip():  # Path("") is the current directory
        raise argparse.ArgumentTypeError("is empty; name a directory")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; name a directory")
    _writable_place(path, f"into {text}")
    return text


def class_fraction(num_classes: int) -> Callable[[str], tuple[int, float]]:
    """CLASS:FRACTION, a class 0..num_classes-1 and a fraction strictly between 0 and 1."""

    def parse(text: str) -> tuple[int, float]:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*([0-9.eE+-]+)\s*", text)
        try:
            label, fraction = int(match.group(1)), float(match.group(2))
        except (AttributeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected CLASS:FRACTION such as 3:0.5, not {text!r}") from None
        if not 0 <= label < num_classes:
            raise argparse.ArgumentTypeError(f"the class must be 0..{num_classes - 1}, not {label}")
        if not 0 < fraction < 1:
            raise argparse.ArgumentTypeError(f"the fraction must be between 0 and 1 (exclusive), not {match.group(2)}")
        return label, fraction

    return parse


def version_number(text: str) -> str:
    """A model version as the text MLMD records it: a whole number from 1 (checked, kept as text)."""
    return str(integer(minimum=1)(text))

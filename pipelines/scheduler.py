"""`conveyor schedule`: runs a pipeline when a new span lands and/or every interval, one run at a time,
retrying failures with backoff, and logging each trigger and outcome as one line.

A span is new until a successful run has consumed it, as ML Metadata records it, not "appeared after the
scheduler started": spans that landed while the scheduler was down (a crash, a redeploy) trigger a run as
soon as it starts, and spans that land together are consumed by one run (it imports the older ones and
trains on its window). A span the drift gate blocked is settled: it is not retried and trains nothing.

Each run is a child `conveyor run` process: a crash or a leak in one run cannot take the scheduler down,
and SIGTERM can be passed on to it. The run lock (pipelines/run_lock.py) keeps a manual `conveyor run`
and the scheduler from running the same pipeline at once.

A run that pushed a canary with `serving_pusher.analysis` leaves the analysis pending in the release state;
the scheduler then starts it (`conveyor release canary MODEL --version N`) as a child of its own that
outlives the run, logged to .conveyor/analysis-<model>-<version>.log. While it runs, the ServingPusher of
later runs does not push over it (the analysis owns the canary until its verdict)."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conveyor_ml.base.clock import utc_now
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import PipelineSpec
from conveyor_ml.formats import release_state as releases
from conveyor_ml.formats.spans import span_numbers
from conveyor_ml.metadata import store as metadata
from conveyor_ml.metadata.index import MetadataIndex
from conveyor_ml.pipelines.run_lock import HELD, RunLock
from conveyor_ml.pipelines.workspace import STATE_DIRECTORY, check_workspace


def cron_line(spec_file: Path, every: float | None, cron: str | None, project: Path, workspace: Path,
              on_new_data: bool = False) -> str:
    """A crontab line for the same job, for users who prefer cron to a long-running process. Cron runs at
    fixed clock times, so an interval becomes a cron expression only when it divides an hour or a day."""
    cron = _cron_expression(every or 1800) if cron is None else " ".join(cron.split())
    log = (project / workspace).resolve() / STATE_DIRECTORY / "cron.log"
    installed = Path(sys.executable).parent / "conveyor"  # the conveyor printing this, wherever it lives
    command = installed if installed.is_file() else project / ".venv" / "bin" / "conveyor"
    comment = "the run lock skips a tick while a run is still going"
    if on_new_data:
        comment += "; cron cannot watch for data: a tick with no new span is answered from the cache"
    return (f"{cron} cd {shlex.quote(str(project))} && {shlex.quote(str(command))} run "
            f"{shlex.quote(str(spec_file))} >> {shlex.quote(str(log))} 2>&1  # {comment}")


def _cron_expression(seconds: float) -> str:
    """The cron expression that runs every `seconds`, refused when cron's clock times cannot keep it."""
    minutes = seconds / 60
    if minutes == int(minutes) and minutes < 60 and 60 % minutes == 0:
        return "* * * * *" if minutes == 1 else f"*/{int(minutes)} * * * *"
    hours = minutes / 60
    if hours == 24:
        return "0 0 * * *"
    if hours == int(hours) and 24 % hours == 0:
        return "0 * * * *" if hours == 1 else f"0 */{int(hours)} * * *"
    raise ConveyorError(f"--print-cron: an interval of {seconds:g} s has no cron expression (cron runs at "
                        "fixed clock times): use minutes that divide an hour, hours that divide a day, or 1d; "
                        "or set schedule.cron in the spec")


@dataclass
class Outcome:
    ok: bool
    code: int
    last_line: str
    results: str = ""  # the summary's evaluated / pushed lines


# The run summary's lines worth a line in the schedule log (see run_summary.py).
RESULT_PREFIXES = ("  evaluated:", "  pushed:")


def describe_spans(spans: list[int]) -> str:
    return f"span{'s' if len(spans) > 1 else ''} {', '.join(map(str, spans))}"


class Scheduler:
    def __init__(self, spec: PipelineSpec, spec_file: Path, *, every: float | None, on_new_data: bool,
                 max_runs: int | None, retries: int, backoff: float, poll: float, term_grace: float = 60.0):
        if every is None and not on_new_data:
            raise ConveyorError("schedule: give --every, --on-new-data, or both")
        if retries < 0 or (max_runs is not None and max_runs < 1) or min(backoff, poll) <= 0 or (every or 1) <= 0:
            raise ConveyorError("schedule: --retries must be >= 0, --max-runs >= 1, and every interval > 0")
        self.spec, self.spec_file = spec, spec_file
        self.every, self.on_new_data, self.max_runs = every, on_new_data, max_runs
        self.retries, self.backoff, self.poll, self.term_grace = retries, backoff, poll, term_grace
        check_workspace(spec)  # what every run would fail on, said once before the first
        self.log_path = spec.workspace / STATE_DIRECTORY / "schedule.log"
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.open("a").close()
        except OSError as exc:
            raise ConveyorError(f"cannot write the scheduler's log {self.log_path} ({exc.strerror}); move away "
                                "what is in its place") from None
        self.stopping = False
        self.child: subprocess.Popen | None = None
        self.analysis: subprocess.Popen | None = None
        self.runs_started = 0
        self.store_down = False  # the metadata store failed to answer (logged once until it answers again)

    def log(self, message: str) -> None:
        line = f"{utc_now()} conveyor schedule: {message}"
        # The file first: whatever a watcher has seen on stdout is already in the log when it kills us.
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as stream:
            stream.write(line + "\n")
        print(line, flush=True)

    def _on_sigterm(self, signum, frame) -> None:
        self.stopping = True
        if self.child and self.child.poll() is None:
            self.log(f"SIGTERM: asking run (pid {self.child.pid}) to stop, then exiting")
            self.child.send_signal(signal.SIGTERM)
        else:
            self.log("SIGTERM: exiting")

    def latest_span(self) -> int:
        spans = span_numbers(self.spec.data_root)
        return spans[-1] if spans else 0

    def _index(self) -> MetadataIndex | None:
        if not metadata.store_exists(self.spec.metadata):
            return None
        # Read-only on SQLite (never waiting on a run's write lock); on MySQL, the database the scheduler's
        # runs will write is created if missing, as a run would, rather than refused as a query refuses it.
        return MetadataIndex(metadata.open_store(self.spec.metadata, read_only=not self.spec.metadata.mysql))

    def pending_spans(self) -> list[int]:
        """Spans on disk newer than the newest span a successful run consumed, except those the drift gate
        blocked (from MLMD)."""
        index = self._index()
        name = self.spec.name  # a store may hold other pipelines' runs
        consumed, blocked = (index.consumed_through(name), index.blocked_spans(name)) if index else (0, set())
        return [span for span in span_numbers(self.spec.data_root) if span > consumed and span not in blocked]

    def run_in_progress(self) -> dict | None:
        """The holder of the run lock ({pid, started}) while a run of this pipeline is in progress, else None: a
        run the scheduler started before it was killed goes on, and what it consumes is not run again."""
        return RunLock(self.spec.workspace).live_holder()

    def blocked(self, span: int) -> bool:
        """Whether the drift gate blocked `span`; False when the store cannot tell now (the run is
        retried)."""
        index = self.store_answer(self._index)
        return index is not None and span in index.blocked_spans(self.spec.name)

    def store_answer(self, question):
        """`question()`, or None while the metadata store cannot answer (a MySQL server restarting, a
        network outage): the scheduler outlives it, logging the first failure and the recovery once each."""
        try:
            answer = question()
        except Exception as exc:
            if not self.spec.metadata.mysql:
                raise
            problem = (str(exc) if isinstance(exc, ConveyorError)
                       else metadata.connection_lost(self.spec.metadata, exc))
            if problem is None:
                raise
            if not self.store_down:
                self.log(f"{problem}; looking again every {self.poll:g}s")
            self.store_down = True
            return None
        if self.store_down:
            self.log("metadata store reachable again")
        self.store_down = False
        return answer

    def run_once(self) -> Outcome:
        self.child = subprocess.Popen([sys.executable, "-m", "conveyor_ml.cli", "run", str(self.spec_file)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        last, results = "", []
        for line in self.child.stdout:
            line = line.rstrip()
            if line.startswith("conveyor:"):
                last = line
            elif line.startswith(RESULT_PREFIXES):
                results.append(" ".join(line.split()))
        try:
            code = self.child.wait(timeout=self.term_grace if self.stopping else None)
        except subprocess.TimeoutExpired:
            self.child.kill()
            code = self.child.wait()
        self.child = None
        return Outcome(code == 0, code, last, "; ".join(results))

    def trigger(self, reason: str) -> bool:
        """Runs the pipeline (retrying a failed run); False when it could not start because another process's
        run took the run lock first (a manual `conveyor run` just begun): no run of this scheduler's counted."""
        self.runs_started += 1
        self.log(f"trigger {self.runs_started}: {reason}")
        for attempt in range(1, self.retries + 2):
            started = time.monotonic()
            newest = self.latest_span()
            outcome = self.run_once()
            seconds = time.monotonic() - started
            if not outcome.ok and HELD in outcome.last_line:
                self.runs_started -= 1
                self.log(f"{outcome.last_line.removeprefix('conveyor: error: ')}: this trigger waits for it")
                return False
            if outcome.ok:
                self.log(f"run succeeded in {seconds:.1f}s: {'; '.join(filter(None, [outcome.last_line, outcome.results]))}")
                self.start_pending_analysis()
                return True
            if self.stopping:
                self.log(f"run abandoned on SIGTERM (exit {outcome.code}); its pushes are atomic, nothing half-written")
                return True
            self.log(f"run failed (exit {outcome.code}) after {seconds:.1f}s: {outcome.last_line}")
            if self.blocked(newest):
                self.log(f"span {newest} was blocked by the drift gate (data.drift.policy block): not retried; "
                         "it stays out of training, and the next span is compared with the last one before it")
                return True
            if attempt <= self.retries:
                delay = self.backoff * 2 ** (attempt - 1)
                self.log(f"retry {attempt}/{self.retries} in {delay:g}s")
                self._sleep(delay)
                if self.stopping:
                    return True
        self.log("giving up on this trigger; waiting for the next one")
        return True

    def start_pending_analysis(self) -> None:
        """Starts the canary analysis a run's push left pending (one at a time; none while one runs)."""
        pusher = self.spec.components.serving_pusher
        if pusher is None or pusher.analysis is None or (self.analysis and self.analysis.poll() is None):
            return
        version = releases.read_release(self.spec.serving_base, pusher.model_name).pending_analysis()
        if version is None:
            return
        log_path = self.log_path.parent / f"analysis-{pusher.model_name}-{version}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as stream:
            self.analysis = subprocess.Popen(
                [sys.executable, "-m", "conveyor_ml.cli", "release", "canary", pusher.model_name, "--version",
                 str(version), "--spec", str(self.spec_file)], stdout=stream, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.log(f"canary analysis of {pusher.model_name} version {version} started (pid {self.analysis.pid}, "
                 f"log {log_path}); later runs do not push over it")

    def _finish_analysis(self) -> None:
        """On exit: a running analysis is asked to stop (it rolls the canary back) on SIGTERM, else awaited."""
        if self.analysis is None or self.analysis.poll() is not None:
            return
        if self.stopping:
            self.analysis.send_signal(signal.SIGTERM)
        else:
            self.log(f"waiting for the canary analysis (pid {self.analysis.pid}) to reach its verdict")
        code = self.analysis.wait()
        self.log(f"canary analysis ended (exit {code}: {'promoted' if code == 0 else 'not promoted'})")

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def loop(self) -> int:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            # Spans this process has triggered a run for (whatever its outcome): not triggered again.
            handled_through = 0
            waiting = False  # on another process's run (logged once)
            next_tick = time.monotonic() + self.every if self.every else None
            modes = ", ".join(filter(None, [f"every {self.every:g}s" if self.every else "",
                                            "on new data" if self.on_new_data else ""]))
            pending = self.pending_spans() if self.on_new_data else []
            backlog = (f"; not yet consumed by a successful run: {describe_spans(pending)}" if pending
                       else "; every span consumed" if self.on_new_data else "")
            self.log(f"watching {self.spec.data_root} for pipeline '{self.spec.name}' ({modes}); latest span "
                     f"{self.latest_span()}{backlog}" + (f"; at most {self.max_runs} runs" if self.max_runs else ""))
            while not self.stopping and (self.max_runs is None or self.runs_started < self.max_runs):
                reason, through = None, 0
                if self.on_new_data and self.latest_span() > handled_through:
                    pending = self.store_answer(self.pending_spans)
                    if pending is None:  # the store is down for now (logged once): look again later
                        self._sleep(self.poll)
                        continue
                    if pending:  # a run takes every span on disk: this trigger covers them all
                        reason, through = f"new {describe_spans(pending)}", self.latest_span()
                    else:
                        handled_through = self.latest_span()
                if reason is None and next_tick is not None and time.monotonic() >= next_tick:
                    reason = "interval"
                if reason is None:
                    self._sleep(self.poll)
                    continue
                holder = self.run_in_progress()
                if holder is not None:  # e.g. the run of a scheduler that was killed: wait, then look again
                    if not waiting:
                        self.log(f"a run of this pipeline is in progress (pid {holder.get('pid', '?')}, started "
                                 f"{holder.get('started', '?')}): waiting for it before acting on: {reason}")
                    waiting = True
                    self._sleep(self.poll)
                    continue
                waiting = False
                if not self.trigger(reason):
                    continue  # another process's run holds the lock: waited for above, then looked at again
                handled_through = max(handled_through, through)
                if next_tick is not None:
                    next_tick = time.monotonic() + self.every
            self._finish_analysis()
            self.log(f"stopped after {self.runs_started} runs")
            return 0
        except KeyboardInterrupt:  # Ctrl-C: the log says so too (a run it started goes on unless it got it)
            self.log(f"interrupted after {self.runs_started} runs")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)

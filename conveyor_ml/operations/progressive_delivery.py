"""`conveyor release shadow | canary`: progressive delivery against a running model server.

Shadow: a version labelled `shadow` sees a share of live requests' copies in the background (the server
compares its answers with the live version's, serving/shadow.py); ending the phase records its figures in
ML Metadata on the version (`conveyor lineage` shows them).

Analysed canary: the canary's weight rises through the steps; each step is a release change, measured over
the interval from the server's Prometheus endpoint (operations/canary_analysis.py) and compared with
stable over the same window; any breach rolls the canary back at once (the error rate is watched throughout
the window, every check at its end); the last step passing promotes it. Each step, each measurement that
decided one and the verdict are MLMD executions in one `conveyor.Release` context: the release's timeline.

The analysis claims the canary in the release state (its pid): `conveyor promote | rollback` still work (the
analysis then ends as superseded), a pipeline push does not push over it, and a second analysis is refused.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from conveyor_ml.base.clock import compact_utc_now, utc_now
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.names import (
    CANARY_MEASUREMENT_EXECUTION,
    CANARY_STEP_EXECUTION,
    CANARY_VERDICT_EXECUTION,
    PROMOTE_EXECUTION,
    RELEASE_CONTEXT,
    ROLLBACK_EXECUTION,
    SHADOW_END_EXECUTION,
    SHADOW_REPORT_EXECUTION,
    SHADOW_START_EXECUTION,
)
from conveyor_ml.base.spec import CanaryAnalysisSettings, PipelineSpec, canary_steps_problem
from conveyor_ml.components.release_record import record_observation, release_context
from conveyor_ml.formats import release_state as releases
from conveyor_ml.operations import canary_analysis as analysis
from conveyor_ml.operations.monitor import fetch, scrape
from conveyor_ml.operations.release_commands import (
    CanarySource,
    _commit_and_record,
    _serving_base,
    locked_release,
    say_repair,
    start_canary,
)

EXTRA_WINDOWS = 3  # a step with too few canary requests is measured again this many times, then rolled back
TRAFFIC_WAIT_SECONDS = 15.0  # how long the server may take to apply a new split (it polls traffic.json)


def _say(line: str) -> None:
    print(line, flush=True)


# -- shadow ---------------------------------------------------------------------------------------------
def shadow_figures(url: str, model: str, version: int) -> dict | None:
    """The server's figures for the shadow version (GET /v1/models/{m}/monitoring), None if none answer."""
    try:
        document = json.loads(fetch(f"{url.rstrip('/')}/v1/models/{model}/monitoring", timeout=3.0))
    except (ConveyorError, ValueError):
        return None
    return (document.get("shadow") or {}).get("versions", {}).get(str(version))


def shadow_summary(figures: dict | None) -> str:
    if not figures:
        return "no figures: the server did not answer"
    agreement = figures.get("agreement")
    return (f"shadowed on {figures['requests']:,} requests, "
            f"{'-' if agreement is None else f'{agreement * 100:.1f} %'} agreement, mean probability difference "
            f"{figures.get('mean_probability_difference') or 0:.3f}, {figures['dropped']:,} dropped, "
            f"{figures['errors']:,} failed")


def _report_properties(version: int, figures: dict | None, url: str) -> dict[str, str]:
    figures = figures or {}
    return {"version": str(version), "server": url, "summary": shadow_summary(figures or None),
            **{key: str(figures.get(key, "")) for key in ("requests", "instances", "agreement",
                                                            "mean_probability_difference", "dropped", "errors")},
            "live_latency_ms": json.dumps(figures.get("live_latency_ms", {})),
            "shadow_latency_ms": json.dumps(figures.get("shadow_latency_ms", {}))}


def start_shadow(spec: PipelineSpec, model: str, version: int, percent: int, *, reason: str = "",
                 say: Callable[[str], None] = say_repair) -> releases.ModelRelease:
    """Labels `version` shadow at `percent`% of live requests (a release change, recorded)."""
    with locked_release(spec, model, say) as (state, release):
        if version not in release.versions():
            raise ConveyorError(f"model {model}: version {version} is not on disk (versions: "
                                f"{', '.join(map(str, release.versions())) or 'none'})")
        before = release.copy()
        if releases.SHADOW in release.labels and release.labels[releases.SHADOW] != version:
            raise ConveyorError(f"model {model} already shadows version {release.labels[releases.SHADOW]}: end "
                                f"that phase first (conveyor release shadow {model} --end)")
        releases.set_shadow(release, version, percent)
        context = release_context(spec, model, f"{model}-shadow-v{version}-{compact_utc_now()}",
                                  {"kind": "shadow", "version": str(version)})
        _commit_and_record(spec, state, SHADOW_START_EXECUTION, before, release,
                           reason or f"version {version} shadows {percent}% of live requests", context=context,
                           details={"shadow_percent": str(percent), "release_context": context.name})
    return release


def _shadow_context(spec: PipelineSpec, model: str, version: int):
    """The context of the version's newest shadow phase (its start recorded the name)."""
    from conveyor_ml.metadata import store as metadata
    from conveyor_ml.metadata.values import props

    store = metadata.open_store(spec.metadata)
    starts = [e for e in store.get_executions_by_type(SHADOW_START_EXECUTION)
              if props(e).get("model_name") == model and json.loads(props(e).get("labels_after", "{}"))
              .get(releases.SHADOW) == version]
    if not starts:
        return None
    name = props(max(starts, key=lambda e: e.id)).get("release_context")
    return store.get_context_by_type_and_name(RELEASE_CONTEXT, name) if name else None


def end_shadow_phase(spec: PipelineSpec, release: releases.ModelRelease, url: str) -> tuple[int, dict | None, dict]:
    """Removes the shadow label from `release` (the caller commits it) after reading the server's figures
    for it and recording them as the version's shadow report. Returns (version, figures, details)."""
    version = release.labels[releases.SHADOW]
    figures = shadow_figures(url, release.name, version)
    context = _shadow_context(spec, release.name, version)
    properties = _report_properties(version, figures, url)
    record_observation(spec, SHADOW_REPORT_EXECUTION, release.name, properties, release=context,
                       reason=properties["summary"])
    releases.end_shadow(release)
    return version, figures, {"release_context": context.name if context is not None else ""}


def end_shadow(spec: PipelineSpec, model: str, url: str, *, reason: str = "",
               say: Callable[[str], None] = say_repair) -> tuple[int, dict | None]:
    """`conveyor release shadow MODEL --end`: the phase's figures recorded, the shadow label removed."""
    with locked_release(spec, model, say) as (state, release):
        if releases.SHADOW not in release.labels:
            raise ConveyorError(f"model {model} has no shadow version (labels: "
                                f"{', '.join(f'{k}={v}' for k, v in sorted(release.labels.items()))})")
        before = release.copy()
        version, figures, details = end_shadow_phase(spec, release, url)
        context = _shadow_context(spec, model, version)
        _commit_and_record(spec, state, SHADOW_END_EXECUTION, before, release,
                           reason or f"shadow phase of version {version} ended: {shadow_summary(figures)}",
                           context=context, details=details)
    return version, figures


# -- analysed canary ------------------------------------------------------------------------------------
@dataclass
class Verdict:
    verdict: str  # promoted | rolled_back | superseded | interrupted
    version: int
    reason: str
    steps_passed: int
    measurements: list[analysis.Measurement]


class _Interrupted(Exception):
    pass


class CanaryAnalysis:
    """One analysed canary, from its first step to its verdict (`run`)."""

    def __init__(self, spec: PipelineSpec, model: str, source: CanarySource, settings: CanaryAnalysisSettings, *,
                 reason: str = "", say: Callable[[str], None] = _say, sleep: Callable[[float], None] = time.sleep):
        problem = canary_steps_problem(tuple(settings.steps))
        if problem:
            raise ConveyorError(f"--steps: {problem}")
        self.spec, self.model, self.source, self.settings = spec, model, source, settings
        self.reason, self.say, self.sleep = reason, say, sleep
        self.base = _serving_base(spec)
        self.url = settings.server_url.rstrip("/")
        self.version: int | None = None
        self.stable: int | None = None
        self.context = None
        self.claim = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": releases.process_start(os.getpid()), "since": utc_now()}

    # -- the release's records ----------------------------------------------------------------------------
    def _locked_change(self, kind: str, move: Callable[[releases.ModelRelease], None], reason: str,
                       details: dict[str, str]) -> releases.ModelRelease | None:
        """Applies `move` to the model's release and records it, if the analysis still owns the canary;
        None when it does not (promoted, rolled back or replaced by someone else: superseded)."""
        with locked_release(self.spec, self.model) as (state, release):
            if not self._owns(release):
                return None
            before = release.copy()
            move(release)
            _commit_and_record(self.spec, state, kind, before, release, reason, context=self.context,
                               details={"release_context": self.context.name, **details})
            return release

    def _owns(self, release: releases.ModelRelease) -> bool:
        owner = release.analysis or {}
        return (release.labels.get(releases.CANARY) == self.version and owner.get("pid") == self.claim["pid"]
                and owner.get("host") == self.claim["host"])

    def _record(self, kind: str, details: dict[str, str], reason: str) -> None:
        record_observation(self.spec, kind, self.model, {"version": str(self.version),
                                                          "release_context": self.context.name, **details},
                           release=self.context, reason=reason)

    # -- the steps ----------------------------------------------------------------------------------------
    def _start(self) -> None:
        steps = self.settings.steps
        name_version = self.source.version if self.source.version is not None else self.source.variant
        self.context = release_context(self.spec, self.model, f"{self.model}-canary-{name_version}-{compact_utc_now()}",
                                       {"kind": "canary", "steps": ",".join(map(str, steps)),
                                        "settings": json.dumps(self._settings_document())})
        ended_shadow: dict = {}

        def end_a_shadow_of_the_canary(release: releases.ModelRelease) -> None:
            # A shadow becoming the canary ends its shadow phase, recorded with the server's figures.
            if self.source.version is not None and release.labels.get(releases.SHADOW) == self.source.version:
                version, figures, _ = end_shadow_phase(self.spec, release, self.url)
                ended_shadow["summary"] = shadow_summary(figures)
            if self.settings.min_agreement > 0 and self.settings.mirror_percent and \
                    releases.SHADOW not in release.labels:
                # The server mirrors the canary's requests to stable and stable's to the canary: agreement
                # request by request, with the same extra load on both versions' latency.
                release.shadow_label, release.shadow_pair = releases.STABLE, releases.CANARY
                release.shadow_percent = self.settings.mirror_percent

        started = start_canary(
            self.spec, self.model, self.source, steps[0], kind=CANARY_STEP_EXECUTION,
            reason=self.reason or f"analysed canary: step 1 of {len(steps)} at {steps[0]}%",
            route_key=self.settings.route_key, claim=self.claim, context=self.context,
            details={"release_context": self.context.name, "step": "1", "weight": str(steps[0])},
            before_change=end_a_shadow_of_the_canary)
        self.version, self.stable = started.version, started.release.labels[releases.STABLE]
        if ended_shadow:
            self.say(f"conveyor: {self.model}: shadow phase of version {self.version} ended: {ended_shadow['summary']}")

    def _settings_document(self) -> dict:
        return {key: (list(value) if isinstance(value, tuple) else value)
                for key, value in self.settings.__dict__.items()}

    def _wait_for_split(self, weights: dict[str, int]) -> None:
        """Until the server serves the new split (it polls traffic.json), so a window measures one split."""
        deadline = time.monotonic() + TRAFFIC_WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                document = json.loads(fetch(f"{self.url}/v1/models/{self.model}/monitoring", timeout=2.0))
                if document.get("traffic") == weights:
                    return
            except (ConveyorError, ValueError):
                pass
            self.sleep(0.2)
        raise ConveyorError(f"the server at {self.url} did not apply the split {weights} within "
                            f"{TRAFFIC_WAIT_SECONDS:.0f}s: is it serving {self.base / 'models.config'}?")

    def _measure_step(self, index: int, weight: int, baseline: analysis.StableBaseline) -> analysis.Measurement | None:
        """Watches one step: the measurement that decided it (breach, pass, or too few requests at the
        end), or None when the analysis no longer owns the canary."""
        settings = self.settings
        check_every = min(settings.interval_seconds, max(0.5, settings.interval_seconds / 10))
        before, started = scrape(self.url), time.monotonic()
        windows = 1
        while True:
            deadline = started + settings.interval_seconds * windows
            while True:
                self.sleep(max(0.0, min(check_every, deadline - time.monotonic())))
                if not self._still_owned():
                    return None
                final = time.monotonic() >= deadline
                figures = analysis.window(before, scrape(self.url), self.model)
                measurement = analysis.measure(settings, figures, self.version, self.stable, baseline, step=index + 1,
                                               weight=weight, seconds=time.monotonic() - started, final=final)
                if measurement.verdict == "breach" or final:
                    break
            if measurement.verdict != "too_few_requests" or windows > EXTRA_WINDOWS:
                return measurement
            windows += 1
            self.say(f"conveyor: step {index + 1}: only {measurement.canary_requests} canary requests "
                     f"(need {settings.min_requests}); measuring another {settings.interval_seconds:g}s")

    def _still_owned(self) -> bool:
        return self._owns(releases.read_release(self.base, self.model))

    def run(self) -> Verdict:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._start()
            return self._walk()
        except (_Interrupted, KeyboardInterrupt):
            return self._finish("interrupted", "rolled_back", "the analysis was interrupted (SIGTERM or Ctrl-C): "
                                "rolled back, as no verdict was reached", [], 0)
        except ConveyorError as exc:
            if self.version is None:  # nothing was changed yet
                raise
            # A canary that cannot be measured (the server went away, ...) is not a passing one.
            self._finish("failed", "rolled_back", f"the analysis failed: {exc}", [], 0)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        raise _Interrupted()

    def _walk(self) -> Verdict:
        steps, measurements = self.settings.steps, []
        baseline = analysis.StableBaseline()
        self.say(f"conveyor: {self.model}: analysing canary version {self.version} against stable {self.stable}: "
                 f"steps {', '.join(f'{s}%' for s in steps)}, {self.settings.interval_seconds:g}s each"
                 + (f", sticky by {self.settings.route_key}" if self.settings.route_key else ""))
        for index, weight in enumerate(steps):
            if index:
                moved = self._locked_change(
                    CANARY_STEP_EXECUTION, lambda r, w=weight: releases.set_canary(r, self.version, w),
                    f"analysed canary: step {index + 1} of {len(steps)} at {weight}%",
                    {"step": str(index + 1), "weight": str(weight)})
                if moved is None:
                    return self._superseded(measurements, index)
            self._wait_for_split({releases.STABLE: 100 - weight, releases.CANARY: weight})
            self.say(f"conveyor: step {index + 1}/{len(steps)}: canary {self.version} at {weight}% for "
                     f"{self.settings.interval_seconds:g}s")
            measurement = self._measure_step(index, weight, baseline)
            if measurement is None:
                return self._superseded(measurements, index)
            measurements.append(measurement)
            self._record(CANARY_MEASUREMENT_EXECUTION, measurement.properties(), measurement.summary())
            self.say(f"conveyor:   {measurement.summary()}")
            if measurement.verdict != "pass":
                why = ("; ".join(check.text for check in measurement.breaches) if measurement.breaches
                       else f"only {measurement.canary_requests} canary requests in "
                            f"{1 + EXTRA_WINDOWS} windows (need {self.settings.min_requests})")
                return self._finish("rolled_back", "rolled_back", f"step {index + 1} at {weight}%: {why}",
                                    measurements, index)
        return self._finish("promoted", "promoted", f"all {len(steps)} steps inside the thresholds", measurements,
                            len(steps))

    def _superseded(self, measurements: list, steps_passed: int) -> Verdict:
        reason = "the canary was promoted, rolled back or replaced by another command during the analysis"
        self._record(CANARY_VERDICT_EXECUTION, {"verdict": "superseded", "steps_passed": str(steps_passed),
                                                "summary": f"superseded: {reason}"}, reason)
        self.say(f"conveyor: {self.model}: analysis stopped: {reason}")
        return Verdict("superseded", self.version, reason, steps_passed, measurements)

    def _finish(self, verdict: str, move: str, reason: str, measurements: list, steps_passed: int) -> Verdict:
        def clear(release: releases.ModelRelease) -> None:
            release.analysis, release.route_key = None, ""
            if move == "promoted":
                releases.promote(release)
            else:
                releases.drop_canary(release)

        kind = PROMOTE_EXECUTION if move == "promoted" else ROLLBACK_EXECUTION
        if self.version is None:
            raise ConveyorError(f"canary analysis of {self.model}: {reason}")
        changed = self._locked_change(kind, clear, f"canary analysis: {reason}",
                                      {"verdict": verdict, "steps_passed": str(steps_passed)})
        if changed is None:
            return self._superseded(measurements, steps_passed)
        self._record(CANARY_VERDICT_EXECUTION, {"verdict": verdict, "steps_passed": str(steps_passed),
                                                "stable_after": str(changed.labels[releases.STABLE]),
                                                "summary": f"{verdict.replace('_', ' ')}: {reason}"}, reason)
        what = (f"promoted: version {self.version} is stable (100%)" if move == "promoted"
                else f"rolled back: version {self.version} removed, stable {changed.labels[releases.STABLE]} at 100%")
        self.say(f"conveyor: {self.model}: {what} — {reason}")
        return Verdict(verdict, self.version, reason, steps_passed, measurements)


def analysis_settings(spec: PipelineSpec, **overrides) -> CanaryAnalysisSettings:
    """The spec's serving_pusher.analysis (or the defaults) with the command line's values on top."""
    pusher = spec.components.serving_pusher
    settings = (pusher.analysis if pusher is not None and pusher.analysis is not None else CanaryAnalysisSettings())
    return replace(settings, **{key: value for key, value in overrides.items() if value is not None})


def analyse_canary(spec: PipelineSpec, model: str, source: CanarySource, settings: CanaryAnalysisSettings, *,
                   reason: str = "", say: Callable[[str], None] = _say) -> Verdict:
    return CanaryAnalysis(spec, model, source, settings, reason=reason, say=say).run()

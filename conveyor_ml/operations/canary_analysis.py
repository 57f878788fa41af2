"""The measurements an analysed canary is judged by: two scrapes of the model server's Prometheus endpoint
make a window; per version the window holds its requests and failures, its latency histogram, its feedback,
and — from the server's mirroring of requests between canary and stable (serving/shadow.py) — how many
answers agree with the other version's on the same input. The canary is compared with stable over the same window.

Only the server's own series are read (`conveyor_requests_total`, `conveyor_request_latency_seconds`,
`conveyor_feedback_total`, `conveyor_shadow_instances_total`), so the analysis needs nothing but the
metrics endpoint. A check without enough data in its window is reported as such and does not decide.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from conveyor_ml.base.spec import CanaryAnalysisSettings
from conveyor_ml.operations.monitor import _delta, _quantile

MODEL_APIS = ("predict", "classify", "regress")  # status and metadata calls say nothing about a model's answers
MIN_FEEDBACK = 20  # labelled instances each version needs in a window before live accuracy is compared


@dataclass
class VersionWindow:
    """One version's figures over a window."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))  # cumulative, seconds
    correct: float = 0.0
    labelled: float = 0.0
    agreeing: float = 0.0  # as the stable version's mirrored answers: canary instances agreeing with it
    compared: float = 0.0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def p99_seconds(self) -> float | None:
        return _quantile(list(self.buckets.items()), 0.99) if self.requests else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled >= MIN_FEEDBACK else None


def window(before: dict, after: dict, model: str) -> dict[str, VersionWindow]:
    """{version: figures} of `model` between two scrapes (monitor.scrape)."""
    versions: dict[str, VersionWindow] = defaultdict(VersionWindow)
    for (name, labels), value in _delta(before, after).items():
        labels = dict(labels)
        if labels.get("model") != model or not labels.get("version"):
            continue
        figures = versions[labels["version"]]
        if name == "conveyor_requests_total" and labels.get("api") in MODEL_APIS:
            figures.requests += value
            if labels.get("status") != "OK":
                figures.errors += value
        elif name == "conveyor_request_latency_seconds_bucket" and labels.get("api") in MODEL_APIS:
            figures.buckets[float(labels["le"])] += value
        elif name == "conveyor_feedback_total":
            figures.labelled += value
            figures.correct += value if labels.get("outcome") == "correct" else 0.0
        elif name == "conveyor_shadow_instances_total":
            figures.compared += value
            figures.agreeing += value if labels.get("agreement") == "agree" else 0.0
    return dict(versions)


@dataclass
class Check:
    name: str
    value: float | None  # None: not enough data in the window
    threshold: float
    passed: bool | None  # None: not judged
    text: str


@dataclass
class Measurement:
    """What one window of one step showed, and what it decided."""

    step: int
    weight: int
    seconds: float
    canary_requests: int
    stable_requests: int
    checks: list[Check]
    verdict: str  # pass | breach | too_few_requests

    @property
    def breaches(self) -> list[Check]:
        return [check for check in self.checks if check.passed is False]

    def summary(self) -> str:
        judged = "; ".join(check.text for check in self.checks)
        return (f"step {self.step} ({self.weight}%), {self.seconds:.0f}s: {self.canary_requests} canary and "
                f"{self.stable_requests} stable requests; {judged} -> {self.verdict}")

    def properties(self) -> dict[str, str]:
        values = {f"{c.name}": "" if c.value is None else f"{c.value:.6g}" for c in self.checks}
        return {"step": str(self.step), "weight": str(self.weight), "window_seconds": f"{self.seconds:.1f}",
                "canary_requests": str(self.canary_requests), "stable_requests": str(self.stable_requests),
                "verdict": self.verdict, "summary": self.summary(), **values,
                "checks": ";".join(f"{c.name}={c.passed}" for c in self.checks)}

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class StableBaseline:
    """Stable's latest figures with enough requests: at the last step (canary 100%) stable serves nothing,
    so the canary is compared with what stable showed before."""

    p99_seconds: float | None = None


def judge(settings: CanaryAnalysisSettings, canary: VersionWindow, stable: VersionWindow, baseline: StableBaseline,
          *, final: bool) -> list[Check]:
    """The checks of one window. Mid-window (`final` False) only the error rate is judged, and only once the
    canary has `min_requests` requests: a failing canary is rolled back at once. At the window's end every
    check with enough data is judged."""
    enough = canary.requests >= settings.min_requests
    checks = []
    rate = canary.error_rate if enough else None
    checks.append(Check("error_rate", rate, settings.max_error_rate,
                        None if rate is None else rate <= settings.max_error_rate,
                        f"errors {_percent(rate)} (max {settings.max_error_rate:.1%})"))
    if not final:
        return checks
    if stable.requests >= settings.min_requests and stable.p99_seconds():
        baseline.p99_seconds = stable.p99_seconds()
    canary_p99 = canary.p99_seconds() if enough else None
    ratio = canary_p99 / baseline.p99_seconds if canary_p99 is not None and baseline.p99_seconds else None
    checks.append(Check("p99_ratio", ratio, settings.max_p99_ratio,
                        None if ratio is None else ratio <= settings.max_p99_ratio,
                        f"p99 {_ms(canary_p99)} vs stable {_ms(baseline.p99_seconds)}"
                        + (f" (x{ratio:.2f}, max x{settings.max_p99_ratio:g})" if ratio is not None else "")))
    # Agreement: the server mirrors the canary's requests to stable and stable's to the canary; each
    # version's mirror figures count the instances whose class matched the other version's answer.
    compared, agreeing = stable.compared + canary.compared, stable.agreeing + canary.agreeing
    agreement = agreeing / compared if compared >= settings.min_requests else None
    checks.append(Check("agreement", agreement, settings.min_agreement,
                        None if agreement is None else agreement >= settings.min_agreement,
                        f"agreement {_percent(agreement)} on {compared:.0f} (min {settings.min_agreement:.1%})"))
    drop = (canary.accuracy - stable.accuracy) * 100 if None not in (canary.accuracy, stable.accuracy) else None
    checks.append(Check("live_accuracy_drop_points", drop, settings.min_live_accuracy_drop,
                        None if drop is None else drop >= settings.min_live_accuracy_drop,
                        f"live accuracy {'-' if drop is None else f'{drop:+.1f}'}pt "
                        f"(min {settings.min_live_accuracy_drop:+g}pt)"))
    return checks


def measure(settings: CanaryAnalysisSettings, figures: dict[str, VersionWindow], canary_version: int,
            stable_version: int, baseline: StableBaseline, *, step: int, weight: int, seconds: float,
            final: bool) -> Measurement:
    canary = figures.get(str(canary_version), VersionWindow())
    stable = figures.get(str(stable_version), VersionWindow())
    checks = judge(settings, canary, stable, baseline, final=final)
    if any(check.passed is False for check in checks):
        verdict = "breach"
    elif canary.requests < settings.min_requests:
        verdict = "too_few_requests"
    else:
        verdict = "pass"
    return Measurement(step, weight, seconds, int(canary.requests), int(stable.requests), checks, verdict)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"

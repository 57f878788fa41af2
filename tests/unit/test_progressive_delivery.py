"""Progressive delivery's parts on small inputs: sticky routing, the shadow/canary release moves and the files
they write, the canary analysis' judgement of Prometheus windows, the shadow comparison, the flags."""
import argparse
import json
from collections import Counter

import numpy as np
import pytest

from conveyor_ml.base import cli_values as values
from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.base.spec import CanaryAnalysisSettings, canary_steps_problem
from conveyor_ml.formats import release_state as releases
from conveyor_ml.formats import serving_config as config
from conveyor_ml.operations import canary_analysis as analysis
from conveyor_ml.serving import routing
from conveyor_ml.serving.shadow import compare

USERS = [f"user-{i}" for i in range(2000)]


# -- sticky routing -------------------------------------------------------------------------------------
def test_a_key_always_gets_the_same_label_and_the_shares_follow_the_weights():
    weights = {"stable": 75, "canary": 25}
    first = {user: routing.sticky_label(weights, user) for user in USERS}
    assert all(routing.sticky_label(weights, user) == label for user, label in first.items())
    share = Counter(first.values())["canary"] / len(USERS)
    assert 0.21 < share < 0.29  # 25 % of 2,000 keys, within sampling noise


def test_a_rising_canary_weight_never_moves_a_key_back_to_stable():
    on_canary: set[str] = set()
    for weight in (10, 25, 50, 100):
        now = {user for user in USERS if routing.sticky_label({"stable": 100 - weight, "canary": weight}, user)
               == "canary"}
        assert on_canary <= now, "a key left the canary while its weight rose"
        on_canary = now
    assert on_canary == set(USERS)


def test_no_weight_no_label():
    assert routing.sticky_label({"stable": 0, "canary": 0}, "user-1") is None


def test_the_route_key_comes_from_the_models_header_only():
    traffic = config.TrafficWeights({"mnist": {"stable": 90, "canary": 10}}, route_keys={"mnist": "X-User-Id"})
    assert routing.route_key(traffic, "mnist", {"x-user-id": "ann"}) == "ann"
    assert routing.route_key(traffic, "mnist", {"x-other": "ann"}) is None
    assert routing.route_key(traffic, "other", {"x-user-id": "ann"}) is None


# -- release moves and the files they write ---------------------------------------------------------------
def _versions(base, *numbers):
    for number in numbers:
        (base / "mnist" / str(number)).mkdir(parents=True)
    return releases.ModelRelease("mnist", base, {"stable": 1}, {"stable": 100}, [1])


def _commit(base, release):
    state = releases.read_state(base)
    state.models["mnist"] = release
    releases.commit(state)
    releases.sync_served_files(state)


def test_a_shadow_is_labelled_and_mirrored_but_takes_no_live_weight(tmp_path):
    release = _versions(tmp_path, 1, 2)
    releases.set_shadow(release, 2, 30)
    _commit(tmp_path, release)
    traffic = config.read_traffic(tmp_path / config.TRAFFIC_FILE)
    assert traffic.models["mnist"] == {"stable": 100}
    assert traffic.shadows["mnist"] == {"label": "shadow", "percent": 30}
    served = config.read_model_server_config(tmp_path / config.MODELS_CONFIG).model_config_list.config[0]
    assert dict(served.version_labels) == {"stable": 1, "shadow": 2}
    assert releases.read_release(tmp_path, "mnist").shadow_percent == 30  # the state keeps it


def test_a_shadow_that_becomes_the_canary_stops_being_mirrored(tmp_path):
    release = _versions(tmp_path, 1, 2)
    releases.set_shadow(release, 2, 100)
    releases.set_canary(release, 2, 10)
    release.route_key = "X-User-Id"
    _commit(tmp_path, release)
    traffic = config.read_traffic(tmp_path / config.TRAFFIC_FILE)
    assert release.labels == {"stable": 1, "canary": 2}
    assert traffic.shadows == {} and traffic.route_keys == {"mnist": "X-User-Id"}
    assert traffic.models["mnist"] == {"stable": 90, "canary": 10}


def test_the_canary_comparison_with_stable_ends_with_the_canary(tmp_path):
    release = _versions(tmp_path, 1, 2)
    releases.set_canary(release, 2, 100)
    release.shadow_label, release.shadow_pair, release.shadow_percent = "stable", "canary", 100
    _commit(tmp_path, release)
    assert config.read_traffic(tmp_path / config.TRAFFIC_FILE).shadows == {"mnist": {
        "label": "stable", "percent": 100, "pair": "canary"}}
    assert releases.read_release(tmp_path, "mnist").shadow_pair == "canary"
    assert releases.drop_canary(release) == 2
    _commit(tmp_path, release)
    assert release.labels == {"stable": 1} and release.weights == {"stable": 100}
    assert config.read_traffic(tmp_path / config.TRAFFIC_FILE).shadows == {}


def test_promotion_keeps_an_unrelated_shadow(tmp_path):
    release = _versions(tmp_path, 1, 2, 3)
    releases.set_shadow(release, 3, 50)
    releases.set_canary(release, 2, 10)
    releases.promote(release)
    assert release.labels == {"stable": 2, "shadow": 3} and release.shadow_percent == 50


def test_bad_shadow_and_canary_moves_are_refused(tmp_path):
    release = _versions(tmp_path, 1, 2)
    with pytest.raises(ConveyorError, match="already takes live traffic"):
        releases.set_shadow(release, 1, 10)
    with pytest.raises(ConveyorError, match="1..100 percent"):
        releases.set_shadow(release, 2, 0)
    with pytest.raises(ConveyorError, match="is stable already"):
        releases.set_canary(release, 1, 10)
    with pytest.raises(ConveyorError, match="has no canary"):
        releases.drop_canary(release)


def test_only_a_live_owner_counts_as_a_running_analysis(tmp_path):
    import os
    import socket

    release = _versions(tmp_path, 1, 2)
    releases.set_canary(release, 2, 10)
    me = {"version": 2, "pid": os.getpid(), "host": socket.gethostname(),
          "started": releases.process_start(os.getpid())}
    release.analysis = me
    assert release.analysis_running()
    release.analysis = {**me, "started": -1}  # the pid was reused by another process
    assert not release.analysis_running()
    release.analysis = {"version": 2, "pending": True}
    assert not release.analysis_running() and release.pending_analysis() == 2


def test_a_damaged_progressive_key_is_reported_with_the_file(tmp_path):
    (tmp_path / releases.STATE_FILE).write_text(json.dumps({"format": 1, "unrecorded": [], "models": {"mnist": {
        "labels": {"stable": 1}, "weights": {"stable": 100}, "history": [1], "shadow_percent": 300}}}))
    with pytest.raises(ConveyorError, match="shadow_percent 0..100"):
        releases.read_state(tmp_path)


# -- the canary analysis' judgement --------------------------------------------------------------------------
def _scrape(versions: dict[str, dict]) -> dict:
    """A scrape as monitor.scrape returns it, for model mnist: per version its OK and failed predict
    requests, latencies (all in one bucket), feedback and mirrored instances."""
    samples = {}
    for version, figures in versions.items():
        def put(name, value, version=version, **labels):
            samples[(name, tuple(sorted({"model": "mnist", "version": version, **labels}.items())))] = value

        put("conveyor_requests_total", figures.get("ok", 0), api="predict", protocol="rest", status="OK")
        put("conveyor_requests_total", figures.get("failed", 0), api="predict", protocol="rest",
            status="INVALID_ARGUMENT")
        put("conveyor_requests_total", 1000, api="status", protocol="rest", status="NOT_FOUND")  # not a model call
        total = figures.get("ok", 0) + figures.get("failed", 0)
        latency = figures.get("latency", 0.004)
        for bound in (0.001, 0.005, 0.01, 0.05, float("inf")):
            put("conveyor_request_latency_seconds_bucket", total if bound >= latency else 0, api="predict",
                protocol="rest", le=str(bound))
        put("conveyor_shadow_instances_total", figures.get("agree", 0), agreement="agree")
        put("conveyor_shadow_instances_total", figures.get("disagree", 0), agreement="disagree")
    return samples


SETTINGS = CanaryAnalysisSettings(min_requests=20, max_error_rate=0.01, max_p99_ratio=1.5, min_agreement=0.9)


def _measure(after: dict, *, final=True, baseline=None):
    figures = analysis.window(_scrape({}), _scrape(after), "mnist")
    return analysis.measure(SETTINGS, figures, 2, 1, baseline or analysis.StableBaseline(), step=1, weight=10,
                            seconds=5, final=final)


def test_a_good_window_passes_every_check():
    measurement = _measure({"2": {"ok": 50}, "1": {"ok": 450, "agree": 49, "disagree": 1}})
    assert measurement.verdict == "pass" and measurement.canary_requests == 50
    judged = {check.name: check.passed for check in measurement.checks}
    assert judged == {"error_rate": True, "p99_ratio": True, "agreement": True, "live_accuracy_drop_points": None}


def test_failures_breach_mid_window_once_there_are_enough_requests():
    assert _measure({"2": {"ok": 10, "failed": 5}, "1": {"ok": 100}}, final=False).verdict == "too_few_requests"
    breach = _measure({"2": {"ok": 15, "failed": 5}, "1": {"ok": 100}}, final=False)
    assert breach.verdict == "breach" and [c.name for c in breach.breaches] == ["error_rate"]
    assert len(breach.checks) == 1  # mid-window, only the error rate is judged


def test_a_slow_or_disagreeing_canary_breaches_at_the_windows_end():
    slow = _measure({"2": {"ok": 50, "latency": 0.03}, "1": {"ok": 450, "latency": 0.004}})
    assert [c.name for c in slow.breaches] == ["p99_ratio"]
    disagreeing = _measure({"2": {"ok": 50}, "1": {"ok": 450, "agree": 30, "disagree": 20}})
    assert [c.name for c in disagreeing.breaches] == ["agreement"]


def test_at_100_percent_stables_p99_comes_from_the_earlier_window():
    baseline = analysis.StableBaseline()
    _measure({"2": {"ok": 50}, "1": {"ok": 450, "latency": 0.004}}, baseline=baseline)
    assert baseline.p99_seconds is not None
    last = _measure({"2": {"ok": 500, "latency": 0.004}, "1": {"ok": 0}}, baseline=baseline)
    assert last.verdict == "pass" and next(c for c in last.checks if c.name == "p99_ratio").passed is True


# -- the shadow comparison -------------------------------------------------------------------------------
def test_the_shadow_comparison_counts_agreeing_classes_and_the_probability_distance():
    live = {"probabilities": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])}
    shadow = {"probabilities": np.array([[0.7, 0.3], [0.9, 0.1], [0.6, 0.4]])}
    instances, agreeing, distance = compare(live, shadow)
    assert (instances, agreeing) == (3, 2)
    assert distance == pytest.approx(0.2 + 0.7 + 0.0)  # half the L1 distance of each row, summed


def test_outputs_without_classes_cannot_be_compared():
    with pytest.raises(ValueError):
        compare({"y": np.array([1.0])}, {"y": np.array([1.0])})


# -- flags and spec ---------------------------------------------------------------------------------------
def test_the_flags_take_percents_points_and_steps():
    assert values.share("1%") == pytest.approx(0.01) and values.share("0.98") == pytest.approx(0.98)
    assert values.points("-1pt") == -1.0 and values.points("+0.5") == 0.5
    assert values.percent_steps("10,25,50,100") == (10, 25, 50, 100)
    for parse, text in ((values.share, "120%"), (values.points, "-1kg"), (values.percent_steps, "10,50"),
                        (values.percent_steps, "50,25,100"), (values.header_name, "X User")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_steps_must_rise_to_100():
    assert canary_steps_problem((10, 25, 50, 100)) is None
    assert "last step must be 100" in canary_steps_problem((10, 50))
    assert "rise" in canary_steps_problem((50, 10, 100))


def test_the_pushers_analysis_section_reaches_the_executor_as_it_was_written():
    from conveyor_ml.base.spec import ServingPusherSettings
    from conveyor_ml.components.parameters import parameter_values, settings_from

    without = ServingPusherSettings(model_name="mnist", release="canary")
    with_analysis = ServingPusherSettings(model_name="mnist", release="canary", analysis=CanaryAnalysisSettings(
        steps=(5, 50, 100), interval_seconds=30, route_key="X-User-Id"))
    for settings in (without, with_analysis):
        assert settings_from(ServingPusherSettings, parameter_values(settings)) == settings


def test_the_scheduler_starts_a_pending_analysis_once(tmp_path):
    from conveyor_ml.base.spec import load_spec
    from conveyor_ml.pipelines.scheduler import Scheduler
    from tests.conftest import write_spec

    spec_file = write_spec(tmp_path, **{"components.serving_pusher.release": "canary",
                                        "components.serving_pusher.analysis": {"steps": [10, 100]}})
    spec = load_spec(spec_file)
    release = _versions(spec.serving_base, 1, 2)
    releases.set_canary(release, 2, 10)
    release.analysis = {"version": 2, "pending": True}
    _commit(spec.serving_base, release)
    scheduler = Scheduler(spec, spec_file, every=60, on_new_data=False, max_runs=1, retries=0, backoff=1, poll=1)
    scheduler.start_pending_analysis()
    child = scheduler.analysis
    try:
        assert child is not None and child.args[-7:] == ["release", "canary", "mnist", "--version", "2", "--spec",
                                                         str(spec_file)]
        scheduler.start_pending_analysis()  # one at a time: the running one is not started twice
        assert scheduler.analysis is child
    finally:
        child.kill()
        child.wait()
    log = (spec.workspace / ".conveyor" / "schedule.log").read_text()
    assert "canary analysis of mnist version 2 started" in log and log.count("started (pid") == 1


def test_monitor_prints_one_line_per_shadow_version():
    from conveyor_ml.operations.monitor import shadow_lines

    document = {"shadow": {"queue": {"depth": 3, "capacity": 64}, "versions": {"3": {
        "label": "shadow", "percent": 25, "requests": 4812, "instances": 4812, "agreement": 0.991,
        "mean_probability_difference": 0.0123, "errors": 0, "dropped": 17,
        "live_latency_ms": {"p50": 2.1, "p99": 9.0}, "shadow_latency_ms": {"p50": 3.4, "p99": 12.0}}}}}
    [line] = shadow_lines({"mnist": document})
    assert line == ("shadow mnist v3 (shadow, 25%): 4,812 requests, 99.1% agreement, mean probability difference "
                    "0.012, p50 live 2.1 ms / shadow 3.4 ms, 17 dropped, 0 failed (queue 3/64)")
    assert shadow_lines({"mnist": {"versions": {}}}) == []

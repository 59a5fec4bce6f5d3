"""The traffic judgment (switcher/analysis.py): the figures, the p95, the messages, and a
seeded simulation of whole watches showing the rule raises no false alarms but catches
bad builds."""

from __future__ import annotations

import dataclasses
import random

import pytest

from switcher import analysis
from switcher.analysis import BOUNDS, Figures, Rule, judge, percent, rise_lower_bound
from switcher.config import Analysis
from switcher.model import Color
from tests.fakes import answers

DEFAULTS = Analysis()
STRICT = dataclasses.replace(DEFAULTS, max_error_rate=0.0)


# ---------------------------------------------------------------- figures

FIGURES = {"responses": {"1xx": 1, "2xx": 812, "3xx": 2, "4xx": 3, "5xx": 4},
           "failures": {"refused": 5, "reset": 6, "timeout": 7},
           "connections": 0,
           "duration": {"le": list(BOUNDS), "counts": [700, 90, 20, 4, 2, 0, 0, 0, 0, 0, 0, 1],
                        "sum": 4.21}}


def test_figures_read_the_control_socket_format_and_write_it_back() -> None:
    figures = Figures.from_json(FIGURES)
    assert figures.to_json() == FIGURES
    assert (figures.answers, figures.failed, figures.errors_5xx) == (840, 22, 4)
    assert figures.by_reason() == {"refused": 5, "reset": 6, "timeout": 7}
    assert figures.summary() == {"answers": 840, "failed": 22, "5xx": 4, "p95": 0.0092,
                                 "failures": {"refused": 5, "reset": 6, "timeout": 7}}


def test_tcp_mode_judges_connections_and_their_failures() -> None:
    tcp = Figures.from_json({"connections": 90, "failures": {"refused": 10}})
    assert (tcp.answers, tcp.failed, tcp.share, tcp.p95) == (100, 10, 0.1, None)


@pytest.mark.parametrize("bad", [
    {"responses": {"2xx": -1}}, {"responses": {"2xx": True}}, {"connections": 1.5},
    {"failures": []}, {"duration": {"counts": [1, 2]}}, {"duration": {"le": "x"}}, [],
])
def test_malformed_figures_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"not|counts for"):
        Figures.from_json(bad)


def test_windows_are_differences_and_a_count_going_down_is_no_window() -> None:
    earlier, later = answers(100, 1), answers(150, 4)
    assert later.since(earlier) == answers(50, 3)
    assert (later - earlier) + earlier == later
    assert earlier.since(later) is None, "a restarted router's counters are not a window"


@pytest.mark.parametrize(("timed", "p95"), [
    ((0, 0, 100), 0.01 + 0.015 * 0.95),                # inside one bucket, linearly
    ((90, 0, 0, 0, 0, 0, 0, 10), 0.5 + 0.5 * 5 / 10),   # the rank falls in (0.5, 1]
    ((100,), 0.005 * 0.95),                            # the first bucket starts at 0
    ((1, *(0,) * 10, 99), 10.0),                       # beyond the last bound: that bound
    ((), None),                                        # nothing timed
])
def test_p95_interpolates_inside_its_bucket_like_histogram_quantile(
        timed: tuple[int, ...], p95: float | None) -> None:
    assert answers(timed=timed).p95 == pytest.approx(p95)


def test_percent_reads_naturally() -> None:
    assert [percent(s) for s in (37 / 212, 0.014, 0.004, 0.0005, 0, 1)] == [
        "17 %", "1.4 %", "0.4 %", "0.05 %", "0 %", "100 %"]


# ---------------------------------------------------------------- verdicts

BASELINE = answers(996, 4)  # blue: 0.4 % before the switch


def test_a_failing_color_fails_with_its_figures_in_the_message() -> None:
    verdict = judge(answers(175, 37), BASELINE, DEFAULTS, color=Color.green)
    assert (verdict.ok, verdict.judged, verdict.rule) == (False, True, Rule.errors)
    assert verdict.message == "green: 37 of 212 answers failed (17 %), blue 0.4 % before the switch"
    assert verdict.to_json() == {"ok": False, "judged": True, "rule": "errors",
                                 "message": verdict.message}


def test_a_good_color_passes_with_its_figures() -> None:
    verdict = judge(answers(211, 1), BASELINE, DEFAULTS, color=Color.green)
    assert (verdict.ok, verdict.judged) == (True, True)
    assert verdict.message == ("green passed on traffic: 1 of 212 answers failed (0.47 %), "
                               "blue 0.4 % before the switch")


def test_below_min_requests_is_not_judged_on_traffic() -> None:
    verdict = judge(answers(0, 12), BASELINE, DEFAULTS, color=Color.blue)
    assert (verdict.ok, verdict.judged) == (True, False)
    assert verdict.message == "not judged on traffic (12 answers)"


def test_refused_connects_count_as_failures() -> None:
    verdict = judge(answers(20, refused=40), BASELINE, DEFAULTS, color=Color.green)
    assert not verdict.ok and verdict.message.startswith("green: 40 of 60 answers failed")


def test_an_idle_baseline_still_judges_the_new_color() -> None:
    """An old color with no answers before the switch is taken as failing nothing, with the
    uncertainty of min_requests answers: a broken build fails, a good one passes."""
    idle = answers()
    broken = judge(answers(0, 50), idle, DEFAULTS, color=Color.green)
    assert not broken.ok
    assert broken.message == ("green: 50 of 50 answers failed (100 %), blue had 0 answers "
                              "before the switch (too few to compare: taken as 0 %)")
    assert judge(answers(297, 3), idle, STRICT, color=Color.green).ok
    assert not judge(answers(200, 100), answers(40), DEFAULTS, color=Color.green).ok


def test_a_noisy_baseline_widens_the_bound() -> None:
    """The same measured shares, a baseline of 100 answers instead of 10 000: less sure."""
    many, few = rise_lower_bound(10, 200, 100, 10000), rise_lower_bound(10, 200, 1, 100)
    assert few < many < 0.05 - 0.01


SLOW = (939, 0, 0, 0, 0, 0, 0, 50, 11)  # p95 = 0.5 + 0.5 × 11/50 = 0.61 s
QUICK = (283, 0, 15, 2)                 # p95 = 0.01 + 0.015 × 2/15 = 0.012 s
LATENCY = dataclasses.replace(DEFAULTS, max_latency_ratio=3)


def test_a_slow_color_fails_the_latency_rule() -> None:
    new, old = answers(1000, timed=SLOW), answers(300, timed=QUICK)
    verdict = judge(new, old, LATENCY, color=Color.green)
    assert (verdict.ok, verdict.rule) == (False, Rule.latency)
    assert verdict.message == "green: p95 0.61 s > 3 × blue's 0.012 s + 0.05 s"
    assert judge(new, old, DEFAULTS, color=Color.green).ok, "max_latency_ratio = 0 is off"
    assert judge(answers(1000, timed=QUICK), old, LATENCY, color=Color.green).ok


def test_latency_is_not_compared_with_a_baseline_that_timed_too_little() -> None:
    old = answers(40, timed=(40,))
    assert judge(answers(1000, timed=SLOW), old, LATENCY, color=Color.green).ok


def test_the_slack_spares_a_fast_baseline() -> None:
    """3 × a 2 ms baseline is 6 ms: a 40 ms build is still fine with the 50 ms slack."""
    old, new = answers(100, timed=(100,)), answers(100, timed=(0, 0, 0, 100))
    assert new.p95 == pytest.approx(0.04875)
    assert judge(new, old, LATENCY, color=Color.green).ok


# ---------------------------------------------------------------- the simulation

LOOKS = 40  # a 20 s watch at health.interval = 0.5 s
DEPLOYS = 1000


def binomial(rng: random.Random, n: int, p: float) -> int:
    """An exact binomial draw by inversion (random.binomialvariate needs Python 3.12)."""
    if p <= 0 or n == 0:
        return 0
    if p >= 1:
        return n
    if p > 0.5:
        return n - binomial(rng, n, 1 - p)
    q, u, k = 1 - p, rng.random(), 0
    prob = cdf = q ** n
    while u > cdf and k < n:
        prob *= (n - k) / (k + 1) * p / q
        k += 1
        cdf += prob
    return k


def watch(rng: random.Random, settings: Analysis, *, old: float, new: float) -> int | None:
    """One simulated deploy as the watch runs it: a baseline of 60 s of the old color's
    traffic, then LOOKS looks at the new color's growing counts (5, 10 or 25 answers per
    look, as a deploy's traffic may be), each judged. Returns the answers at the look that
    failed the new color, or None when it passed."""
    per_look = rng.choice((5, 10, 25))
    old_answers = per_look * 120
    old_failed = binomial(rng, old_answers, old)
    baseline = answers(old_answers - old_failed, old_failed)
    ok = failed = 0
    for _ in range(LOOKS):
        now_failed = binomial(rng, per_look, new)
        ok, failed = ok + per_look - now_failed, failed + now_failed
        if not judge(answers(ok, failed), baseline, settings, color=Color.green).ok:
            return ok + failed
    return None


@pytest.mark.parametrize("settings", [DEFAULTS, STRICT], ids=["defaults", "max_error_rate=0"])
def test_a_build_as_good_as_the_old_one_passes_99_percent_of_deploys(
        settings: Analysis) -> None:
    """DEPLOYS deploys whose new build fails exactly as often as the old one did (0 %, 1 %
    or 5 % of answers, in turn), with binomial noise on both the baseline and the window."""
    rng = random.Random(f"as good {settings.max_error_rate}")
    shares = (0.0, 0.01, 0.05)
    alarms = dict.fromkeys(shares, 0)
    for i in range(DEPLOYS):
        share = shares[i % len(shares)]
        alarms[share] += watch(rng, settings, old=share, new=share) is not None
    assert sum(alarms.values()) <= DEPLOYS // 100, alarms


def test_a_build_failing_every_page_fails_within_about_min_requests() -> None:
    rng = random.Random("every page")
    caught = [watch(rng, DEFAULTS, old=0.004, new=1.0) for _ in range(200)]
    assert all(n is not None and n <= 1.5 * DEFAULTS.min_requests for n in caught)


def test_a_build_failing_a_fifth_of_its_answers_is_caught() -> None:
    rng = random.Random("a fifth")
    caught = [watch(rng, DEFAULTS, old=0.004, new=0.2) for _ in range(200)]
    assert all(n is not None for n in caught)
    assert max(n for n in caught if n is not None) <= 4 * DEFAULTS.min_requests


def test_the_simulation_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its negative control: judged by the measured shares alone (z = 0, no bound), a build
    as good as the old one is failed often: the bound is what spares it."""
    monkeypatch.setattr(analysis, "Z", 0.0)
    rng = random.Random("control")
    alarms = sum(watch(rng, STRICT, old=0.05, new=0.05) is not None for _ in range(200))
    assert alarms > 50


# ---------------------------------------------------------------- windows across restarts

def test_a_window_since_the_switch_survives_router_restarts() -> None:
    since = analysis.Since(started_at=100.0, snapshot=answers(500, 5))
    assert since.update(100.0, answers(530, 6)) == answers(30, 1)
    # A new router (a new start time) counts from zero: the first one's 30 + 1 are kept.
    assert since.update(160.0, answers(10)) == answers(40, 1)
    assert since.update(160.0, answers(20, 2)) == answers(50, 3)
    # Counters that went down under the same start time are a restart too, never negative.
    assert since.update(160.0, answers(5)) == answers(55, 3)
    assert since.restarts == 2

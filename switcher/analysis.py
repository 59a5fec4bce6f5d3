"""How a new color is judged on live traffic (DESIGN.md Part 2, "Judging"): the router's
per-color figures as values, and the rule that passes or fails the new color. Pure: no I/O.

FIGURES, one color's account as the router's control socket carries it (see
:mod:`switcher.router.control`; ``counts`` are per bucket, not cumulative, the last one
beyond the last bound)::

    {"responses": {"1xx": 0, "2xx": 812, "3xx": 0, "4xx": 3, "5xx": 1},
     "failures": {"refused": 0, "reset": 0, "timeout": 0},
     "connections": 0,
     "duration": {"le": [0.005, 0.01, …, 10], "counts": [700, 90, …, 0], "sum": 4.21}}

The rule, every ``health.interval`` of the watch:

- **answers** = every response (any class) + every failure the router saw + connections
  (tcp mode has no responses: it judges connections and their failures);
  **failed** = 5xx + refused + reset + timeout; the **share** is failed / answers.
- Fewer than ``min_requests`` answers since the switch: not judged on traffic.
- Errors: the new color fails when its share is above the old color's share over the
  ``baseline`` seconds before the switch by more than ``max_error_rate`` — not as measured,
  but as a one-sided lower confidence bound on the difference (:func:`rise_lower_bound`).
- Latency (``max_latency_ratio`` > 0): fails when its p95 > ratio × the baseline's p95
  + 0.05 s (the slack keeps a 2 ms baseline from failing a 7 ms build).
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from typing import Any

from switcher.config import Analysis
from switcher.model import DURATION_BOUNDS, STATUS_CLASSES, Color

CLASSES = STATUS_CLASSES
# The latency histogram's upper bounds in seconds (DESIGN.md's metric buckets).
BOUNDS = DURATION_BOUNDS
LATENCY_SLACK = 0.05  # seconds added to ratio × the baseline p95
QUANTILE = 0.95

# The z of the one-sided bound. The watch looks every health.interval (40 looks in a 20 s
# watch), and a false alarm at any look switches a good build back, so one look's error
# must be far below the 1 % a deploy may suffer. z = 3.72 is a one-sided 0.01 % per look;
# the looks are strongly correlated (each adds a few percent of answers), and
# tests/unit/test_analysis.py's simulation measures whole watches: about 0.2 % of good
# builds failed with max_error_rate = 0 (the hardest case: no margin at all), ~0 with the
# default 0.02, while a build failing every page still fails at its first look past
# min_requests and one failing 20 % of its answers within about 2 × min_requests.
Z = 3.72


class Reason(enum.StrEnum):
    """Failures the router saw itself (router/control.py says when each is counted)."""

    refused = "refused"
    reset = "reset"
    timeout = "timeout"


class Rule(enum.StrEnum):
    """Which rule failed a color."""

    errors = "errors"
    latency = "latency"


@dataclass(frozen=True)
class Figures:
    """One color's figures: cumulative counters, or a window (a difference of two)."""

    responses: tuple[int, ...] = (0,) * len(CLASSES)  # in CLASSES order
    failures: tuple[int, ...] = (0,) * len(Reason)  # in Reason order
    connections: int = 0
    counts: tuple[int, ...] = (0,) * (len(BOUNDS) + 1)  # per bucket; last: beyond le[-1]
    duration_sum: float = 0.0
    le: tuple[float, ...] = BOUNDS

    @classmethod
    def from_json(cls, raw: Any) -> Figures:
        """From FIGURES; raises ValueError naming what is missing or malformed."""
        if not isinstance(raw, dict):
            raise ValueError(f"figures are not an object: {raw!r:.80}")
        duration = raw.get("duration") or {}
        le = tuple(float(b) for b in _list(duration, "le", BOUNDS))
        figures = cls(
            responses=_counts(raw.get("responses", {}), CLASSES, "responses"),
            failures=_counts(raw.get("failures", {}), tuple(Reason), "failures"),
            connections=_count(raw.get("connections", 0), "connections"),
            counts=tuple(_count(c, "duration.counts")
                         for c in _list(duration, "counts", (0,) * (len(le) + 1))),
            duration_sum=float(duration.get("sum", 0.0)), le=le)
        if len(figures.counts) != len(le) + 1:
            raise ValueError(f"duration has {len(figures.counts)} counts for {len(le)} "
                             "bounds (expected one more: beyond the last)")
        return figures

    def to_json(self) -> dict[str, Any]:
        return {"responses": dict(zip(CLASSES, self.responses, strict=True)),
                "failures": self.by_reason(), "connections": self.connections,
                "duration": {"le": list(self.le), "counts": list(self.counts),
                             "sum": round(self.duration_sum, 6)}}

    def __add__(self, other: Figures) -> Figures:
        return self._combine(other, 1)

    def __sub__(self, other: Figures) -> Figures:
        return self._combine(other, -1)

    def _combine(self, other: Figures, sign: int) -> Figures:
        if self.le != other.le:
            raise ValueError(f"histograms with different bounds: {self.le} and {other.le}")
        return Figures(
            responses=_zip(self.responses, other.responses, sign),
            failures=_zip(self.failures, other.failures, sign),
            connections=self.connections + sign * other.connections,
            counts=_zip(self.counts, other.counts, sign),
            duration_sum=self.duration_sum + sign * other.duration_sum, le=self.le)

    def since(self, earlier: Figures) -> Figures | None:
        """``self − earlier``, or None when a count went down: not the same counters (the
        router restarted between the two readings)."""
        window = self - earlier
        return None if window.negative else window

    @property
    def negative(self) -> bool:
        return min(*self.responses, *self.failures, self.connections, *self.counts) < 0

    @property
    def answers(self) -> int:
        return sum(self.responses) + sum(self.failures) + self.connections

    @property
    def errors_5xx(self) -> int:
        return self.responses[CLASSES.index("5xx")]

    @property
    def failed(self) -> int:
        return self.errors_5xx + sum(self.failures)

    @property
    def share(self) -> float:
        return self.failed / self.answers if self.answers else 0.0

    @property
    def timed(self) -> int:
        """How many answers the latency histogram holds."""
        return sum(self.counts)

    def by_reason(self) -> dict[str, int]:
        return {reason.value: n for reason, n in zip(Reason, self.failures, strict=True)}

    def quantile(self, q: float) -> float | None:
        """Like Prometheus's histogram_quantile: linear inside the bucket holding the rank
        (the first bucket starts at 0); beyond the last bound, the last bound. None
        without a single timed answer."""
        total = self.timed
        if total == 0:
            return None
        rank, below = q * total, 0
        for i, count in enumerate(self.counts):
            if count and below + count >= rank:
                if i == len(self.le):
                    return self.le[-1]
                start = self.le[i - 1] if i else 0.0
                return start + (self.le[i] - start) * (rank - below) / count
            below += count
        return self.le[-1]

    @property
    def p95(self) -> float | None:
        return self.quantile(QUANTILE)

    def summary(self) -> dict[str, Any]:
        """What history keeps of a window: answers, failures by reason, 5xx, p95."""
        p95 = self.p95
        return {"answers": self.answers, "failed": self.failed, "5xx": self.errors_5xx,
                "failures": self.by_reason(), "p95": None if p95 is None else round(p95, 4)}


@dataclass
class Since:
    """One color's figures since T0, from cumulative counters read look after look, across
    router restarts: a new ``started_at`` is a new router counting from zero, so what the
    old one had counted since T0 (its last good reading) is kept and the new one's counters
    are added in full. Never negative: counters that went down under the same start time
    are taken as a restart too."""

    started_at: float
    snapshot: Figures  # the counters at T0, of the router that started at started_at
    carried: Figures = Figures()  # counted since T0 by routers before this one
    last: Figures = Figures()  # the last good window
    restarts: int = 0
    seen: Figures | None = None  # the counters as last read (at first: the snapshot)

    def update(self, started_at: float, counters: Figures) -> Figures:
        # Each reading is at least the one before (hence the snapshot), or it is a new router.
        if started_at != self.started_at or counters.since(self.seen or self.snapshot) is None:
            self.started_at, self.snapshot = started_at, Figures()
            self.carried = self.last
            self.restarts += 1
        self.seen = counters
        self.last = self.carried + (counters - self.snapshot)
        return self.last


def _list(raw: dict[str, Any], key: str, default: tuple[Any, ...]) -> list[Any]:
    value = raw.get(key, list(default))
    if not isinstance(value, list):
        raise ValueError(f"duration.{key} is not a list: {value!r:.80}")
    return value


def _counts(raw: Any, keys: tuple[str, ...], what: str) -> tuple[int, ...]:
    if not isinstance(raw, dict):
        raise ValueError(f"{what} is not an object: {raw!r:.80}")
    return tuple(_count(raw.get(key, 0), f"{what}.{key}") for key in keys)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} is not a count: {value!r:.40}")
    return value


def _zip(a: tuple[int, ...], b: tuple[int, ...], sign: int) -> tuple[int, ...]:
    return tuple(x + sign * y for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------- the judgment

@dataclass(frozen=True)
class Verdict:
    """The outcome of one look at ``color``: ``ok`` False fails it (by ``rule``);
    ``judged`` False means too few answers to say anything (it passes on health and process
    alone). It keeps the figures it judged; its message is written when asked for."""

    color: Color
    new: Figures
    baseline: Figures
    settings: Analysis
    ok: bool = True
    judged: bool = True
    rule: Rule | None = None
    moment: str = "the switch"  # what the baseline was taken before (or "the canary")

    @functools.cached_property
    def message(self) -> str:
        if not self.judged:
            return f"not judged on traffic ({self.new.answers} answers)"
        if self.rule is Rule.latency:
            return _latency_text(self)
        shares = _shares(self.new, self.baseline, self.settings, self.color.other,
                         self.moment)
        return f"{self.color}: {shares}" if self.rule is Rule.errors \
            else f"{self.color} passed on traffic: {shares}"

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "judged": self.judged, "rule": self.rule and self.rule.value,
                "message": self.message}


def judge(new: Figures, baseline: Figures, settings: Analysis, *, color: Color,
          moment: str = "the switch") -> Verdict:
    """Judge ``color``'s ``new`` figures (since ``moment``: the switch, or the canary's
    start) against the other color's ``baseline`` (the seconds before it), by the rule of
    the module docstring."""
    if new.answers < settings.min_requests:
        return Verdict(color, new, baseline, settings, judged=False, moment=moment)
    rule = (Rule.errors if _rises(new, baseline, settings)
            else Rule.latency if _slower(new, baseline, settings) else None)
    return Verdict(color, new, baseline, settings, ok=rule is None, rule=rule, moment=moment)


def _rises(new: Figures, baseline: Figures, settings: Analysis) -> bool:
    old_failed, old_answers = _baseline_counts(baseline, settings)
    bound = rise_lower_bound(new.failed, new.answers, old_failed, old_answers, Z)
    return bound > settings.max_error_rate


def _baseline_counts(baseline: Figures, settings: Analysis) -> tuple[int, int]:
    """The old color's failed and answers as the bound uses them. An old color with fewer
    than min_requests answers before the switch (idle, or a router younger than the
    baseline) says little about what this environment's traffic fails anyway: its answers
    are made up to min_requests with successes — its share taken as ~0, with the
    uncertainty of min_requests answers, the least this environment judges on. So an idle
    baseline never blocks a judgment (0 answers would bound the old share by 1), the
    judgment does not jump as the baseline crosses min_requests, and its width still
    spares a new color whose share is only as high as an unmeasured old one could be:
    with the defaults an idle baseline fails the new color above a share of 26–30 % (a
    build failing every page fails at its first look), where a measured one (0.4 % of
    1000 answers) fails it above 5–10 %, as its own answers grow from 1000 down to 100."""
    return baseline.failed, max(baseline.answers, settings.min_requests)


def rise_lower_bound(new_failed: int, new_answers: int, old_failed: int, old_answers: int,
                     z: float = Z) -> float:
    """A one-sided lower confidence bound on (new share − old share): Newcombe's hybrid
    score interval with continuity correction (Newcombe 1998, method 11). It combines each
    share's own Wilson bound, so the old color's sampling noise widens it too: a baseline
    that happened to fail less than usual cannot make a good build look worse. Wilson
    rather than a normal approximation because shares here sit near 0 (a handful of
    failures), where the plain interval collapses; the continuity correction because the
    uncorrected Wilson bound is too high at counts of a few failures (simulated at
    z = 3.29 with max_error_rate = 0: 2.6 % of good builds failed, 0.7 % corrected)."""
    new_share, old_share = new_failed / new_answers, old_failed / old_answers
    new_low, _ = wilson_cc(new_failed, new_answers, z)
    _, old_high = wilson_cc(old_failed, old_answers, z)
    return new_share - old_share - math.hypot(new_share - new_low, old_high - old_share)


def wilson_cc(failed: int, answers: int, z: float = Z) -> tuple[float, float]:
    """The continuity-corrected Wilson score interval of failed / answers (0 answers:
    nothing known, (0, 1))."""
    if answers == 0:
        return 0.0, 1.0
    n, p, z2 = answers, failed / answers, z * z
    low = 0.0 if failed == 0 else (2 * n * p + z2 - 1 - z * math.sqrt(
        max(0.0, z2 - 2 - 1 / n + 4 * p * (n * (1 - p) + 1)))) / (2 * (n + z2))
    high = 1.0 if failed == answers else (2 * n * p + z2 + 1 + z * math.sqrt(
        max(0.0, z2 + 2 - 1 / n + 4 * p * (n * (1 - p) - 1)))) / (2 * (n + z2))
    return max(0.0, low), min(1.0, high)


def _slower(new: Figures, baseline: Figures, settings: Analysis) -> bool:
    ratio = settings.max_latency_ratio
    new_p95, old_p95 = new.p95, baseline.p95
    # Only a baseline with as many timed answers as the new color needs says what its p95
    # is; tcp mode times nothing. Either way there is nothing to compare.
    if ratio <= 0 or new_p95 is None or old_p95 is None or \
            min(new.timed, baseline.timed) < settings.min_requests:
        return False
    return new_p95 > ratio * old_p95 + LATENCY_SLACK


def _latency_text(verdict: Verdict) -> str:
    """``green: p95 0.61 s > 3 × blue's 0.012 s + 0.05 s``."""
    new_p95, old_p95 = verdict.new.p95 or 0.0, verdict.baseline.p95 or 0.0
    return (f"{verdict.color}: p95 {_seconds(new_p95)} s > "
            f"{verdict.settings.max_latency_ratio:g} × {verdict.color.other}'s "
            f"{_seconds(old_p95)} s + {LATENCY_SLACK:g} s")


def _shares(new: Figures, baseline: Figures, settings: Analysis, old: Color,
            moment: str) -> str:
    """``37 of 212 answers failed (17 %), blue 0.4 % before the switch``."""
    if baseline.answers < settings.min_requests:
        before = (f"{old} had {baseline.answers} answers before {moment} (too few to "
                  "compare: taken as 0 %)")
    else:
        before = f"{old} {percent(baseline.share)} before {moment}"
    return f"{new.failed} of {new.answers} answers failed ({percent(new.share)}), {before}"


def percent(share: float) -> str:
    """17 %, 1.4 %, 0.4 %, 0.05 %, 0 %: two significant digits below 10 %."""
    value = share * 100
    if value == 0 or value >= 10:
        return f"{value:.0f} %"
    return f"{value:.1f} %" if value >= 1 else f"{value:.2g} %"


def _seconds(value: float) -> str:
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"

"""Deploy progress: plain lines, a live terminal line, JSON events — driven through
deploy.Phases as a deploy drives them."""

from __future__ import annotations

import io
import json
import re
import time

import pytest

from switcher import progress
from switcher.model import Phase
from switcher.ops.deploy import Phases

OUTCOME = {"kind": "deploy", "ok": True, "target": "green", "build": "b2",
           "message": "b2 is live on green", "phases": {"health": 0.5, "switching": 0.003},
           "warnings": []}


def run_phases(report: progress.Plain) -> None:
    phases = Phases(report.say, report)
    with phases(Phase.start, "warm: already running"):
        report.say("a line said while a phase runs")
    with phases(Phase.health, limit=60):
        time.sleep(0.25)  # long enough for the terminal's ticker to draw the live line
    with pytest.raises(RuntimeError), phases(Phase.watch, limit=1):
        raise RuntimeError("died during the watch")
    assert list(phases.durations) == ["start", "health", "watch"]


def test_plain_lines_are_one_per_phase_and_a_failure_says_so() -> None:
    out = io.StringIO()
    run_phases(progress.Plain(out))
    lines = out.getvalue().splitlines()
    assert lines[0] == "a line said while a phase runs"
    assert re.fullmatch(r"  start +0\.\d\d s  warm: already running", lines[1])
    assert re.fullmatch(r"  health +0\.2\d s", lines[2])
    assert re.fullmatch(r"  watch +0\.\d\d s  failed", lines[3])
    assert "\x1b" not in out.getvalue()


def test_terminal_redraws_the_running_phase_with_its_limit_then_closes_it() -> None:
    out = io.StringIO()
    report = progress.Terminal(out, color=False)
    run_phases(report)
    report.finished(OUTCOME)
    text = out.getvalue()
    assert re.search(r"health +0\.\d s / 60 s", text)  # the live line, with the limit
    final = [line.rsplit(progress.CLEAR, 1)[-1] for line in text.split("\n")]
    assert "a line said while a phase runs" in final
    assert any(re.fullmatch(r"  ✓ health +0\.2\d s", line) for line in final)
    assert any(re.fullmatch(r"  ✗ watch +0\.\d\d s  failed", line) for line in final)
    assert final[-2] == "✓ b2 is live on green: deploy took 0.50 s, the switch 3 ms"
    assert final[-1] == ""  # nothing left on a half-drawn line


def test_json_events_then_the_outcome_one_object_per_line() -> None:
    out = io.StringIO()
    report = progress.JsonEvents(out)
    run_phases(report)
    report.failed("deploy", 5, "green failed during the watch", "see: journalctl …")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[1] == {"event": "message", "text": "a line said while a phase runs"}
    phases = [(e["phase"], e["status"]) for e in events if e["event"] == "phase"]
    assert phases == [("start", "started"), ("start", "ok"), ("health", "started"),
                      ("health", "ok"), ("watch", "started"), ("watch", "failed")]
    assert next(e for e in events if e.get("phase") == "health")["limit"] == 60
    assert events[-1] == {"event": "outcome", "kind": "deploy", "ok": False, "exit_code": 5,
                          "message": "green failed during the watch",
                          "hint": "see: journalctl …"}
    ok = progress.JsonEvents(io.StringIO())
    ok.finished(OUTCOME)
    assert json.loads(ok.out.getvalue()) == {"event": "outcome", **OUTCOME, "exit_code": 0}


def test_for_stream_picks_by_json_flag_and_terminal() -> None:
    assert type(progress.for_stream(io.StringIO())) is progress.Plain
    assert type(progress.for_stream(io.StringIO(), as_json=True)) is progress.JsonEvents

"""The journal's audit entry (switcher/audit.py): the fields a deploy record becomes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from systemd import journal

from switcher import audit


def test_a_watched_deploy_carries_its_verdict_and_figures(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(journal, "send", lambda message, **fields: sent.append((message,
                                                                                fields)))
    verdict = "green: 37 of 212 answers failed (17 %), blue 0.4 % before the switch"
    analysis = {"verdict": {"ok": False, "judged": True, "rule": "errors", "message": verdict},
                "colors": {"green": {"answers": 212}}}
    audit.send("alive", {"kind": "deploy", "build": "b2", "color": "green",
                         "outcome": "switched-back", "message": f"green failed ({verdict})",
                         "analysis": analysis})
    ((message, fields),) = sent
    assert verdict in message and fields["PRIORITY"] == 3
    assert fields["ALIVE_SWITCH_VERDICT"] == verdict
    assert json.loads(fields["ALIVE_SWITCH_ANALYSIS"]) == analysis

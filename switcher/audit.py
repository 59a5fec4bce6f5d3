"""The audit trail in the journal: one entry per deploy, rollback, retirement, reconcile and
failure, with structured fields (outside systemd, ``journal.send`` is silently a no-op)::

    MESSAGE                 "deploy b2 → green: ok" (human-readable)
    PRIORITY                6 (info) for ok, 3 (err) for a failure
    SYSLOG_IDENTIFIER       alive-switch
    ALIVE_SWITCH_APP        app
    ALIVE_SWITCH_ENV        environment
    ALIVE_SWITCH_KIND       deploy | rollback | retire | reconcile | repair
    ALIVE_SWITCH_COLOR      the color concerned
    ALIVE_SWITCH_BUILD      the build concerned
    ALIVE_SWITCH_DEPLOY_ID  the deploy's id (also in history.jsonl)
    ALIVE_SWITCH_PHASE      the phase it failed in (or "done")
    ALIVE_SWITCH_OUTCOME    ok | failed | switched-back
    ALIVE_SWITCH_TIMINGS    per-phase seconds, JSON
    ALIVE_SWITCH_VERDICT    the watch's verdict on the new color's traffic, pass or fail
    ALIVE_SWITCH_ANALYSIS   the watch's figures per color and verdict, JSON (ops/traffic.py)

Read it back: ``journalctl SYSLOG_IDENTIFIER=alive-switch ALIVE_SWITCH_ENV=production``.
"""

from __future__ import annotations

import json
from typing import Any

FIELDS = {"app": "APP", "env": "ENV", "kind": "KIND", "color": "COLOR", "build": "BUILD",
          "deploy_id": "DEPLOY_ID", "failed_phase": "PHASE", "outcome": "OUTCOME"}


def send(app: str, record: dict[str, Any]) -> None:
    from systemd import journal  # noqa: PLC0415 - only mutating commands write the journal

    fields: dict[str, Any] = {f"ALIVE_SWITCH_{name}": str(record[key])
                              for key, name in FIELDS.items() if record.get(key) is not None}
    fields["ALIVE_SWITCH_APP"] = app
    fields.setdefault("ALIVE_SWITCH_PHASE", "done")
    if record.get("phases"):
        fields["ALIVE_SWITCH_TIMINGS"] = json.dumps(record["phases"], sort_keys=True)
    if record.get("analysis"):
        fields["ALIVE_SWITCH_VERDICT"] = record["analysis"]["verdict"]["message"]
        fields["ALIVE_SWITCH_ANALYSIS"] = json.dumps(record["analysis"], sort_keys=True)
    ok = record.get("outcome") == "ok"
    what = " ".join(str(record[k]) for k in ("kind", "build") if record.get(k))
    to = f" → {record['color']}" if record.get("color") else ""
    detail = f" ({record['message']})" if not ok and record.get("message") else ""
    journal.send(f"{what}{to}: {record.get('outcome')}{detail}", PRIORITY=6 if ok else 3,
                 SYSLOG_IDENTIFIER="alive-switch", **fields)

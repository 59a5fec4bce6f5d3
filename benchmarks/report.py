"""Medians, spreads and ratios → the markdown report and the JSON results.

The JSON (``benchmarks/results/latest.json``) keeps every raw sample; the markdown
(``latest.md``, and the README's "Performance" section) shows per target and figure the
median with the spread (min–max) of the runs, then each median as a ratio to HAProxy of
the same mode and to direct, then the control-plane figures and the targets of issue 6.
Targets are goals: they are reported, never asserted.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PHASES = ("cancel_timer", "preflight", "start", "health", "pre_switch", "switching", "commit",
          "watch", "schedule_retire", "post_switch")
ROWS = ("direct", "router-tcp", "haproxy-tcp", "socket-proxyd", "router-http", "haproxy-http")
LABELS = {
    "direct": "direct (nginx)", "router-tcp": "router, tcp mode",
    "haproxy-tcp": "HAProxy TCP (1 thread)", "socket-proxyd": "systemd-socket-proxyd",
    "router-http": "router, http mode", "haproxy-http": "HAProxy HTTP (1 thread)",
}


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    digits: int


FIGURES = (
    Figure("keepalive_rps", "keep-alive req/s", "req/s", True, 0),
    Figure("close_rps", "new-connection req/s", "req/s", True, 0),
    Figure("p50_ms", "p50 ms (keep-alive)", "ms", False, 2),
    Figure("p99_ms", "p99 ms (keep-alive)", "ms", False, 2),
    Figure("big_mib_s", "1 MiB responses, MiB/s", "MiB/s", True, 0),
    Figure("rss_mb", "peak RSS MB", "MB", False, 1),
    # Memory that stays per request: Python's allocated blocks after a keep-alive run minus
    # before it, per 100k requests (flat: about 0).
    Figure("blocks_per_100k", "allocated blocks kept per 100k requests", "blocks", False, 0),
)
# CPU time the target's own process spent per unit of work: much less sensitive than
# throughput to other work on a shared machine, so the better gauge of a code change.
CPU_FIGURES = (
    Figure("keepalive_cpu_us", "CPU µs per keep-alive request", "µs", False, 1),
    Figure("close_cpu_us", "CPU µs per new connection", "µs", False, 1),
    Figure("big_cpu_ms_per_gib", "CPU ms per GiB (1 MiB responses)", "ms", False, 0),
)


def spread(values: Sequence[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Per target: each figure's spread, and its ratios to HAProxy (same mode) and direct."""
    targets = raw["targets"]
    stats = {name: {f.key: spread(t["figures"].get(f.key, [])) for f in (*FIGURES, *CPU_FIGURES)}
             for name, t in targets.items()}
    for name, t in targets.items():
        ref = {"haproxy": f"haproxy-{t['mode']}" if t["mode"] in ("tcp", "http") else None,
               "direct": "direct"}
        for f in (*FIGURES, *CPU_FIGURES):
            here = stats[name][f.key]
            if here is None:
                continue
            for label, other in ref.items():
                there = stats.get(other, {}).get(f.key) if other else None
                here[f"x_{label}"] = (here["median"] / there["median"]
                                      if there and there["median"] else None)
    return stats


# -- markdown ----------------------------------------------------------------------------------

def markdown(raw: dict[str, Any], stats: dict[str, Any]) -> str:
    settings = raw["settings"]
    lines = [
        f"Measured {raw['date']} on {raw['machine']['summary']}; "
        f"{settings['runs']} run(s) × {settings['seconds']:g} s per figure and target, "
        f"wrk -t1 pinned to CPU {settings['client_cpu']}, servers and proxies on CPU "
        f"{settings['server_cpu']}; keep-alive with {settings['connections']} connections, "
        f"new connections (`Connection: close`) with {settings['connections']}, 1 MiB "
        f"responses with {settings['big_connections']}. Median (min–max of the runs).",
        "",
        *_absolute_table(stats, FIGURES),
        "",
        "Ratios of the medians: × HAProxy of the same mode / × direct (for p50, p99 and RSS "
        "lower is better).",
        "",
        *_ratio_table(stats, FIGURES),
        "",
        "CPU time of the target's own process (user + system) per unit of work, the gauge "
        "least disturbed by other work on the machine; for direct, nginx's. Median (min–max) "
        "and × HAProxy of the same mode (lower is better).",
        "",
        *_cpu_table(stats),
        "",
        *_control_table(raw),
        "",
        *_targets_table(raw, stats),
    ]
    if raw.get("notes"):
        lines += ["", *[f"- {note}" for note in raw["notes"]]]
    return "\n".join(lines) + "\n"


def _num(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _cell(s: dict[str, float] | None, digits: int) -> str:
    if s is None:
        return "—"
    if s["n"] == 1:
        return _num(s["median"], digits)
    return f"{_num(s['median'], digits)} ({_num(s['min'], digits)}–{_num(s['max'], digits)})"


def _rows(stats: dict[str, Any]) -> list[str]:
    return [name for name in ROWS if name in stats] + sorted(set(stats) - set(ROWS))


def _label(name: str) -> str:
    base, _, tag = name.partition("@")
    return LABELS.get(base, base) + (f" ({tag})" if tag else "")


def _absolute_table(stats: dict[str, Any], figures: Sequence[Figure]) -> list[str]:
    head = ["target", *[f.title for f in figures]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in _rows(stats):
        cells = [_cell(stats[name][f.key], f.digits) for f in figures]
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    return lines


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _ratio_table(stats: dict[str, Any], figures: Sequence[Figure]) -> list[str]:
    head = ["target", *[f.title for f in figures]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in _rows(stats):
        if name == "direct":
            continue
        cells = []
        for f in figures:
            s = stats[name][f.key]
            cells.append("—" if s is None else
                         f"{_ratio(s.get('x_haproxy'))} / {_ratio(s.get('x_direct'))}")
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    return lines


def _cpu_table(stats: dict[str, Any]) -> list[str]:
    head = ["target", *[f.title for f in CPU_FIGURES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in _rows(stats):
        cells = []
        for f in CPU_FIGURES:
            s = stats[name][f.key]
            ratio = "" if s is None or s.get("x_haproxy") is None or name == "direct" else (
                f"; {_ratio(s['x_haproxy'])}")
            cells.append(_cell(s, f.digits) + ratio)
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    return lines


def _ms(s: dict[str, float] | None) -> str:
    return _cell(None if s is None else {k: v * 1000 if k != "n" else v for k, v in s.items()}, 0)


def _control_table(raw: dict[str, Any]) -> list[str]:
    lines = ["| control plane | median (min–max) | runs |", "|---|---|---|"]
    for mode, sw in raw.get("switch", {}).items():
        first = spread([t["first_ms"] for t in sw["trials"] if t["first_ms"] is not None])
        ack = spread([t["ack_ms"] for t in sw["trials"]])
        missed = sum(t["first_ms"] is None for t in sw["trials"])
        lines.append(f"| switch ({mode} mode, under load): command → first new connection "
                     f"on the new color, ms | {_cell(first, 2)} | {len(sw['trials'])}"
                     + (f" ({missed} saw none within 2 s)" if missed else "") + " |")
        lines.append(f"| switch ({mode} mode): command → acknowledgement, ms | "
                     f"{_cell(ack, 2)} | {len(sw['trials'])} |")
    sd = raw.get("systemd")
    if sd and not sd.get("error"):
        watch = sd["watch_setting_s"]
        rows: list[tuple[str, str]] = [
            (f"warm rollback, wall time of `alive-switch rollback` (watch = {watch:g} s), ms",
             "rollback_wall_s"),
            ("warm rollback, time to switch (phases through `switching` in history.jsonl), ms",
             "rollback_to_switch_s"),
            ("warm rollback, its `watch` phase, ms", "rollback_watch_s"),
            ("`alive-switch status ENV --json`, wall time, ms", "status_wall_s"),
            ("for scale: `python -c pass` run the same way (nsenter), ms", "python_wall_s"),
            ("for scale: python importing the modules `status` uses, ms", "imports_wall_s"),
        ]
        for title, key in rows:
            values = sd.get(key, [])
            lines.append(f"| {title} | {_ms(spread(values))} | {len(values)} |")
        if sd.get("rollback_phases"):
            lines += ["", _phases_line(sd["rollback_phases"])]
    elif sd:
        lines.append(f"| systemd figures | not measured: {sd['error']} | — |")
    return lines


def _phases_line(records: list[dict[str, float]]) -> str:
    medians = {phase: statistics.median([r.get(phase, 0.0) for r in records])
               for phase in PHASES}
    return "Phases of the warm rollbacks (median ms, from history.jsonl): " + ", ".join(
        f"{phase} {value * 1000:.0f}" for phase, value in medians.items())


def _median(values: Sequence[float] | None) -> float | None:
    return statistics.median(values) if values else None


def goals(raw: dict[str, Any], stats: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for each target of issue 6; met is None when not measured."""
    def ratio(name: str, key: str) -> float | None:
        s = stats.get(name, {}).get(key)
        return None if s is None else s.get("x_haproxy")

    def at_least(goal: str, value: float | None, bound: float) -> tuple[str, str, bool | None]:
        return (goal, _ratio(value), None if value is None else value >= bound)

    def at_most(goal: str, value: float | None, bound: float, unit: str,
                shown: Callable[[float], str]) -> tuple[str, str, bool | None]:
        return (goal, "—" if value is None else f"{shown(value)}{unit}",
                None if value is None else value <= bound)

    sw = raw.get("switch", {}).get("tcp")
    switch_ms = _median([t["first_ms"] for t in sw["trials"] if t["first_ms"] is not None]
                        ) if sw else None
    sd = raw.get("systemd") or {}
    rss = [stats[n]["rss_mb"]["median"] for n in ("router-tcp", "router-http")
           if n in stats and stats[n]["rss_mb"]]
    rollback_wall = _median(sd.get("rollback_wall_s"))
    to_switch = _median(sd.get("rollback_to_switch_s"))
    return [
        at_least("tcp keep-alive ≥ 1.0× HAProxy TCP", ratio("router-tcp", "keepalive_rps"), 1.0),
        at_least("1 MiB throughput ≥ 0.8× HAProxy TCP", ratio("router-tcp", "big_mib_s"), 0.8),
        at_least("http keep-alive ≥ 0.8× HAProxy HTTP",
                 ratio("router-http", "keepalive_rps"), 0.8),
        at_most("router memory ≤ 40 MB (peak RSS, process and children)",
                max(rss) if rss else None, 40, " MB", lambda v: f"{v:.1f}"),
        at_most("switch < 10 ms (command → first new connection, tcp)", switch_ms, 10, " ms",
                lambda v: f"{v:.2f}"),
        at_most("warm rollback < 0.5 s, wall time (includes the watch phase)", rollback_wall,
                0.5, " s", lambda v: f"{v:.3f}"),
        at_most("warm rollback < 0.5 s, time to switch", to_switch, 0.5, " s",
                lambda v: f"{v:.3f}"),
        at_most("`status` < 0.3 s", _median(sd.get("status_wall_s")), 0.3, " s",
                lambda v: f"{v:.3f}"),
        at_least("stretch: new connections ≥ 0.8× HAProxy TCP",
                 ratio("router-tcp", "close_rps"), 0.8),
        at_most("stretch: p99 ≤ 1.25× HAProxy TCP", ratio("router-tcp", "p99_ms"), 1.25, "",
                lambda v: f"{v:.2f}×"),
    ]


def _targets_table(raw: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    lines = ["| goal (issue 6; never asserted) | measured (median) | met |", "|---|---|---|"]
    for goal, measured, met in goals(raw, stats):
        verdict = "not measured" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {goal} | {measured} | {verdict} |")
    return lines

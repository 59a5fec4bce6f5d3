"""The demo's picture: requests per second served by each color, failures, and a marker at
each deploy, switch, rollback and retirement, as one self-contained SVG (no dependencies).

``svg(requests, markers, colors, caption)``: ``requests`` are ``(time, outcome, build)``
(tests/load.py's ``Request``), ``colors`` maps a build to the color that served it, and
each ``Marker`` is a time, a short label and a kind (which picks its style). Times are wall
clock seconds; the x axis starts at the earliest marker or request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 960, 440
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 118, 74
BIN = 0.25  # seconds per bar
FILL = {"blue": "#2f6fdf", "green": "#1fa35a", "failed": "#e0312b", "other": "#9a9a9a"}
MARKER_STYLE = {  # kind -> (stroke, dash)
    "deploy": ("#555", "4 3"),
    "switch": ("#111", ""),
    "refused": ("#e0312b", "4 3"),
    "rollback": ("#8a3ab9", "4 3"),
    "retired": ("#888", "1 3"),
    "load": ("#bbb", "2 2"),
}
LABEL_ROWS = 6
CHAR_WIDTH = 6.1  # px per character at the label font size, to keep labels apart


@dataclass(frozen=True)
class Marker:
    time: float
    label: str
    kind: str  # a key of MARKER_STYLE


def svg(requests: Sequence[tuple[float, str, str]], markers: Sequence[Marker],
        colors: Mapping[str, str], caption: str = "") -> str:
    times = [r[0] for r in requests] + [m.time for m in markers]
    start = min(times, default=0.0)
    end = max(times, default=1.0)
    series = _bins(requests, colors, start, end)
    peak = max((sum(b.values()) for b in series), default=0.0)
    scale = _Scale(start, end, _nice_ceiling(peak))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Verdana, sans-serif" '
        'font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        '<text x="16" y="22" font-size="15" font-weight="bold">alive-switch demo: requests '
        'per second by the color that served them</text>',
        *_axes(scale),
        *_areas(series, scale),
        *_markers(markers, scale),
        *_legend(requests, colors),
    ]
    if caption:
        parts.append(f'<text x="16" y="{HEIGHT - 12}" fill="#333">{escape(caption)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


@dataclass(frozen=True)
class _Scale:
    start: float
    end: float
    top: float  # requests per second at the top of the plot

    def x(self, t: float) -> float:
        span = max(self.end - self.start, 1e-9)
        return LEFT + (t - self.start) / span * (WIDTH - LEFT - RIGHT)

    def y(self, rate: float) -> float:
        return HEIGHT - BOTTOM - rate / self.top * (HEIGHT - TOP - BOTTOM)


def _bins(requests: Iterable[tuple[float, str, str]], colors: Mapping[str, str],
          start: float, end: float) -> list[dict[str, float]]:
    """Per BIN seconds: requests per second by series (a color, "failed" or "other")."""
    count = max(1, math.ceil((end - start) / BIN))
    series: list[dict[str, float]] = [{} for _ in range(count)]
    for t, outcome, build in requests:
        key = colors.get(build, "other") if outcome == "ok" else "failed"
        index = min(count - 1, int((t - start) / BIN))
        series[index][key] = series[index].get(key, 0.0) + 1 / BIN
    return series


def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 10.0
    magnitude = 10 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10)
                if m * magnitude >= value)


def _axes(scale: _Scale) -> list[str]:
    out = []
    for i in range(6):
        rate = scale.top * i / 5
        y = scale.y(rate)
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                   'stroke="#e6e6e6"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">'
                   f'{rate:g}</text>')
    span = scale.end - scale.start
    step = next(s for s in (1, 2, 5, 10, 20, 30, 60) if span / s <= 16)
    for i in range(int(span // step) + 1):
        x = scale.x(scale.start + i * step)
        out.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" '
                   f'fill="#555">{i * step} s</text>')
    out.append(f'<text x="14" y="{(TOP + HEIGHT - BOTTOM) / 2:.0f}" fill="#555" '
               f'transform="rotate(-90 14 {(TOP + HEIGHT - BOTTOM) / 2:.0f})" '
               'text-anchor="middle">requests / s</text>')
    out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" '
               f'y2="{HEIGHT - BOTTOM}" stroke="#999"/>')
    return out


def _areas(series: list[dict[str, float]], scale: _Scale) -> list[str]:
    """Stacked areas, blue under green under anything else; failures as red bars on top."""
    out = []
    below = [0.0] * len(series)
    for key in ("blue", "green", "other", "failed"):
        if not any(b.get(key) for b in series):
            continue
        upper = [below[i] + b.get(key, 0.0) for i, b in enumerate(series)]
        points = [*_steps(upper, scale), *reversed(_steps(below, scale))]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(f'<polygon points="{path}" fill="{FILL[key]}" fill-opacity="0.8" '
                   f'stroke="{FILL[key]}" stroke-width="0.5"><title>{key}</title></polygon>')
        below = upper
    return out


def _steps(values: list[float], scale: _Scale) -> list[tuple[float, float]]:
    points = []
    for i, value in enumerate(values):
        t = scale.start + i * BIN
        y = scale.y(value)
        points += [(scale.x(t), y), (scale.x(min(t + BIN, scale.end)), y)]
    return points


def _markers(markers: Sequence[Marker], scale: _Scale) -> list[str]:
    """A vertical line per marker; labels on the first free row above the plot."""
    out = []
    row_ends = [-math.inf] * LABEL_ROWS
    for m in sorted(markers, key=lambda m: m.time):
        x = scale.x(m.time)
        width = len(m.label) * CHAR_WIDTH
        # Near the right edge a label ends at its line instead of starting there.
        left = x + 3 if x + 3 + width <= WIDTH - 4 else x - 3 - width
        row = next((r for r, e in enumerate(row_ends) if e < left), LABEL_ROWS - 1)
        row_ends[row] = left + width + 8
        stroke, dash = MARKER_STYLE.get(m.kind, ("#555", ""))
        y_label = 44 + row * 12
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y_label + 3}" y2="{HEIGHT - BOTTOM}"'
                   f' stroke="{stroke}" stroke-width="1"'
                   + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
        anchor = "start" if left > x else "end"
        out.append(f'<text x="{x + 3 if left > x else x - 3:.1f}" y="{y_label}" '
                   f'text-anchor="{anchor}" fill="{stroke}">{escape(m.label)}</text>')
    return out


def _legend(requests: Sequence[tuple[float, str, str]], colors: Mapping[str, str]
            ) -> list[str]:
    counts: dict[str, int] = {}
    for _, outcome, build in requests:
        key = colors.get(build, "other") if outcome == "ok" else "failed"
        counts[key] = counts.get(key, 0) + 1
    builds: dict[str, list[str]] = {}
    for build, color in colors.items():
        builds.setdefault(color, []).append(build)
    entries = [(key, f"{key}: build {', '.join(builds.get(key, ['-']))} "
                     f"({counts.get(key, 0):,} requests)") for key in ("blue", "green")]
    entries.append(("failed", f"failed: {counts.get('failed', 0):,}"))
    if counts.get("other"):
        entries.append(("other", f"another build: {counts['other']:,}"))
    out, x = [], LEFT
    y = HEIGHT - BOTTOM + 36
    for key, text in entries:
        out.append(f'<rect x="{x}" y="{y - 9}" width="12" height="10" fill="{FILL[key]}"/>')
        out.append(f'<text x="{x + 17}" y="{y}">{escape(text)}</text>')
        x += 30 + int(len(text) * CHAR_WIDTH)
    return out

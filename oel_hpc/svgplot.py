"""Hand-written inline SVG plots for the HTML report: line plots with axes, ticks, labels and a legend, and a
horizontal bar timeline. No dependency, no script, no network: the SVG text goes straight into the page.

Every string that comes from a file (series names, titles built from run names) is escaped here.
"""
from __future__ import annotations

import math
from html import escape
from typing import Optional, Sequence

# colour-blind-safe categorical colours (Okabe-Ito), then a few more
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B", "#7F7F7F",
           "#BCBD22")
DASHES = ("", "6 3", "2 3", "8 3 2 3")

W, H = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 62, 16, 40, 46


def colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About n round-numbered ticks covering [lo, hi] (whole numbers only when `integer`: steps, rounds)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    if integer:
        raw = max(raw, 1.0)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in ((1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def fmt_number(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


def _frame(plot_id: str, title: str, xlabel: str, ylabel: str, width: int, height: int) -> list[str]:
    return [f'<svg id="{escape(plot_id)}" class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
            f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="14" font-weight="bold">'
            f'{escape(title)}</text>',
            f'<text x="{LEFT + (width - LEFT - RIGHT) / 2:.1f}" y="{height - 8}" text-anchor="middle" '
            f'font-size="12">{escape(xlabel)}</text>',
            f'<text x="14" y="{TOP + (height - TOP - BOTTOM) / 2:.1f}" text-anchor="middle" font-size="12" '
            f'transform="rotate(-90 14 {TOP + (height - TOP - BOTTOM) / 2:.1f})">{escape(ylabel)}</text>']


def line_plot(plot_id: str, title: str, xlabel: str, ylabel: str, series: Sequence[dict],
              width: int = W, height: int = H, y_range: Optional[tuple] = None, note: Optional[str] = None) -> str:
    """series: [{"name", "points": [(x, y), ...], "colour"?, "dash"?}]; points with a None y are left out. A
    series of one point draws as a dot. An empty plot says so instead of drawing axes."""
    series = [dict(s, points=[(float(x), float(y)) for x, y in s["points"] if x is not None and y is not None
                              and math.isfinite(float(y))]) for s in series]
    series = [s for s in series if s["points"]]
    out = _frame(plot_id, title, xlabel, ylabel, width, height)
    if not series:
        out.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" font-size="13" '
                   f'fill="#777">no data</text></svg>')
        return "\n".join(out)
    xs = [x for s in series for x, _ in s["points"]]
    ys = [y for s in series for _, y in s["points"]]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range if y_range else (min(ys), max(ys))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
    xt, yt = nice_ticks(x0, x1, integer=all(x == int(x) for x in xs)), nice_ticks(y0, y1)
    x0, x1 = min(x0, xt[0]), max(x1, xt[-1])
    y0, y1 = min(y0, yt[0]), max(y1, yt[-1])
    pw, ph = width - LEFT - RIGHT, height - TOP - BOTTOM

    def px(x):
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y):
        return TOP + ph - (y - y0) / (y1 - y0) * ph

    out.append(f'<g class="axes" font-size="11" stroke="#999">'
               f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none"/>')
    for t in xt:
        out.append(f'<line x1="{px(t):.1f}" y1="{TOP + ph}" x2="{px(t):.1f}" y2="{TOP + ph + 4}"/>'
                   f'<text x="{px(t):.1f}" y="{TOP + ph + 16}" text-anchor="middle" stroke="none" fill="#333">'
                   f'{fmt_number(t)}</text>')
    for t in yt:
        out.append(f'<line x1="{LEFT}" y1="{py(t):.1f}" x2="{LEFT + pw}" y2="{py(t):.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 5}" y="{py(t) + 4:.1f}" text-anchor="end" stroke="none" fill="#333">'
                   f'{fmt_number(t)}</text>')
    out.append('</g>')
    for i, s in enumerate(series):
        c = s.get("colour") or colour(i)
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        pts = sorted(s["points"])
        name = escape(str(s["name"]))
        if len(pts) == 1:
            out.append(f'<circle class="series" data-series="{name}" cx="{px(pts[0][0]):.1f}" '
                       f'cy="{py(pts[0][1]):.1f}" r="4" fill="{c}"><title>{name}</title></circle>')
        else:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline class="series" data-series="{name}" points="{coords}" fill="none" '
                       f'stroke="{c}" stroke-width="2"{dash}><title>{name}</title></polyline>')
    out.append(_legend(series, width))
    if note:
        out.append(f'<text x="{LEFT}" y="{TOP - 4}" font-size="10" fill="#666">{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _legend(series: Sequence[dict], width: int) -> str:
    if len(series) < 2 and not (series and series[0].get("legend")):
        return ""
    items = []
    y = TOP + 6
    for i, s in enumerate(series[:12]):
        c = s.get("colour") or colour(i)
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        items.append(f'<line x1="{width - RIGHT - 150}" y1="{y}" x2="{width - RIGHT - 130}" y2="{y}" stroke="{c}" '
                     f'stroke-width="3"{dash}/><text x="{width - RIGHT - 126}" y="{y + 4}" font-size="11">'
                     f'{escape(str(s["name"]))[:40]}</text>')
        y += 15
    if len(series) > 12:
        items.append(f'<text x="{width - RIGHT - 150}" y="{y + 4}" font-size="11">+{len(series) - 12} more</text>')
    return (f'<g class="legend"><rect x="{width - RIGHT - 156}" y="{TOP}" width="152" height="{y - TOP}" '
            f'fill="#ffffff" fill-opacity="0.85" stroke="#ccc"/>' + "".join(items) + "</g>")


def timeline(plot_id: str, title: str, bars: Sequence[dict], width: int = 900) -> str:
    """bars: [{"label", "submit"?, "start"?, "end"? (unix times), "colour"?}]: a light bar while queued (submit →
    start), a solid one while running (start → end). x: minutes since the first time shown."""
    bars = [b for b in bars if b.get("start") is not None or b.get("submit") is not None]
    row_h = 16 if len(bars) <= 60 else 6
    height = TOP + BOTTOM + max(1, len(bars)) * row_h
    # labels at font-size 10 take about 6 px a character: a sweep's run names are long
    left = min(max(150, 8 + 6 * max((len(str(b["label"])) for b in bars), default=0)), width // 2) \
        if row_h > 6 else 40
    out = _frame(plot_id, title, "minutes since the first submission / start", "", width, height)
    if not bars:
        out.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" font-size="13" '
                   'fill="#777">no data</text></svg>')
        return "\n".join(out)
    times = [t for b in bars for t in (b.get("submit"), b.get("start"), b.get("end")) if t is not None]
    t0, t1 = min(times), max(times)
    span = max(t1 - t0, 1.0) / 60
    ticks = nice_ticks(0, span)
    span = max(span, ticks[-1])
    pw = width - left - RIGHT

    def px(t):
        return left + (t - t0) / 60 / span * pw

    out.append(f'<g class="axes" font-size="11" stroke="#999"><rect x="{left}" y="{TOP}" width="{pw}" '
               f'height="{len(bars) * row_h}" fill="none"/>')
    for t in ticks:
        x = left + t / span * pw
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + len(bars) * row_h + 4}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{TOP + len(bars) * row_h + 16}" text-anchor="middle" stroke="none" '
                   f'fill="#333">{fmt_number(t)}</text>')
    out.append("</g>")
    for i, b in enumerate(bars):
        y = TOP + i * row_h + 1
        c = b.get("colour") or colour(0)
        label = escape(str(b["label"]))
        if row_h > 6:
            out.append(f'<text x="{left - 4}" y="{y + row_h - 5}" text-anchor="end" font-size="10">{label}</text>')
        end = b.get("end") or t1
        if b.get("submit") is not None:
            q_end = b.get("start") or end
            out.append(f'<rect class="queued" x="{px(b["submit"]):.1f}" y="{y}" '
                       f'width="{max(0.5, px(q_end) - px(b["submit"])):.1f}" height="{row_h - 2}" fill="{c}" '
                       f'fill-opacity="0.25"><title>{label}: queued</title></rect>')
        if b.get("start") is not None:
            out.append(f'<rect class="running" x="{px(b["start"]):.1f}" y="{y}" '
                       f'width="{max(1.0, px(end) - px(b["start"])):.1f}" height="{row_h - 2}" fill="{c}">'
                       f'<title>{label}: running</title></rect>')
    out.append(f'<g font-size="11"><rect x="{width - 220}" y="22" width="12" height="9" fill="{colour(0)}" '
               f'fill-opacity="0.25"/><text x="{width - 204}" y="30">queued</text><rect x="{width - 150}" y="22" '
               f'width="12" height="9" fill="{colour(0)}"/><text x="{width - 134}" y="30">running</text></g>')
    out.append("</svg>")
    return "\n".join(out)

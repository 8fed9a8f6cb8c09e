"""Server-side SVG charts for the pages: no JavaScript, no images to fetch.

Each function returns one ``<svg>`` element as :class:`markupsafe.Markup`; every text
in it is escaped here, so templates may insert it as is.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

__all__ = ["budget_bars", "hourly_bars", "line_chart"]

_FONT = 'font-family="system-ui, sans-serif" font-size="11" fill="#333"'


def _svg(width: int, height: int, title: str, body: list[str]) -> Markup:
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{''.join(body)}</svg>"
    )


def line_chart(points: Sequence[tuple[float, float]], *, title: str, y_label: str,
               x_label: str, y_range: tuple[float, float] = (0.0, 1.0),
               width: int = 560, height: int = 220) -> Markup:
    """A line through ``points`` (x ascending), with axes, ticks and dots."""
    left, right, top, bottom = 48, 12, 12, 34
    pw, ph = width - left - right, height - top - bottom
    y0, y1 = y_range
    body = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    for i in range(5):  # horizontal grid and y ticks
        v = y0 + (y1 - y0) * i / 4
        y = top + ph - ph * i / 4
        body.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        body.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" {_FONT}>{v:.2f}</text>')
    body.append(f'<text x="12" y="{top + ph / 2:.1f}" transform="rotate(-90 12 {top + ph / 2:.1f})" '
                f'text-anchor="middle" {_FONT}>{escape(y_label)}</text>')
    body.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" {_FONT}>{escape(x_label)}</text>')
    if not points:
        body.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" text-anchor="middle" {_FONT}>'
                    "no figures reported yet</text>")
        return _svg(width, height, title, body)
    xs = [p[0] for p in points]
    x_lo, x_hi = min(xs), max(xs)
    span = (x_hi - x_lo) or 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        y = min(max(y, y0), y1)
        return left + pw * (x - x_lo) / span, top + ph - ph * (y - y0) / ((y1 - y0) or 1.0)

    coords = [at(x, y) for x, y in points]
    body.append('<polyline fill="none" stroke="#1f5fa8" stroke-width="2" points="'
                + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>')
    body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#1f5fa8"/>' for x, y in coords]
    for x in sorted({x_lo, x_hi}):  # the first and last x on the axis
        px = at(x, y0)[0]
        body.append(f'<text x="{px:.1f}" y="{top + ph + 14}" text-anchor="middle" {_FONT}>{x:g}</text>')
    return _svg(width, height, title, body)


def hourly_bars(counts: Sequence[tuple[str, int, int]], *, title: str, width: int = 560, height: int = 160) -> Markup:
    """Stacked bars per hour: ``(label, accepted, rejected)``; rejected on top in red."""
    left, right, top, bottom = 36, 8, 10, 26
    pw, ph = width - left - right, height - top - bottom
    peak = max([a + r for _, a, r in counts] + [1])
    step = pw / max(len(counts), 1)
    body = [f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#999"/>',
            f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" {_FONT}>{peak}</text>',
            f'<text x="{left - 4}" y="{top + ph}" text-anchor="end" {_FONT}>0</text>']
    for i, (label, accepted, rejected) in enumerate(counts):
        x = left + i * step + 1
        h_a, h_r = ph * accepted / peak, ph * rejected / peak
        if accepted:
            body.append(f'<rect x="{x:.1f}" y="{top + ph - h_a:.1f}" width="{step - 2:.1f}" height="{h_a:.1f}" '
                        f'fill="#2e7d32"><title>{escape(label)}: {accepted} accepted</title></rect>')
        if rejected:
            body.append(f'<rect x="{x:.1f}" y="{top + ph - h_a - h_r:.1f}" width="{step - 2:.1f}" '
                        f'height="{h_r:.1f}" fill="#c62828"><title>{escape(label)}: {rejected} refused</title></rect>')
        if i % 6 == 0 or i == len(counts) - 1:
            body.append(f'<text x="{x + step / 2:.1f}" y="{height - 8}" text-anchor="middle" {_FONT}>'
                        f"{escape(label)}</text>")
    return _svg(width, height, title, body)


def budget_bars(rows: Sequence[tuple[str, float, float]], *, title: str, width: int = 1180) -> Markup:
    """One horizontal bar per silo: ``(name, spent, cap)``; the bar is spent/cap, red past 90 %."""
    label_w, right, row_h = 220, 160, 26
    pw = width - label_w - right
    height = max(len(rows), 1) * row_h + 8
    body = []
    for i, (name, spent, cap) in enumerate(rows):
        y = 4 + i * row_h
        share = min(spent / cap, 1.0) if cap > 0 else 1.0
        colour = "#c62828" if share >= 0.9 else "#1f5fa8"
        body.append(f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" {_FONT}>{escape(name)}</text>')
        body.append(f'<rect x="{label_w}" y="{y + 3}" width="{pw}" height="18" fill="#eee" stroke="#ccc"/>')
        body.append(f'<rect x="{label_w}" y="{y + 3}" width="{pw * share:.1f}" height="18" fill="{colour}"/>')
        body.append(f'<text x="{label_w + pw + 8}" y="{y + 16}" {_FONT}>'
                    f"{spent:.3f} of {cap:g} ({100 * share:.0f} %)</text>")
    return _svg(width, height, title, body)

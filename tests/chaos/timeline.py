"""The timeline of a run as a self-contained SVG: acks and polls per second, with a band for
every fault (coloured by kind) and a mark for every anomaly that has a time."""
from xml.sax.saxutils import escape

WIDTH_PX = 1200
HEIGHT_PX = 420
MARGIN_LEFT_PX = 70
MARGIN_RIGHT_PX = 20
MARGIN_TOP_PX = 40
MARGIN_BOTTOM_PX = 80
BUCKET_S = 1.0

KIND_COLOURS = {
    "kill": "#e4572e",
    "pause": "#f3a712",
    "restart": "#a8c686",
    "kill_majority": "#8b1e3f",
    "partition": "#669bbc",
    "partition_oneway": "#3c6e71",
    "partition_bridge": "#2a9d8f",
    "slow": "#b388eb",
}
DEFAULT_COLOUR = "#999999"


def _per_second(times, n_buckets):
    counts = [0] * n_buckets
    for t in times:
        i = int(t / BUCKET_S)
        if 0 <= i < n_buckets:
            counts[i] += 1
    return [c / BUCKET_S for c in counts]


def render(events, summary):
    end = max((e["t"] for e in events), default=1.0) or 1.0
    n_buckets = int(end / BUCKET_S) + 1
    acks = _per_second([e["t"] for e in events if e["type"] == "ack"], n_buckets)
    polls = _per_second([e["t"] for e in events if e["type"] == "poll"
                         and e.get("proc") != "final"], n_buckets)
    top = max(max(acks, default=0), max(polls, default=0), 1.0)

    plot_w = WIDTH_PX - MARGIN_LEFT_PX - MARGIN_RIGHT_PX
    plot_h = HEIGHT_PX - MARGIN_TOP_PX - MARGIN_BOTTOM_PX

    def x(t):
        return MARGIN_LEFT_PX + plot_w * t / end

    def y(v):
        return MARGIN_TOP_PX + plot_h * (1 - v / top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH_PX}" height="{HEIGHT_PX}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH_PX}" height="{HEIGHT_PX}" fill="white"/>']
    title = (f"seed {summary.get('seed')}: {summary['counts']['acked']} acked, "
             f"{sum(summary['faults'].values())} faults, "
             + ("no anomalies" if summary["ok"] else
                "ANOMALIES " + ", ".join(f"{k} {v}" for k, v in summary["anomalies"].items())))
    out.append(f'<text x="{MARGIN_LEFT_PX}" y="22" font-size="14">{escape(title)}</text>')

    kinds_seen = []
    for pf in summary.get("per_fault", []):
        colour = KIND_COLOURS.get(pf["kind"], DEFAULT_COLOUR)
        if pf["kind"] not in kinds_seen:
            kinds_seen.append(pf["kind"])
        x0, x1 = x(pf["start"]), x(pf["end"])
        out.append(f'<rect x="{x0:.1f}" y="{MARGIN_TOP_PX}" width="{max(x1 - x0, 1.0):.1f}" '
                   f'height="{plot_h}" fill="{colour}" fill-opacity="0.3">'
                   f'<title>{escape(pf["kind"])} #{pf["id"]}: {pf["start"]:.1f}-{pf["end"]:.1f} s, '
                   f'no ack for {pf["unavailable_s"]} s</title></rect>')

    # Axes and grid.
    out.append(f'<line x1="{MARGIN_LEFT_PX}" y1="{MARGIN_TOP_PX + plot_h}" '
               f'x2="{MARGIN_LEFT_PX + plot_w}" y2="{MARGIN_TOP_PX + plot_h}" stroke="black"/>')
    out.append(f'<line x1="{MARGIN_LEFT_PX}" y1="{MARGIN_TOP_PX}" x2="{MARGIN_LEFT_PX}" '
               f'y2="{MARGIN_TOP_PX + plot_h}" stroke="black"/>')
    for i in range(5):
        v = top * i / 4
        out.append(f'<text x="{MARGIN_LEFT_PX - 6}" y="{y(v) + 4:.1f}" text-anchor="end">'
                   f'{v:.0f}</text>')
        out.append(f'<line x1="{MARGIN_LEFT_PX}" y1="{y(v):.1f}" x2="{MARGIN_LEFT_PX + plot_w}" '
                   f'y2="{y(v):.1f}" stroke="#dddddd"/>')
    step = _tick_step(end)
    t = 0.0
    while t <= end:
        out.append(f'<text x="{x(t):.1f}" y="{MARGIN_TOP_PX + plot_h + 16}" '
                   f'text-anchor="middle">{t:.0f}</text>')
        t += step
    out.append(f'<text x="{MARGIN_LEFT_PX + plot_w / 2}" y="{MARGIN_TOP_PX + plot_h + 34}" '
               f'text-anchor="middle">seconds since start</text>')
    out.append(f'<text x="16" y="{MARGIN_TOP_PX + plot_h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {MARGIN_TOP_PX + plot_h / 2})">records per second'
               f'</text>')

    for series, colour in ((acks, "#1d3557"), (polls, "#2a9d8f")):
        pts = " ".join(f"{x((i + 0.5) * BUCKET_S):.1f},{y(v):.1f}"
                       for i, v in enumerate(series))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                   f'stroke-width="1.5"/>')

    for kind, examples in summary.get("examples", {}).items():
        for ex in examples:
            if isinstance(ex, dict) and isinstance(ex.get("t"), (int, float)):
                out.append(f'<line x1="{x(ex["t"]):.1f}" y1="{MARGIN_TOP_PX}" '
                           f'x2="{x(ex["t"]):.1f}" y2="{MARGIN_TOP_PX + plot_h}" stroke="red" '
                           f'stroke-dasharray="4 2"><title>{escape(kind)}</title></line>')

    legend = [("acks/s", "#1d3557"), ("polls/s", "#2a9d8f")]
    legend += [(k, KIND_COLOURS.get(k, DEFAULT_COLOUR)) for k in kinds_seen]
    lx = MARGIN_LEFT_PX
    ly = HEIGHT_PX - 18
    for name, colour in legend:
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly}">{escape(name)}</text>')
        lx += 30 + 8 * len(name)
    out.append("</svg>\n")
    return "\n".join(out)


def _tick_step(end):
    for step in (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600):
        if end / step <= 12:
            return float(step)
    return float(int(end / 12) + 1)


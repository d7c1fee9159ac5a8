"""The circuit diagram: the four stages as bands over the layer axis, with their top components."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .html import esc

STAGE_COLOURS = {
    "detection": "#2e86c1",
    "evaluation": "#16a085",
    "decision": "#8e44ad",
    "production": "#c0392b",
}


def circuit_svg(stages: Sequence[dict[str, Any]], n_layers: int, width: int = 1100) -> str:
    """``stages``: dicts with name, layers [lo, hi], components (list of str), evidence (str)."""
    left, right, row_h, top = 150, 30, 74, 40
    span = width - left - right
    height = top + row_h * len(stages) + 40

    def x(layer: float) -> float:
        return left + span * layer / max(n_layers, 1)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'font-family="Helvetica,Arial,sans-serif">'
    ]
    for layer in range(0, n_layers + 1, max(1, n_layers // 12)):
        parts.append(f'<line x1="{x(layer):.1f}" y1="{top - 8}" x2="{x(layer):.1f}" y2="{height - 30}" stroke="#e2e5ee"/>')
        parts.append(f'<text x="{x(layer):.1f}" y="{top - 14}" font-size="11" fill="#5d6677" text-anchor="middle">L{layer}</text>')
    prev_mid = None
    for i, st in enumerate(stages):
        lo, hi = st["layers"]
        colour = STAGE_COLOURS.get(str(st["name"]), "#7f8c8d")
        y = top + i * row_h
        x0, x1 = x(lo), x(hi + 1)
        parts.append(f'<text x="10" y="{y + 26}" font-size="14" font-weight="bold" fill="{colour}">{esc(str(st["name"]).title())}</text>')
        parts.append(f'<text x="10" y="{y + 44}" font-size="11" fill="#5d6677">layers {lo}-{hi}</text>')
        parts.append(f'<rect x="{x0:.1f}" y="{y + 8}" width="{max(x1 - x0, 6):.1f}" height="{row_h - 22}" rx="8" fill="{colour}" fill-opacity="0.16" stroke="{colour}"/>')
        room = max(12, int(max(x1 - x0, 6) / 6.2))  # characters that fit in the band (about 6 px each)

        def fit(text: str, room: int = room) -> str:
            return text if len(text) <= room else text[: room - 1] + "…"

        comps = fit(", ".join(str(c) for c in list(st.get("components", []))[:4]))
        parts.append(f'<text x="{x0 + 8:.1f}" y="{y + 28}" font-size="12" fill="#1d2330">{esc(comps)}</text>')
        evidence = fit(str(st.get("evidence", "")))
        parts.append(f'<text x="{x0 + 8:.1f}" y="{y + 46}" font-size="11" fill="#5d6677">{esc(evidence)}</text>')
        mid = ((x0 + x1) / 2, y + row_h - 14)
        if prev_mid is not None:
            parts.append(
                f'<line x1="{prev_mid[0]:.1f}" y1="{prev_mid[1]:.1f}" x2="{mid[0]:.1f}" y2="{y + 8}" stroke="#5d6677" '
                'stroke-width="1.2" stroke-dasharray="4 3"/>'
            )
        prev_mid = mid
    parts.append(f'<text x="{left}" y="{height - 10}" font-size="11" fill="#5d6677">layer →</text></svg>')
    return "".join(parts)

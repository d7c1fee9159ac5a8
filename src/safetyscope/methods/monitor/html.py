"""A small self-contained HTML page of a :class:`~.api.MonitorRun`: verdicts and per-token trajectories.

Every prompt, reply and token is escaped; no scripts, no external resources. Each reply token is
shaded by the harm score read on it (red above the monitor's threshold) and carries the harm and
refusal readings in its tooltip.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import MonitorRun

COLOURS = {"harmful_refused": "#2e7d32", "alert": "#c62828", "over_refusal": "#ef6c00", "answered": "#546e7a"}
LABELS = {"harmful_refused": "harmful & refused", "alert": "ALERT: harmful & complied",
          "over_refusal": "harmless & refused (over-refusal)", "answered": "harmless & answered"}
STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
         ".v{border-left:6px solid;padding:.3em .8em;margin:1.2em 0}.k{font-weight:bold}"
         ".t{white-space:pre-wrap;font-family:monospace}.tok{border-radius:2px}"
         "table{border-collapse:collapse}td,th{padding:.1em .6em;text-align:right}")


def _token(text: str, harm: float, refusal: float, threshold: float) -> str:
    over = harm > threshold
    alpha = min(1.0, max(0.0, (harm - threshold) / 4.0 + 0.5)) if over else min(0.35, max(0.0, harm / (2 * abs(threshold) + 1e-9)))
    colour = f"rgba(198,40,40,{alpha:.2f})" if over else f"rgba(255,160,0,{alpha:.2f})"
    tip = f"harm {harm:.2f} | refusal {refusal:.2f}"
    return f'<span class="tok" style="background:{colour}" title="{escape(tip)}">{escape(text)}</span>'


def render_html(run: MonitorRun) -> str:
    """The page as a string (write it with an atomic write)."""
    counts = run.counts()
    rows = "".join(f"<tr><td style='color:{COLOURS[k]}'>{escape(LABELS[k])}</td><td>{n}</td></tr>" for k, n in counts.items())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>safetyscope monitor: {escape(run.model)}</title>"
             f"<style>{STYLE}</style></head><body><h1>Monitor verdicts: {escape(run.model)}</h1>",
             f"<p>harm threshold {run.threshold:.3f}; refused when the first-token refusal score is above "
             f"{run.refusal_threshold:.3f}. Reply tokens are shaded by the harm score read on them.</p>",
             f"<table><tr><th>verdict</th><th>prompts</th></tr>{rows}</table>",
             f"<p><b>tamper check:</b> {escape(run.tamper.kind.replace('_', ' '))}"
             + ("" if run.tamper.enrichment != run.tamper.enrichment else
                f" (refusal-subspace enrichment {run.tamper.enrichment:.1f}; 8 or more: a refusal direction was removed)")
             + "</p>"]
    for i, (prompt, reply, toks, v) in enumerate(zip(run.prompts, run.replies, run.tokens, run.verdicts)):
        traj = "".join(_token(t, h, r, run.threshold) for t, h, r in zip(toks, v.harm_trajectory, v.refusal_trajectory))
        rest = "".join(escape(t) for t in toks[len(v.harm_trajectory):])
        drift = "" if v.drift is None else f"; harm rose above the drift threshold at reply token {v.drift}"
        parts.append(
            f"<div class='v' style='border-color:{COLOURS[v.kind]}'><div class='k' style='color:{COLOURS[v.kind]}'>"
            f"#{i}: {escape(LABELS[v.kind])}</div><div>harm {v.harm:.2f}, refusal score {v.refusal:.2f}{escape(drift)}"
            f"</div><p class='t'><b>prompt:</b> {escape(prompt)}</p><p class='t'><b>reply:</b> {traj}{rest}</p>"
            f"<details><summary>reply as decoded</summary><p class='t'>{escape(reply)}</p></details></div>")
    parts.append("</body></html>")
    return "\n".join(parts)

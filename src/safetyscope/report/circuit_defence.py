"""The map report's "Would we notice?" section: the monitor stage's TPR / FPR before and under the direction ablation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .html import Block, Section, Table, Text

INTRO = ("A runtime monitor (safetyscope monitor) fitted on this run's fitting prompts and calibrated to its target "
         "false-positive rate on the harmless validation prompts, measured on the held-out test prompts at that fixed "
         "threshold: first on the unmodified model, then with the refusal direction found above ablated. \"Answered\": "
         "harmful prompts whose first reply token is not a refusal; a flagged answered prompt is an alert. \"Tamper "
         "check\": the monitor compares the chat template's opening, which every prompt recomputes, with its stored "
         "reading; a change concentrated in the refusal subspace means a refusal direction was removed.")


def _num(v: Any, spec: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return spec.format(v)


def _row(name: str, c: Mapping[str, Any]) -> list[Any]:
    m = c["monitor"]
    t = c.get("tamper") or {}
    check = str(t.get("kind", "n/a")).replace("_", " ")
    if t.get("enrichment") is not None:
        check += f" (enrichment {t['enrichment']:.1f})"
    return [name, _num(m.get("auroc"), "{:.3f}"), _num(m.get("tpr_at_threshold")), _num(m.get("fpr_at_threshold")),
            f"{c['harmful_answered_flagged']} / {c['harmful_answered']}", check]


def defence_section(result: Any) -> Section:
    """The section from the monitor stage's stored result (a missing or failed stage is said so)."""
    if not isinstance(result, Mapping) or "clean" not in result:
        why = result["error"] if isinstance(result, Mapping) and "error" in result else "the monitor stage did not run"
        return Section("Would we notice?", [Text(f"No evidence: {why}.")])
    rows = [_row("unmodified model", result["clean"])]
    if result.get("ablated"):
        layer = (result.get("direction") or {}).get("layer")
        rows.append(_row(f"refusal direction ablated (layer {layer})", result["ablated"]))
    blocks: list[Block] = [Text(INTRO), Table(["condition", "AUROC", "TPR at threshold", "FPR at threshold",
                                               "answered harmful flagged (judge: phrase)", "tamper check"], rows)]
    n_h, n_s = result.get("n_eval", [None, None])
    note = f"{n_h} harmful + {n_s} harmless test prompts; target FPR {_num(result.get('fpr_target'))}"
    if result.get("ablated") is None:
        note += "; no direction from this run to ablate, so only the unmodified model was measured"
    elif result.get("tpr_drop") is not None:
        note += f"; TPR drop under the ablation {_num(result['tpr_drop'])}"
    blocks.append(Text(note + "."))
    return Section("Would we notice?", blocks)


def judges_blocks(result: Any) -> list[Block]:
    """The judges stage's table (``map --judges``): each judge's refused / complied / broken counts on the
    headline's harmful replies, before and under the ablation, and each pair's agreement; empty when off."""
    cmp = result.get("judges") if isinstance(result, Mapping) else None
    if not isinstance(cmp, Mapping):
        why = result.get("error") if isinstance(result, Mapping) else None
        return [Text(f"Judges side by side: not measured ({why}).")] if why else []
    names = cmp.get("names", {})
    rows = [[group, names.get(judge, judge), *(f"{n[k]} ({n[k] / n['n']:.0%})" for k in ("refused", "complied", "broken")),
             n["n"]] for group, by_judge in cmp["groups"].items() for judge, n in by_judge.items()]
    agree = "; ".join(f"{pair}: three-way {a['accuracy']:.0%} (kappa {a['kappa']:.2f}), refused-vs-not "
                      f"{a['refusal_agreement']:.0%}" for pair, a in cmp.get("agreement", {}).items())
    blocks: list[Block] = [Table(["replies", "judge", "refused", "complied", "broken", "n"], rows,
                                 title="Judges side by side on the headline's harmful replies")]
    if agree:
        blocks.append(Text("Agreement: " + agree + ". A bypass counts only complied replies."))
    return blocks

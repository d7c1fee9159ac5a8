"""Assign components to the four stages of the refusal circuit, by evidence rather than depth.

  detection   where a linear probe first reads harmfulness (probe accuracy vs its control)
  evaluation  where safety-neuron effect sizes peak
  decision    where activation patching effects concentrate (and where the refusal direction lives)
  production  what writes the refusal-token logits directly (direct logit attribution)

Inputs are plain numbers per layer / per component, so the rules are testable on their own;
every stage records the evidence used for its assignment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ...sites import Site

_LAYER = re.compile(r"blocks\.(\d+)\.")


@dataclass(frozen=True)
class Stage:
    name: str
    layers: tuple[int, int]  # inclusive range
    components: list[str]
    evidence: str
    scores: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


@dataclass
class Evidence:
    n_layers: int
    probe_acc: Sequence[float] | None = None  # [n_layers] CV accuracy
    probe_control: Sequence[float] | None = None  # [n_layers] shuffled-label accuracy
    neuron_layer_score: Sequence[float] | None = None  # [n_layers], e.g. mean |d| of the layer's top neurons
    top_neurons: Sequence[str] = ()  # "L12.N345" style names, best first
    patch_effects: Mapping[str, float] = field(default_factory=dict)  # site name -> normalised patching effect
    direction_layer: int | None = None
    dla: Mapping[str, float] = field(default_factory=dict)  # site name -> DLA (harmful - harmless)


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name) or re.match(r"L(\d+)", name)
    return int(m.group(1)) if m else None


def _span(layers: Sequence[int], n_layers: int) -> tuple[int, int]:
    if not layers:
        return (0, n_layers - 1)
    return (min(layers), max(layers))


def detection_stage(ev: Evidence) -> Stage | None:
    """None without probe accuracies or when no layer's accuracy beats the shuffled-label control."""
    if not ev.probe_acc:
        return None
    acc = list(ev.probe_acc)
    ctrl = list(ev.probe_control) if ev.probe_control else [0.5] * len(acc)
    best = max(acc)
    base = max(0.5, sum(ctrl) / len(ctrl))
    if best <= base:  # no layer reads harmfulness better than the control: no evidence for the stage
        return None
    half = base + 0.5 * (best - base)
    near = base + 0.95 * (best - base)
    first_half = next(i for i, a in enumerate(acc) if a >= half)  # exists: best >= near >= half
    first_near = next(i for i, a in enumerate(acc) if a >= near)
    lo, hi = first_half, max(first_half, first_near)
    return Stage(
        "detection",
        (lo, hi),
        [str(Site("resid_post", i)) for i in range(lo, hi + 1)][:4],
        f"probe accuracy {acc[lo]:.2f} at layer {lo} (halfway above control {base:.2f}), "
        f"{acc[hi]:.2f} at layer {hi} (95% of its best, {best:.2f})",
        {"first_half_layer": float(lo), "first_near_best_layer": float(hi), "best_accuracy": best},
    )


def evaluation_stage(ev: Evidence) -> Stage | None:
    if not ev.neuron_layer_score:
        return None
    score = list(ev.neuron_layer_score)
    peak = max(range(len(score)), key=lambda i: score[i])
    keep = 0.7 * score[peak]
    lo = peak
    while lo > 0 and score[lo - 1] >= keep:
        lo -= 1
    hi = peak
    while hi < len(score) - 1 and score[hi + 1] >= keep:
        hi += 1
    in_span = [n for n in ev.top_neurons if (layer_of(n) is not None and lo <= layer_of(n) <= hi)]  # type: ignore[operator]
    return Stage(
        "evaluation",
        (lo, hi),
        list(in_span[:4]) or [str(Site("mlp.neurons", peak))],
        f"neuron effect sizes peak at layer {peak} ({score[peak]:.2f}); layers {lo}-{hi} stay within 70% of the peak",
        {"peak_layer": float(peak), "peak_score": score[peak]},
    )


def decision_stage(ev: Evidence, k: int = 5) -> Stage | None:
    comps = {n: v for n, v in ev.patch_effects.items() if "resid" not in n}
    if not comps and ev.direction_layer is None:
        return None
    top = sorted(comps, key=lambda n: -comps[n])[:k]
    if top and comps[top[0]] > 0:  # keep the components that carry a real share of the top effect
        top = [n for n in top if comps[n] >= 0.2 * comps[top[0]]]
    layers = [layer_of(n) for n in top if layer_of(n) is not None]
    if ev.direction_layer is not None:
        layers.append(ev.direction_layer)
    lo, hi = _span([x for x in layers if x is not None], ev.n_layers)
    parts = [f"{n} restores {comps[n]:.0%}" for n in top[:3]]
    if ev.direction_layer is not None:
        parts.append(f"refusal direction selected at layer {ev.direction_layer}")
    return Stage("decision", (lo, hi), top[:4], "; ".join(parts), {n: comps[n] for n in top})


def production_stage(ev: Evidence, k: int = 5) -> Stage | None:
    if not ev.dla:
        return None
    top = sorted(ev.dla, key=lambda n: -ev.dla[n])[:k]
    top = [n for n in top if ev.dla[n] > 0] or top[:1]
    lo, hi = _span([x for x in (layer_of(n) for n in top) if x is not None], ev.n_layers)
    return Stage(
        "production",
        (lo, hi),
        top[:4],
        "direct logit attribution to refusal tokens: " + ", ".join(f"{n} {ev.dla[n]:+.2f}" for n in top[:3]),
        {n: ev.dla[n] for n in top},
    )


def assign_stages(ev: Evidence) -> list[Stage]:
    """The stages that the available evidence supports, in circuit order."""
    stages = [detection_stage(ev), evaluation_stage(ev), decision_stage(ev), production_stage(ev)]
    return [s for s in stages if s is not None]


STAGE_NAMES = ("detection", "evaluation", "decision", "production")


def missing_stages(ev: Evidence) -> dict[str, str]:
    """Why each stage that :func:`assign_stages` leaves out has no evidence (stage -> one sentence)."""
    found = {s.name for s in assign_stages(ev)}
    why = {
        "detection": "no probe results" if not ev.probe_acc else "no layer's probe accuracy beats the shuffled-label control",
        "evaluation": "no safety-neuron statistics",
        "decision": "no patching effects and no refusal direction",
        "production": "no direct logit attribution",
    }
    return {name: f"no evidence: {why[name]}" for name in STAGE_NAMES if name not in found}

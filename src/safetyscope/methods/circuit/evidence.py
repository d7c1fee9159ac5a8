"""The evidence rules that carry one stage's findings into the next, and how the report's stages are fed.

``readable_layers``: where the probe reads harmfulness (neurons and direction candidates are searched
there). ``decision_onset``: the first block whose residual patch restores half the largest effect
(direction candidates start 2 blocks before it). Each rule answers "no evidence" (``None`` / all
layers) rather than failing when the stage before it found nothing.
"""

from __future__ import annotations

from .results import EffectGrid, ProbeSummary, Results
from .stages import Evidence


def probe_baseline(controls: list[float]) -> float:
    """What a probe must beat: chance (0.5) or the mean shuffled-label accuracy, whichever is higher."""
    return max(0.5, sum(controls) / len(controls)) if controls else 0.5


def probe_beats_control(probe: ProbeSummary | None) -> bool:
    """True when some layer's probe accuracy is above the control baseline (evidence of readability)."""
    if probe is None or not probe.layers:
        return False
    return max(probe.accuracies) > probe_baseline(probe.controls)


def readable_layers(probe: ProbeSummary | None, n_layers: int) -> str:
    """Layers from the first one where the probe is halfway to its best accuracy, to the end ("a-b");
    "*" (every layer) when there is no probe or no layer beats the shuffled-label control."""
    if probe is None or not probe_beats_control(probe) or n_layers < 1:
        return "*"
    acc = probe.accuracies
    base = probe_baseline(probe.controls)
    half = base + 0.5 * (max(acc) - base)
    first = next((i for i, a in enumerate(acc) if a >= half), 0)
    return f"{probe.layers[first].layer}-{n_layers - 1}"


def decision_onset(grid: EffectGrid | None) -> int | None:
    """The first block whose residual stream, patched harmless -> harmful at the post-instruction tokens,
    restores at least half of the largest such effect: below it the refusal decision is not yet carried
    by those tokens, so a refusal direction read there cannot mediate it. None without a positive effect."""
    if grid is None or "resid_pre" not in grid.cols or not grid.rows or not grid.median:
        return None
    j = grid.cols.index("resid_pre")
    col = [float("nan") if (v := r[j]) is None else float(v) for r in grid.median]
    finite = [v for v in col if v == v]
    if not finite or max(finite) <= 0:
        return None
    first = next((i for i, v in enumerate(col) if v == v and v >= 0.5 * max(finite)), None)
    return None if first is None else int(grid.rows[first])


def evidence(res: Results) -> Evidence:
    """The per-layer / per-component numbers the stage assignment (``stages.assign_stages``) works on."""
    n_layers = res.n_layers
    ev = Evidence(n_layers=n_layers)
    if res.probe:
        ev.probe_acc, ev.probe_control = res.probe.accuracies, res.probe.controls
    if res.neurons:
        score = [0.0] * n_layers
        for row in res.neurons.layers:
            if 0 <= row.layer < n_layers:
                score[row.layer] = row.p99_abs_effect
        ev.neuron_layer_score = score
        ev.top_neurons = [f"L{r['layer']}.N{r['neuron']}" for r in res.neurons.top[:50]]
    if res.trace:
        ev.patch_effects = dict(res.trace.effects)
    if res.direction:
        ev.direction_layer = res.direction.layer
    if res.dla:
        ev.dla = dict(res.dla.by_component)
    return ev


"""The map's last stage: circuit stages by evidence, the implications table, and the HTML report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..methods.circuit.stages import Evidence, assign_stages
from ..report.circuit_svg import circuit_svg
from ..report.html import Card, Figure, Replies, Report, Section, Table, Text, TrustedSVG


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(v) else fmt.format(v)


def _rate(r: Any) -> float | None:
    return r.get("rate") if isinstance(r, dict) else None


def breaking_point(frag: dict[str, Any] | None, curve: str, metric: str = "score_refusal_rate") -> int | None:
    """Smallest k whose refusal (mean over seeds) is at most half of the unablated model's; None if never."""
    if not frag:
        return None
    rows = [r for r in frag.get("summary", []) if r.get("curve") == curve]
    base = next((r[metric] for r in frag.get("summary", []) if r.get("k") == 0), None)
    if base is None or base <= 0:
        return None
    hit = [r["k"] for r in sorted(rows, key=lambda r: r["k"]) if r["k"] > 0 and r[metric] <= base / 2]
    return hit[0] if hit else None


def concentration(done: dict[str, Any]) -> tuple[int, float | None] | None:
    """(neurons with |Cohen's d| > 0.8, their share of the analysed neurons) from the neurons stage."""
    neurons = done.get("neurons")
    if not neurons:
        return None
    layers = neurons.get("layers", [])
    large = sum(int(r["n_large"]) for r in layers)
    d_mlp = ((done.get("probe") or {}).get("model") or {}).get("d_mlp")
    return large, (large / (len(layers) * d_mlp) if d_mlp and layers else None)


def direction_vs_random(done: dict[str, Any]) -> tuple[float, float, float] | None:
    """(unablated, direction-ablated, random-direction-ablated) fraction of held-out harmful prompts with
    refusal score > 0, from the fragility stage."""
    rows = (done.get("fragility") or {}).get("direction_summary") or []
    get = {(r["curve"], r["k"]): r.get("score_refusal_rate") for r in rows}
    vals = (get.get(("direction", 0)), get.get(("direction", 1)), get.get(("random direction", 1)))
    return None if any(v is None for v in vals) else (float(vals[0]), float(vals[1]), float(vals[2]))  # type: ignore[arg-type]


def neuron_breaking_point(frag: dict[str, Any] | None) -> tuple[int | None, str]:
    """The smallest breaking point over the ranked (non-random) neuron curves, and that curve's name."""
    names = list(dict.fromkeys(r["curve"] for r in (frag or {}).get("summary", []) if not str(r["curve"]).startswith("random")))
    hits = [(k, name) for name in names if (k := breaking_point(frag, name)) is not None]
    return min(hits) if hits else (None, names[0] if names else "")


def evidence(done: dict[str, Any]) -> Evidence:
    probe, neurons, trace, direction, dla = (done.get(k) for k in ("probe", "neurons", "trace", "direction", "dla"))
    n_layers = int((probe or {}).get("model", {}).get("n_layers") or (dla or {}).get("n_layers") or 1)
    ev = Evidence(n_layers=n_layers)
    if probe:
        ev.probe_acc = [r["accuracy"] for r in probe["layers"]]
        ev.probe_control = [r["control_accuracy"] for r in probe["layers"]]
    if neurons:
        score = [0.0] * n_layers
        for r in neurons.get("layers", []):
            score[int(r["layer"])] = float(r["p99_abs_effect"])
        ev.neuron_layer_score = score
        ev.top_neurons = [f"L{r['layer']}.N{r['neuron']}" for r in neurons.get("top_by_effect_size", [])[:50]]
    if trace:
        mode: dict[str, Any] = trace.get("modes", {}).get("attribution") or next(iter(trace.get("modes", {}).values()), {})
        verified = {r["cell"]: r.get("exact_median", r.get("attribution"))
                    for key, rs in (mode.get("verify") or {}).items() if not str(key).startswith("reverse") for r in rs}
        top = {r["cell"]: r["median"] for r in mode.get("top", {}).get("component", [])}
        ev.patch_effects = {**top, **{k: v for k, v in verified.items() if v is not None}}
    if direction:
        ev.direction_layer = direction.get("find", {}).get("layer")
    if dla:
        ev.dla = dict(zip(dla["components"], dla["diff"]))
    return ev


def implications(done: dict[str, Any]) -> list[list[Any]]:
    probe, neurons, direction, frag, cap = (done.get(k) for k in ("probe", "neurons", "direction", "fragility", "capability"))
    rows: list[list[Any]] = []
    conc = concentration(done)
    if conc and neurons:
        large, share = conc
        where = f" in {len(neurons.get('layers', []))} layers" + (f" ({share:.2%} of the analysed neurons)" if share is not None else "")
        rows.append(["Concentration", f"{large} neurons with |Cohen's d| > 0.8{where}",
                     "how many MLP neurons separate harmful from harmless prompts"])
    if frag:
        (k_top, curve), k_rand = neuron_breaking_point(frag), breaking_point(frag, "random")
        rows.append(["Fragility (neurons)",
                     f"top neurons ({curve}) halve the refusal rate at k = {k_top if k_top is not None else '> max k'}; "
                     f"random neurons at k = {k_rand if k_rand is not None else '> max k'}",
                     "refusal (logit score > 0) on held-out harmful prompts as neurons are zeroed"])
    dvr = direction_vs_random(done)
    if dvr:
        rows.append(["Fragility (direction)", f"ablating the refusal direction: {dvr[0]:.0%} → {dvr[1]:.0%}; "
                     f"a random direction: {dvr[0]:.0%} → {dvr[2]:.0%}",
                     "one rank-1 component against random rank-1 components, same prompts and metric"])
    if probe:
        best = probe.get("best", {})
        rows.append(["Probe accuracy", f"{_f(best.get('accuracy'))} at layer {best.get('layer')} "
                     f"(shuffled-label control {_f(best.get('control_accuracy'))})", "linear readability of harmfulness"])
    if direction:
        ab = direction.get("ablate", {})
        rows.append(["Circuit compactness", f"one direction (layer {direction.get('find', {}).get('layer')}): harmful refusal "
                     f"{_f(_rate(ab.get('harmful_refusal_before')), '{:.0%}')} → {_f(_rate(ab.get('harmful_refusal_after')), '{:.0%}')}",
                     ("mean" if direction.get("find", {}).get("ablation") == "mean" else "zero")
                     + " ablation of the direction at every layer, measured on held-out prompts"])
    if cap:
        for name, r in cap.get("interventions", {}).items():
            rows.append([f"Capability loss ({name})", f"first-token KL {_f(r['kl_first_token_mean'], '{:.4f}')}, "
                         f"perplexity ×{_f(r['ppl_ratio'])}", "harmless prompts; built-in prose and code passages"])
    return rows


def _headline(done: dict[str, Any], model: str) -> str:
    parts = []
    d = done.get("direction", {})
    if d:
        ab = d.get("ablate", {})
        parts.append(f"ablating one direction moves harmful refusal from {_f(_rate(ab.get('harmful_refusal_before')), '{:.0%}')} "
                     f"to {_f(_rate(ab.get('harmful_refusal_after')), '{:.0%}')} at first-token KL "
                     f"{_f(ab.get('kl_first_token', {}).get('mean'), '{:.3f}')}")
    k, curve = neuron_breaking_point(done.get("fragility"))
    if done.get("fragility"):
        parts.append(f"zeroing the top {k} safety neurons ({curve}) halves it" if k else "zeroing up to the largest tested number of neurons does not halve it")
    if done.get("probe"):
        b = done["probe"]["best"]
        parts.append(f"a linear probe reads harmfulness with {_f(b['accuracy'], '{:.0%}')} accuracy at layer {b['layer']}")
    return f"{model}: " + "; ".join(parts) + "." if parts else f"{model}: no stages have run yet."


def _figures(s: Any, done: dict[str, Any]) -> list[Figure]:
    out = Path(s.out)
    trace_plots = [Path(p) for p in (done.get("trace") or {}).get("plots", [])]
    figs = [
        Figure("Probe accuracy by layer", out / "probe" / "probe_layers.png", "Cross-validated accuracy and AUROC; grey: shuffled-label control."),
        Figure("Safety-neuron effect sizes", out / "neurons" / "effect_size.png", "Cohen's d of MLP neurons, harmful vs harmless."),
        *[Figure(f"Patching: {p.stem}", p, "Normalised effect: 1 = the harmless run's refusal score.") for p in trace_plots[:3]],
        Figure("Refusal-direction candidates", out / "direction" / "plots" / "candidates.png", "Bypass, induce and KL per layer × position."),
        Figure("Fragility curves", out / "neurons" / "fragility.png", "Refusal and KL as more neurons are zeroed; random baselines from the same layers."),
    ]
    combined = (done.get("fragility") or {}).get("combined_plot")
    if combined:
        figs.append(Figure("Neurons vs direction vs random", Path(combined),
                           "The refusal direction counts as one component (star); random directions ablated with the same hooks."))
    return figs


def build_report(s: Any, done: dict[str, Any]) -> dict[str, Any]:
    model = (done.get("probe") or {}).get("model", {}).get("name") or s.model
    ev = evidence(done)
    stages = assign_stages(ev)
    imp = implications(done)
    headline = _headline(done, model)
    cards = []
    if done.get("probe"):
        b = done["probe"]["best"]
        cards.append(Card("probe accuracy", _f(b["accuracy"], "{:.0%}"), f"layer {b['layer']}, control {_f(b['control_accuracy'], '{:.0%}')}"))
    if done.get("direction"):
        ab = done["direction"].get("ablate", {})
        cards.append(Card("refusal after direction ablation", _f(_rate(ab.get("harmful_refusal_after")), "{:.0%}"),
                          f"before: {_f(_rate(ab.get('harmful_refusal_before')), '{:.0%}')}"))
    conc = concentration(done)
    if conc:
        cards.append(Card("safety neurons (|d| > 0.8)", str(conc[0]),
                          f"{conc[1]:.2%} of analysed neurons" if conc[1] is not None else "analysed layers"))
    if done.get("fragility"):
        k, curve = neuron_breaking_point(done["fragility"])
        cards.append(Card("neurons to halve refusal", str(k) if k else "> max",
                          f"ranked by {curve.removeprefix('top_by_')}; random: {breaking_point(done['fragility'], 'random') or '> max'}"))
    if done.get("capability"):
        r = done["capability"].get("interventions", {}).get("direction")
        if r:
            cards.append(Card("capability cost (direction)", f"KL {_f(r['kl_first_token_mean'], '{:.3f}')}", f"perplexity ×{_f(r['ppl_ratio'])}"))
    sections = [
        Section("Circuit", [TrustedSVG(circuit_svg([st.to_json() for st in stages], ev.n_layers)),
                            Table(["stage", "layers", "components", "evidence"],
                                  [[st.name, f"{st.layers[0]}-{st.layers[1]}", ", ".join(st.components), st.evidence] for st in stages])]),
        Section("Implications", [Table(["", "measured", "what it means"], imp)]),
        Section("Plots", list(_figures(s, done)), grid=True),
    ]
    tables: list[Any] = []
    if done.get("neurons"):
        tables.append(Table(["layer", "neuron", "effect size", "diff", "harmful mean", "harmless mean", "direction"],
                            [[r["layer"], r["neuron"], r["effect_size"], r["activation_diff"], r["unsafe_activation"],
                              r["safe_activation"], r["direction"]] for r in done["neurons"].get("top_by_effect_size", [])[:10]],
                            title="Top safety neurons"))
    if ev.patch_effects:
        ranked = sorted(ev.patch_effects.items(), key=lambda kv: -float(kv[1]))[:10]
        tables.append(Table(["component", "patching effect"], [[k, float(v)] for k, v in ranked],
                            title="Top components by activation patching"))
    if done.get("dla"):
        tables.append(Table(["component", "DLA harmful − harmless", "harmful", "harmless"],
                            [[r["component"], r["dla_diff"], r["harmful"], r["harmless"]] for r in done["dla"]["top"]],
                            title="Direct logit attribution to refusal tokens"))
    if tables:
        sections.append(Section("Top components", tables))
    samples = (done.get("capability") or {}).get("samples", [])
    if samples:
        blocks: list[Any] = []
        for name, what in (("direction", "refusal direction ablated"), ("neurons", "safety neurons ablated")):
            items = [{"prompt": x["prompt"], "before": x["before"], "after": x[f"after_{name}"]} for x in samples if f"after_{name}" in x]
            if items:
                blocks.append(Replies(f"Held-out harmful prompts, {what}", items))
        if not blocks:  # no intervention was measured: the unmodified replies alone
            blocks.append(Replies("Held-out harmful prompts (unmodified model)",
                                  [{"prompt": x["prompt"], "before": x["before"]} for x in samples]))
        sections.append(Section("Replies before / after", blocks))
    sections.append(Section("Method", [Text(
        "Probes: logistic regression per layer, stratified cross-validation, shuffled-label control. Neurons: Cohen's d of the "
        "down-projection inputs at the first response position. Patching: attribution patching over layer × component, top cells "
        "verified by exact activation patching on minimal pairs. Direction: difference of means (Arditi et al. 2024), selected on "
        "validation prompts, measured on held-out test prompts. Stages are assigned from this evidence, not by depth.")]))
    info = (done.get("probe") or {}).get("model") or {}
    facts = ", ".join(x for x in (
        str(info.get("model_type") or ""), f"{info['n_layers']} layers" if info.get("n_layers") else "",
        f"d_model {info['d_model']}" if info.get("d_model") else "",
        f"{info['n_params'] / 1e6:.0f}M parameters" if info.get("n_params") else "", str(info.get("dtype") or "")) if x)
    report = Report(title=f"Refusal circuit of {model}", subtitle="safetyscope map" + (f" · {facts}" if facts else ""),
                    headline=headline, summary=cards,
                    sections=sections, footer="Generated by safetyscope; every number comes from the stage results in map/stages/.")
    path = report.write(Path(s.out) / "report.html")
    return {"report": str(path), "headline": headline, "stages": [st.to_json() for st in stages],
            "implications": [{"row": r[0], "measured": r[1], "meaning": r[2]} for r in imp]}

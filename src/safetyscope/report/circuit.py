"""The map's report: circuit stages by evidence, the implications table, and the HTML page.

Reads the typed stage results (:class:`~safetyscope.methods.circuit.results.Results`); a stage that did
not run, failed or found nothing is named on the page with the reason, never left out silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..methods.circuit.evidence import evidence, probe_beats_control
from ..methods.circuit.results import DirectionSummary, FragilitySummary, Results, StageRun
from ..methods.circuit.stages import Stage, assign_stages, missing_stages
from .circuit_defence import defence_section, judges_blocks
from .circuit_figures import draw_figures
from .circuit_svg import circuit_svg
from .html import Block, Card, Figure, Replies, Report, Section, Table, Text, TrustedSVG

STAGE_LABELS = {"done": "computed", "cached": "cached (reused)", "failed": "failed", "skipped": "not run"}


def fmt(x: float | None, spec: str = "{:.3f}") -> str:
    """A number for the page; "n/a" for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return spec.format(x)


def breaking_point(frag: FragilitySummary | None, curve: str) -> int | None:
    """Smallest k whose score refusal rate (mean over seeds) is at most half the unablated model's; None if never."""
    if frag is None:
        return None
    base = next((p.score_refusal_rate for p in frag.neurons if p.k == 0), None)
    if base is None or base <= 0:
        return None
    hits = sorted(p.k for p in frag.neurons if p.curve == curve and p.k > 0 and p.score_refusal_rate <= base / 2)
    return hits[0] if hits else None


def neuron_breaking_point(frag: FragilitySummary | None) -> tuple[int | None, str]:
    """The smallest breaking point over the ranked (non-random) neuron curves, and that curve's name."""
    names = list(dict.fromkeys(p.curve for p in (frag.neurons if frag else ()) if not p.curve.startswith("random")))
    hits = [(k, name) for name in names if (k := breaking_point(frag, name)) is not None]
    return min(hits) if hits else (None, names[0] if names else "")


def concentration(res: Results) -> tuple[int, float | None] | None:
    """(neurons with |Cohen's d| > 0.8, their share of the analysed neurons) from the neurons stage."""
    if res.neurons is None:
        return None
    d_mlp = res.model.d_mlp if res.model else None
    n = len(res.neurons.layers)
    return res.neurons.n_large, (res.neurons.n_large / (n * d_mlp) if d_mlp and n else None)


def direction_vs_random(frag: FragilitySummary | None) -> tuple[float, float, float] | None:
    """(unablated, direction-ablated, random-direction-ablated) fraction of held-out harmful prompts with
    refusal score > 0, from the fragility stage."""
    get = {(p.curve, p.k): p.score_refusal_rate for p in (frag.direction if frag else ())}
    vals = (get.get(("direction", 0)), get.get(("direction", 1)), get.get(("random direction", 1)))
    return None if any(v is None for v in vals) else (vals[0], vals[1], vals[2])  # type: ignore[return-value]


def _pct(x: float | None) -> str:
    return fmt(x, "{:.0%}")


def judged(d: DirectionSummary) -> str:
    """Which judge a direction stage's refusal rates come from, and on how many prompts, as the page states it."""
    return f"judge: {d.judge}" + (f", {d.n_harmful} held-out prompts" if d.n_harmful else "")


def implications(res: Results) -> list[list[Any]]:
    rows: list[list[Any]] = []
    conc = concentration(res)
    if conc and res.neurons:
        large, share = conc
        where = f" in {len(res.neurons.layers)} layers" + (f" ({share:.2%} of the analysed neurons)" if share is not None else "")
        rows.append(["Concentration", f"{large} neurons with |Cohen's d| > 0.8{where}",
                     "how many MLP neurons separate harmful from harmless prompts"])
    if res.fragility:
        (k_top, curve), k_rand = neuron_breaking_point(res.fragility), breaking_point(res.fragility, "random")
        rows.append(["Fragility (neurons)",
                     f"top neurons ({curve}) halve the refusal rate at k = {k_top if k_top is not None else '> max k'}; "
                     f"random neurons at k = {k_rand if k_rand is not None else '> max k'}",
                     "refusal (logit score > 0, no judge) on held-out harmful prompts as neurons are zeroed"])
    dvr = direction_vs_random(res.fragility)
    if dvr:
        rows.append(["Fragility (direction)", f"ablating the refusal direction: {dvr[0]:.0%} → {dvr[1]:.0%}; "
                     f"a random direction: {dvr[0]:.0%} → {dvr[2]:.0%}",
                     "one rank-1 component against random rank-1 components, same prompts and metric "
                     "(logit refusal score > 0, no judge)"])
    if res.probe:
        b = res.probe.best
        note = "" if probe_beats_control(res.probe) else " — no layer beats the control: no evidence of readability"
        rows.append(["Probe accuracy", f"{fmt(b.accuracy)} at layer {b.layer} (shuffled-label control "
                     f"{fmt(b.control_accuracy)}){note}", "linear readability of harmfulness"])
    if res.direction:
        d = res.direction
        rows.append(["Circuit compactness", f"one direction (layer {d.layer}): harmful refusal "
                     f"{_pct(d.refusal_before)} → {_pct(d.refusal_after)} ({judged(d)})",
                     ("refined, " if d.refined else "") + ("mean" if d.ablation == "mean" else "zero")
                     + " ablation of the direction at every layer, measured on held-out prompts"])
        if d.zero_kl_mean is not None:
            rows.append(["Exportable variant", f"the same direction, zero ablation: harmful refusal "
                         f"{_pct(d.refusal_before)} → {_pct(d.zero_refusal_after)} ({judged(d)}) at first-token KL "
                         f"{fmt(d.zero_kl_mean)}",
                         "what `direction export` writes into the weights; same held-out prompts"])
    if res.capability:
        for name, c in res.capability.interventions.items():
            rows.append([f"Capability loss ({name})", f"first-token KL {fmt(c.kl_first_token_mean, '{:.4f}')}, "
                         f"perplexity ×{fmt(c.ppl_ratio)}", "harmless prompts; built-in prose and code passages"])
    return rows


def headline(res: Results, model: str) -> str:
    parts = []
    if res.direction:
        d = res.direction
        parts.append(f"ablating one direction moves harmful refusal ({judged(d)}) from {_pct(d.refusal_before)} "
                     f"to {_pct(d.refusal_after)} at first-token KL {fmt(d.kl_mean)}")
    if res.fragility:
        k, curve = neuron_breaking_point(res.fragility)
        parts.append(f"zeroing the top {k} safety neurons ({curve}) halves it" if k
                     else "zeroing up to the largest tested number of neurons does not halve it")
    if res.probe:
        b = res.probe.best
        parts.append(f"a linear probe reads harmfulness with {_pct(b.accuracy)} accuracy at layer {b.layer}"
                     + ("" if probe_beats_control(res.probe) else f" (no better than its control, {_pct(b.control_accuracy)})"))
    return f"{model}: " + "; ".join(parts) + "." if parts else f"{model}: no stage produced a result."


def cards(res: Results) -> list[Card]:
    out = []
    if res.probe:
        b = res.probe.best
        out.append(Card("probe accuracy", _pct(b.accuracy), f"layer {b.layer}, control {_pct(b.control_accuracy)}"))
    if res.direction:
        out.append(Card("refusal after direction ablation", _pct(res.direction.refusal_after),
                        f"before: {_pct(res.direction.refusal_before)}; {judged(res.direction)}"))
    conc = concentration(res)
    if conc:
        out.append(Card("safety neurons (|d| > 0.8)", str(conc[0]),
                        f"{conc[1]:.2%} of analysed neurons" if conc[1] is not None else "analysed layers"))
    if res.fragility:
        k, curve = neuron_breaking_point(res.fragility)
        out.append(Card("neurons to halve refusal", str(k) if k else "> max",
                        f"ranked by {curve.removeprefix('top_by_')}; random: {breaking_point(res.fragility, 'random') or '> max'}"))
    cost = res.capability.interventions.get("direction") if res.capability else None
    if cost:
        out.append(Card("capability cost (direction)", f"KL {fmt(cost.kl_first_token_mean)}", f"perplexity ×{fmt(cost.ppl_ratio)}"))
    return out


FIGURE_TEXT = {  # file stem -> (title, caption)
    "probe_layers": ("Probe accuracy by layer", "Cross-validated accuracy and AUROC; grey: shuffled-label control."),
    "effect_size": ("Safety-neuron effect sizes", "Cohen's d of MLP neurons, harmful vs harmless."),
    "candidates": ("Refusal-direction candidates", "Bypass, induce and KL per layer × position."),
    "fragility": ("Fragility curves", "Refusal and KL as more neurons are zeroed; random baselines from the same layers."),
    "fragility_all": ("Neurons vs direction vs random",
                      "The refusal direction counts as one component (star); random directions ablated with the same hooks."),
}
FIGURE_ORDER = {"probe": "probe_layers", "neurons": "effect_size", "trace": "", "direction": "candidates",
                "fragility": "fragility"}  # stage -> the stem of its first figure


def figures(drawn: Mapping[str, Sequence[Path]], problems: Mapping[str, str]) -> list[Block]:
    """The drawn figures in stage order; a stage without a result keeps its slot, marked as not computed."""
    figs: list[Block] = []
    for stage, stem in FIGURE_ORDER.items():
        paths = list(drawn.get(stage, ()))[: 3 if stage == "trace" else None]
        for p in paths:
            title, caption = FIGURE_TEXT.get(p.stem, (f"Patching: {p.stem}", "Normalised effect: 1 = the harmless run's refusal score."))
            figs.append(Figure(title, p, caption))
        if stage in problems:
            figs.append(Figure(f"{stage}: {problems[stage]}", None))
        elif not paths:
            figs.append(Figure(FIGURE_TEXT[stem][0] if stem else "Patching heatmaps", None))
    return figs


def circuit_section(stages: Sequence[Stage], missing: Mapping[str, str], n_layers: int) -> Section:
    rows: list[list[Any]] = [[st.name, f"{st.layers[0]}-{st.layers[1]}", ", ".join(st.components), st.evidence] for st in stages]
    rows += [[name, "-", "-", why] for name, why in missing.items()]
    blocks: list[Block] = [TrustedSVG(circuit_svg([st.to_json() for st in stages], n_layers))] if stages else [
        Text("No circuit stage has evidence in this run (see the table and the stage status below).")]
    return Section("Circuit", [*blocks, Table(["stage", "layers", "components", "evidence"], rows)])


def top_tables(res: Results) -> list[Block]:
    tables: list[Block] = []
    if res.neurons:
        tables.append(Table(["layer", "neuron", "effect size", "diff", "harmful mean", "harmless mean", "direction"],
                            [[r["layer"], r["neuron"], r["effect_size"], r["activation_diff"], r["unsafe_activation"],
                              r["safe_activation"], r["direction"]] for r in res.neurons.top[:10]],
                            title="Top safety neurons"))
    if res.trace and res.trace.effects:
        ranked = sorted(res.trace.effects.items(), key=lambda kv: -kv[1])[:10]
        tables.append(Table(["component", "patching effect"], [[k, v] for k, v in ranked],
                            title="Top components by activation patching"))
    if res.dla:
        tables.append(Table(["component", "DLA harmful − harmless", "harmful", "harmless"],
                            [[r["component"], r["dla_diff"], r["harmful"], r["harmless"]] for r in res.dla.top],
                            title="Direct logit attribution to refusal tokens"))
    return tables


def replies(res: Results) -> list[Block]:
    samples = res.capability.samples if res.capability else ()
    if not samples:
        return []
    blocks: list[Block] = []
    for name, what in (("direction", "refusal direction ablated"), ("neurons", "safety neurons ablated")):
        items = [{"prompt": x["prompt"], "before": x["before"], "after": x[f"after_{name}"]} for x in samples if f"after_{name}" in x]
        if items:
            blocks.append(Replies(f"Held-out harmful prompts, {what}", items))
    if not blocks:  # no intervention was measured: the unmodified replies alone
        blocks.append(Replies("Held-out harmful prompts (unmodified model)",
                              [{"prompt": x["prompt"], "before": x["before"]} for x in samples]))
    return blocks


METHOD = ("Probes: logistic regression per layer, stratified cross-validation, shuffled-label control. Neurons: Cohen's d of the "
          "down-projection inputs at the first response position. Patching: attribution patching over layer × component, top cells "
          "verified by exact activation patching on minimal pairs. Direction: difference of means (Arditi et al. 2024), selected on "
          "validation prompts, measured on held-out test prompts. Stages are assigned from this evidence, not by depth.")


def status_table(runs: Sequence[StageRun], problems: Mapping[str, str]) -> Table:
    rows = [[r.name, STAGE_LABELS.get(r.status, r.status), fmt(r.seconds, "{:.0f} s"),
             r.error or problems.get(r.name, "")] for r in runs]
    return Table(["stage", "status", "time", "note"], rows, title="Stages of this run")


@dataclass(frozen=True)
class MapReport:
    """What the report stage returns (and stores as its result)."""

    path: Path
    headline: str
    stages: list[Stage]
    missing: dict[str, str]
    implications: list[list[Any]]
    error: str | None = None  # the page could not be built (a fallback page was written; a rerun builds it again)

    def to_json(self) -> dict[str, Any]:
        return {"report": str(self.path), "headline": self.headline, "stages": [st.to_json() for st in self.stages],
                "missing_stages": self.missing, "page_error": self.error,
                "implications": [{"row": r[0], "measured": r[1], "meaning": r[2]} for r in self.implications]}


def build_report(out: Path, raw: Mapping[str, Any], runs: Sequence[StageRun], model: str,
                 path: Path | None = None) -> MapReport:
    """Draw the figures and render the page from whatever results exist; never fails for lack of evidence."""
    res = Results.from_json(raw)
    drawn, fig_problems = draw_figures(out, model, raw)
    ev = evidence(res)
    stages, missing = assign_stages(ev), missing_stages(ev)
    imp = implications(res)
    line = headline(res, model)
    sections = [circuit_section(stages, missing, ev.n_layers),
                Section("Implications", [Table(["", "measured", "what it means"], imp) if imp
                                         else Text("No stage produced a measurement to summarise.")]),
                Section("Plots", figures(drawn, fig_problems), grid=True)]
    tables = top_tables(res)
    if tables:
        sections.append(Section("Top components", tables))
    side_by_side = judges_blocks(raw.get("judges"))
    if (samples := replies(res)) or side_by_side:
        sections.append(Section("Replies before / after", [*side_by_side, *samples]))
    sections.append(defence_section(raw.get("monitor")))
    sections.append(Section("Method", [Text(METHOD), status_table(runs, res.problems)]))
    facts = res.model.facts() if res.model else ""
    report = Report(title=f"Refusal circuit of {model}", subtitle="safetyscope map" + (f" · {facts}" if facts else ""),
                    headline=line, summary=cards(res), sections=sections,
                    footer="Generated by safetyscope; every number comes from the stage results in map/stages/.")
    written = report.write(path or out / "report.html")
    return MapReport(written, line, stages, missing, imp)


def render_map(out: Path, raw: Mapping[str, Any], runs: Sequence[StageRun], model: str,
               path: Path | None = None) -> MapReport:
    """The map's HTML page; if building it fails (a bug), a plain page with every stage's status and the error."""
    try:
        return build_report(out, raw, runs, model, path)
    except Exception as exc:  # noqa: BLE001 - the map must always end with a page
        msg = f"{type(exc).__name__}: {exc}"
        line = f"{model}: the report could not be built ({msg}); the stage results are in map/stages/."
        page = Report(title=f"Refusal circuit of {model}", subtitle="safetyscope map", headline=line,
                      sections=[Section("Stages", [status_table(runs, {}), Text(f"Report error: {msg}")])],
                      footer="Please report this error; the stage results in map/stages/ are intact.")
        return MapReport(page.write(path or out / "report.html"), line, [], {}, [], msg)

"""The map's figures, drawn from the stored stage results when the report is rendered.

Each figure lands where the matching command writes it (``OUT/probe/probe_layers.png``,
``OUT/neurons/effect_size.png``, ...); a figure whose stage has no result is left out, and one that
cannot be drawn is reported by name instead of failing the page.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io import read_json
from .plots.direction import candidate_heatmaps
from .plots.neurons import plot_effect_sizes, plot_fragility
from .plots.patching import heatmap
from .plots.probes import plot_probe_layers

Raw = Mapping[str, Any]


def _ok(raw: Raw, stage: str) -> Mapping[str, Any] | None:
    res = raw.get(stage)
    return res if isinstance(res, Mapping) and "error" not in res else None


def probe_figure(out: Path, model: str, raw: Raw) -> list[Path]:
    p = _ok(raw, "probe")
    if p is None:
        return []
    n = int(p["n_positive"]) + int(p["n_negative"])
    return [plot_probe_layers(p["layers"], out / "probe" / "probe_layers.png", chance=float(p["chance"]),
                              title=f"{model}: harmful vs harmless at {p['site']} ({p['position']}), {n} prompts, "
                                    f"{p['config']['folds']}-fold CV")]


def neuron_figure(out: Path, model: str, raw: Raw) -> list[Path]:
    r = _ok(raw, "neurons")
    if r is None:
        return []
    return [plot_effect_sizes(r["layers"], r["top_by_effect_size"][:50], out / "neurons" / "effect_size",
                              title=f"{model}: neuron effect size per layer ({r['n_harmful']}+{r['n_harmless']} prompts)")]


def trace_figures(out: Path, model: str, raw: Raw) -> list[Path]:
    t = _ok(raw, "trace")
    if t is None:
        return []
    paths = []
    for mode, m in t["modes"].items():
        for name, g in m["grids"].items():
            values = np.array([[np.nan if v is None else v for v in row] for row in g["median"]], dtype=float)
            title = f"{g['name']} ({g['direction']}), median over {g['n_pairs_used']}/{g['n_pairs']} pairs"
            ylabel = {"component": "component", "head": "head"}.get(name, "")
            paths.append(heatmap(values, g["rows"], g["cols"], out / "trace" / "plots" / f"{mode}-{name.replace(':', '-')}.png",
                                 title=title, ylabel=ylabel))
    return paths


def direction_figure(out: Path, model: str, raw: Raw) -> list[Path]:
    from ..methods.direction.select import Selection

    d = _ok(raw, "direction")
    if d is None:
        return []
    find = d["find"]
    selection = Selection.from_json(read_json(find["selection"]))
    probe = _ok(raw, "probe")
    n_layers = int(probe["model"]["n_layers"]) if probe else 1 + max(s.layer for s in selection.scores)
    return [candidate_heatmaps(selection, n_layers, find["positions"], find["tokens"],
                               out / "direction" / "plots" / "candidates.png", title=f"{model}: refusal-direction candidates")]


def fragility_figures(out: Path, model: str, raw: Raw) -> list[Path]:
    f = _ok(raw, "fragility")
    if f is None:
        return []
    n_h, n_s = f.get("n_eval", ["?", "?"])
    paths = [plot_fragility(f, out / "neurons" / "fragility",
                            title=f"{model}: zero ablation of MLP neurons ({n_h} harmful / {n_s} harmless held out)")]
    if "direction_summary" in f:
        combined = {**f, "summary": [*f["summary"], *(r for r in f["direction_summary"] if r["k"] > 0)]}
        paths.append(plot_fragility(
            combined, out / "map" / "fragility_all",
            title=f"{model}: neurons vs the refusal direction vs random ({n_h} harmful / {n_s} harmless held out)",
            xlabel="components ablated (neurons; the direction counts as 1)"))
    return paths


FIGURES: dict[str, Callable[[Path, str, Raw], list[Path]]] = {
    "probe": probe_figure, "neurons": neuron_figure, "trace": trace_figures, "direction": direction_figure,
    "fragility": fragility_figures,
}


def draw_figures(out: Path, model: str, raw: Raw) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """(stage -> its figure files, stage -> why its figures could not be drawn)."""
    drawn: dict[str, list[Path]] = {}
    problems: dict[str, str] = {}
    for stage, draw in FIGURES.items():
        try:
            drawn[stage] = draw(out, model, raw)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            problems[stage] = f"figures not drawn ({type(exc).__name__}: {exc})"
    return drawn, problems

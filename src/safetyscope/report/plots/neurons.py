"""Plots for safety neurons: effect size per layer and fragility curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import PALETTE, figure, save_figure

_CURVE_COLORS = [PALETTE["top"], PALETTE["accent"], PALETTE["harmful"], PALETTE["harmless"], "#16a085", "#2c3e50"]


def plot_effect_sizes(
    layer_summary: Sequence[Mapping[str, Any]],
    top: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    svg: bool = True,
) -> Path:
    """Per layer: max and 99th-percentile |Cohen's d| of the neurons, with the top neurons as dots.

    ``layer_summary``: rows with layer, max_abs_effect, p99_abs_effect; ``top``: neuron records
    (layer, effect_size, direction).
    """
    fig, ax = figure(7.5, 3.6)
    layers = [int(r["layer"]) for r in layer_summary]
    ax.bar(layers, [r["max_abs_effect"] for r in layer_summary], color=PALETTE["control"], alpha=0.5, label="max |d|")
    ax.plot(layers, [r["p99_abs_effect"] for r in layer_summary], color="#34495e", lw=1.2, marker=".",
            label="99th percentile |d|")
    for direction, color in (("harmful_higher", PALETTE["harmful"]), ("harmless_higher", PALETTE["harmless"])):
        pts = [(int(r["layer"]), abs(float(r["effect_size"]))) for r in top if r["direction"] == direction]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=color, zorder=3,
                       label=f"top neurons, {direction.replace('_', ' ')}")
    ax.set_xlabel("layer")
    ax.set_ylabel("|Cohen's d| (harmful vs harmless)")
    ax.set_title(title or "Neuron effect size per layer")
    ax.legend(fontsize=7, frameon=False)
    return save_figure(fig, path, svg=svg)


def plot_fragility(
    result: Mapping[str, Any], path: str | Path, *, title: str = "", svg: bool = True, xlabel: str = "neurons ablated (k)"
) -> Path:
    """Refusal (score and rate) and harmless KL against the number of ablated components.

    ``result``: ``FragilityResult.to_dict()``; random curves are drawn as mean with a min-max band.
    """
    summary = list(result["summary"])
    has_rate = any(r.get("refusal_rate") is not None for r in summary)
    panels = [("refusal_score", "refusal score (harmful)"),
              ("refusal_rate" if has_rate else "score_refusal_rate",
               "judged refusal rate (harmful)" if has_rate else "fraction refusal score > 0 (harmful)"),
              ("kl", "first-token KL (harmless)")]
    fig, axes = figure(11.0, 3.4)
    fig.clf()
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    curves = list(dict.fromkeys(r["curve"] for r in summary))
    for ci, curve in enumerate(curves):
        rows = sorted((r for r in summary if r["curve"] == curve), key=lambda r: r["k"])
        is_random = curve.startswith("random")
        color = PALETTE["random"] if is_random else _CURVE_COLORS[ci % len(_CURVE_COLORS)]
        marker = "*" if "direction" in curve else "o"
        for ax, (metric, label) in zip(axes, panels):
            pts = [r for r in rows if r.get(metric) is not None]
            if not pts:
                continue
            xs = [r["k"] for r in pts]
            ax.plot(xs, [r[metric] for r in pts], marker=marker, ms=6 if marker == "*" else 3, lw=1.4, color=color,
                    ls="--" if is_random else "-", label=f"{curve} ({pts[0]['n_seeds']} seeds)" if is_random else curve)
            if is_random and pts[0]["n_seeds"] > 1:
                ax.fill_between(xs, [r[f"{metric}_min"] for r in pts], [r[f"{metric}_max"] for r in pts],
                                color=color, alpha=0.2, lw=0)
            ax.set_ylabel(label)
    for ax in axes:
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel(xlabel)
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(title or "Fragility: ablating top vs random neurons", fontsize=10)
    return save_figure(fig, path, svg=svg)

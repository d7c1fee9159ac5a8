"""Refusal-direction plots: candidate scores (layer x position), the weight-tuning Pareto front, refinement curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import PALETTE, figure, save_figure

if TYPE_CHECKING:
    from ...methods.direction.refine import RefineResult
    from ...methods.direction.scores import Selection
    from ...methods.direction.tune import TuneResult

METRICS = (
    ("bypass", "bypass: refusal score, harmful, ablated (lower = better)", "RdBu_r"),
    ("induce", "induce: refusal score, harmless, added (higher = better)", "RdBu_r"),
    ("kl", "KL, harmless, ablated (lower = better)", "viridis"),
)


def candidate_heatmaps(
    selection: Selection, n_layers: int, positions: Sequence[int], tokens: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """Three heatmaps (bypass, induce, KL) over block x post-instruction position.

    Filtered candidates (any :class:`~safetyscope.methods.direction.scores.Reason`) carry a small cross,
    the chosen one a black frame; grey = not scored.
    """
    import matplotlib.patches as patches
    import numpy as np
    from matplotlib import colormaps

    fig, axes = figure(width=4.2 * len(METRICS), height=max(3.2, 0.16 * n_layers + 1.6))
    fig.clf()
    axs = fig.subplots(1, len(METRICS))
    labels = [f"{p}\n{t.strip() or repr(t)}" for p, t in zip(positions, tokens)]
    reasons = {(s.layer, s.position): s.reasons for s in selection.scores}
    for ax, (metric, label, cmap) in zip(axs, METRICS):
        grid = selection.grid(metric, n_layers, positions).numpy()  # [n_layers, n_positions]
        data = np.ma.masked_invalid(grid)
        kwargs: dict[str, Any] = {"cmap": colormaps[cmap].with_extremes(bad="#dddddd"), "aspect": "auto", "origin": "lower"}
        finite = grid[np.isfinite(grid)]
        if metric != "kl" and finite.size:
            lim = float(np.abs(finite).max()) or 1.0
            kwargs.update(vmin=-lim, vmax=lim)
        elif finite.size and finite.max() > 0:
            from matplotlib.colors import LogNorm

            kwargs["norm"] = LogNorm(vmin=max(float(finite[finite > 0].min()), 1e-6), vmax=float(finite.max()))
        cm = ax.imshow(data, **kwargs)
        fig.colorbar(cm, ax=ax, fraction=0.05)
        for (layer, pos), why in reasons.items():
            if why and pos in positions:
                ax.plot(list(positions).index(pos), layer, marker="x", color="#555555", markersize=3, linewidth=0)
        if selection.best is not None and selection.best[1] in positions:
            col = list(positions).index(selection.best[1])
            ax.add_patch(patches.Rectangle((col - 0.5, selection.best[0] - 0.5), 1, 1, fill=False, lw=2, ec="black"))
        ax.set_xticks(range(len(positions)), labels, fontsize=7)
        ax.set_ylabel("block (resid_pre)")
        ax.set_title(label, fontsize=8)
    if any(s.bypass is None and s.screen_bypass is not None for s in selection.scores):
        title = (title + "; " if title else "") + "bypass/KL of screened-out cells are screening-pass values"
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def pareto_plot(result: TuneResult, path: str | Path, *, title: str = "") -> Path:
    """Refusal score vs KL of every tuning trial, the Pareto front joined, full ablation and choice marked."""
    fig, ax = figure(5.2, 3.8)
    trials = result.trials
    xs = [t.kl for t in trials]
    ys = [t.refusal for t in trials]
    ax.scatter(xs, ys, s=14, color=PALETTE["control"], label="trials")
    front = [trials[i] for i in result.front]
    ax.plot([t.kl for t in front], [t.refusal for t in front], "-o", color=PALETTE["top"], ms=4, label="Pareto front")
    full = trials[0]
    ax.scatter([full.kl], [full.refusal], marker="s", s=40, color=PALETTE["harmful"], label="full ablation", zorder=3)
    best = trials[result.chosen]
    ax.scatter([best.kl], [best.refusal], marker="*", s=120, color=PALETTE["accent"], label="chosen", zorder=4)
    if all(x > 0 and math.isfinite(x) for x in xs):
        ax.set_xscale("log")
    ax.set_xlabel("mean first-token KL on harmless prompts")
    ax.set_ylabel("mean refusal score on harmful prompts")
    ax.axhline(0.0, color="#999999", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    ax.set_title(title or ("norm-preserving " if result.norm_preserving else "") + "per-layer weight search", fontsize=9)
    return save_figure(fig, path)


def refine_plot(result: RefineResult, path: str | Path, *, title: str = "") -> Path:
    """Validation KL and bypass term of a direction refinement against the step, the chosen step marked."""
    fig, ax = figure(5.2, 3.8)
    steps = [h.step for h in result.history]
    ax.plot(steps, [h.val_kl for h in result.history], "-o", ms=3, color=PALETTE["harmless"], label="KL, harmless (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean first-token KL")
    ax2 = ax.twinx()
    ax2.plot(steps, [h.val_bypass for h in result.history], "-s", ms=3, color=PALETTE["harmful"],
             label="bypass term, harmful (val)")
    ax2.set_ylabel("mean relu(refusal score - harmless mean)")
    ax.axvline(result.chosen, color=PALETTE["accent"], lw=1.2, ls="--", label="chosen")
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3,
              frameon=False)
    ax.set_title(title or "direction refinement", fontsize=9)
    return save_figure(fig, path)

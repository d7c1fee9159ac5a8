"""Probe accuracy and AUROC by layer, with the shuffled-label control band and held-out scores.

Input: the per-layer rows of a probe summary (``summary.json["layers"]``), so plots can be redrawn
from saved results without refitting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import PALETTE, figure, save_figure


def _get(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]


def plot_probe_layers(
    rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "", chance: float = 0.5, svg: bool = False
) -> Path:
    """Two panels (accuracy, AUROC) by layer: CV mean +- std, the control mean with a +-2 std band over
    shuffled-label seeds, the random-direction baseline and held-out (test) scores when present."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    if not rows:
        raise ValueError("no probe rows to plot; run the probe first")
    layers = np.array([int(r["layer"]) for r in rows])
    fig, axes = figure(12.0, 3.6)
    fig.clf()
    axes = fig.subplots(1, 2, sharex=True)
    for ax, metric, name, base in ((axes[0], "accuracy", "accuracy", chance), (axes[1], "auroc", "AUROC", 0.5)):
        mean, std = np.array(_get(rows, metric)), np.array(_get(rows, f"{metric}_std"))
        ctrl, cstd = np.array(_get(rows, f"control_{metric}")), np.array(_get(rows, f"control_{metric}_std"))
        ax.axhline(base, color="black", lw=0.6, ls=":", label="chance")
        if np.isfinite(ctrl).any():
            ax.fill_between(layers, ctrl - 2 * cstd, ctrl + 2 * cstd, color=PALETTE["control"], alpha=0.3, lw=0)
            ax.plot(layers, ctrl, color=PALETTE["control"], lw=1.2, label="control (shuffled labels, ±2 sd)")
        rand = np.array(_get(rows, f"random_{metric}"))
        if np.isfinite(rand).any():
            ax.plot(layers, rand, color=PALETTE["random"], lw=1.0, ls="--", label="random direction")
        if metric == "auroc" and np.isfinite(np.array(_get(rows, "dom_auroc"))).any():
            ax.plot(layers, _get(rows, "dom_auroc"), color=PALETTE["top"], lw=1.0, ls="-.", label="diff. of means (CV)")
        ax.fill_between(layers, mean - std, mean + std, color=PALETTE["harmful"], alpha=0.2, lw=0)
        ax.plot(layers, mean, color=PALETTE["harmful"], lw=1.6, marker="o", ms=3, label="probe (CV mean ± sd)")
        test = np.array(_get(rows, f"test_{metric}"))
        if np.isfinite(test).any():
            ax.plot(layers, test, color=PALETTE["accent"], lw=1.2, marker="s", ms=3, label="probe, held-out test")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
        ax.set_ylim(min(0.3, float(np.nanmin(np.concatenate([mean, ctrl - 2 * cstd, test, [base]])))) - 0.02, 1.02)
        ax.grid(alpha=0.25, lw=0.5)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, svg=svg)

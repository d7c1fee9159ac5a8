"""Heatmaps of patching effects: layer x component, layer x position and layer x head.

Layers run along the x axis; the effect (1 = the patched run scores like the source run, 0 =
unchanged) is drawn with a diverging colour map centred on 0 and scaled to the grid's largest
|effect| (read the colour bar: small head effects stay visible), so components that push the
other way show up in blue. Cells undefined for every pair are grey.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import figure, save_figure

STATS = ("median", "mean", "pooled")


def heatmap(
    values: np.ndarray,
    layers: Sequence[str],
    labels: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    ylabel: str = "",
    colorbar: str = "normalised effect (1 = source-like)",
    annotate: bool | None = None,
    svg: bool = False,
) -> Path:
    """values: [n_layers, n_labels] -> a heatmap with layers on x and ``labels`` on y."""
    import matplotlib as mpl

    grid = np.asarray(values, dtype=float).T  # [n_labels, n_layers]
    n_lab, n_lay = grid.shape
    fig, ax = figure(width=min(16.0, 2.2 + 0.32 * n_lay), height=min(14.0, 1.4 + 0.24 * max(n_lab, 3)))
    finite = grid[np.isfinite(grid)]
    lim = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0  # symmetric, data-driven
    cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_lay), list(layers), fontsize=7)
    ax.set_yticks(range(n_lab), list(labels), fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if annotate if annotate is not None else n_lab * n_lay <= 120:
        for (r, c), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if abs(v) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02).set_label(colorbar, fontsize=7)
    return save_figure(fig, path, svg=svg)


def position_labels(batch: Any, tokenizer: Any, offsets: Sequence[int]) -> list[str]:
    """``offset 'token'`` when every row has the same token there, else ``offset *``."""
    ids = batch.input_ids
    mask = batch.attention_mask.bool()
    out = []
    for o in offsets:
        col = ids[:, o][mask[:, o]].tolist()
        if col and all(t == col[0] for t in col):
            out.append(f"{o} {tokenizer.decode([col[0]])!r}")
        else:
            out.append(f"{o} *" if len(col) > 1 else f"{o} {tokenizer.decode(col[:1])!r}")
    return out


def plot_effects(eff: Any, path: str | Path, *, stat: str = "median", labels: Sequence[str] | None = None,
                 title: str = "", svg: bool = False) -> Path:
    """Heatmap of an :class:`~safetyscope.methods.patching.exact.Effects` (rows = layers)."""
    if stat not in STATS:
        raise ValueError(f"unknown statistic {stat!r}; use {', '.join(STATS)}")
    values = getattr(eff, stat)()
    kind = eff.name.split(":")[-2] if eff.name.count(":") else eff.name
    ylabel = {"component": "component", "head": "head", "position": "position (offset from end)"}.get(
        "position" if "position" in eff.name else kind, "")
    head = title or f"{eff.name} ({eff.direction}), {stat} over {int(eff.used.sum())}/{len(eff.gap)} pairs"
    return heatmap(values, eff.rows, list(labels) if labels is not None else eff.cols, path, title=head,
                   ylabel=ylabel, svg=svg)

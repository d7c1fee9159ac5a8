"""Plot helpers shared by every method's plots (one module per method in this package).

Matplotlib with the Agg backend; figures are saved atomically as PNG (and SVG when asked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PALETTE = {
    "harmful": "#c0392b",
    "harmless": "#2e86c1",
    "control": "#95a5a6",
    "random": "#95a5a6",
    "top": "#8e44ad",
    "accent": "#e67e22",
}


def figure(width: float = 7.0, height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt.subplots(figsize=(width, height), dpi=120)


def save_figure(fig: Any, path: str | Path, svg: bool = False) -> Path:
    """Save ``fig`` to ``path`` (.png) atomically, optionally an .svg beside it; closes the figure."""
    import matplotlib.pyplot as plt

    from ...io import atomic_path

    path = Path(path).with_suffix(".png")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    if svg:
        with atomic_path(path.with_suffix(".svg")) as tmp:
            fig.savefig(tmp, format="svg")
    plt.close(fig)
    return path

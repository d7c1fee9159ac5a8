"""The refusal direction (Arditi et al. 2024) and beyond: find, select, verify, tune, refine, measure, export.

Modules: ``api`` (``find_direction`` / ``search_direction`` and ``DirectionConfig``), ``candidates``
(difference of means), ``select`` / ``scoring`` / ``choice`` / ``scores`` (selection on validation prompts),
``tune`` (per-layer weights), ``refine`` (gradient refinement), ``evaluate`` (before/after measurements),
``artifact`` (the ``Direction`` artifact: ablation, addition, weight orthogonalisation).

Importing this package is light: the public names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "DirectionConfig": ".api",
    "DirectionSearch": ".api",
    "NoDirectionFound": ".api",
    "find_direction": ".api",
    "search_direction": ".api",
    "Direction": ".artifact",
    "Candidates": ".candidates",
    "find_candidates": ".candidates",
    "Reason": ".scores",
    "SelectConfig": ".scores",
    "Selection": ".scores",
    "select_direction": ".select",
    "RefineResult": ".refine",
    "refine_direction": ".refine",
    "TuneResult": ".tune",
    "tune_weights": ".tune",
    "evaluate_ablation": ".evaluate",
    "evaluate_addition": ".evaluate",
}

__all__ = [
    "Candidates", "Direction", "DirectionConfig", "DirectionSearch", "NoDirectionFound", "Reason", "RefineResult",
    "SelectConfig", "Selection", "TuneResult", "evaluate_ablation", "evaluate_addition", "find_candidates",
    "find_direction", "refine_direction", "search_direction", "select_direction", "tune_weights",
]
assert sorted(__all__) == sorted(_LAZY)

if TYPE_CHECKING:
    from .api import DirectionConfig, DirectionSearch, NoDirectionFound, find_direction, search_direction
    from .artifact import Direction
    from .candidates import Candidates, find_candidates
    from .evaluate import evaluate_ablation, evaluate_addition
    from .refine import RefineResult, refine_direction
    from .scores import Reason, SelectConfig, Selection
    from .select import select_direction
    from .tune import TuneResult, tune_weights


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

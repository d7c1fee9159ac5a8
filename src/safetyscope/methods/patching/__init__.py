"""patching: causal tracing of refusal (:func:`trace`): exact activation patching, attribution patching and
noise corruption over harmful/harmless pairs, as :class:`~safetyscope.methods.patching.effects.Effects` grids."""

from .api import ModeResult, TracePlan, TraceResult, select_pairs, trace
from .effects import Effects

__all__ = ["Effects", "ModeResult", "TracePlan", "TraceResult", "select_pairs", "trace"]

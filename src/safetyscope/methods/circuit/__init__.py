"""The refusal circuit map: every technique on one loaded model, staged, cached and resumable.

``map_circuit(lm, harmful, harmless, out=..., config=MapConfig(...))`` returns a :class:`CircuitMap`.
"""

from .inputs import MapConfig
from .pipeline import CircuitMap, map_circuit

__all__ = ["CircuitMap", "MapConfig", "map_circuit"]

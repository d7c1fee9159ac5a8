"""neurons: safety neurons found (:func:`find_neurons`), ablated (:func:`neuron_ablation`, the :class:`NeuronSet`
artifact) and measured as more are removed (:func:`neuron_fragility`)."""

from .api import (
           AblationResult,
           NeuronReport,
           find_neurons,
           neuron_ablation,
           neuron_analysis,
           neuron_fragility,
)
from .artifact import NeuronSet
from .fragility import FragilityResult

__all__ = ["AblationResult", "FragilityResult", "NeuronReport", "NeuronSet", "find_neurons", "neuron_ablation",
           "neuron_analysis", "neuron_fragility"]

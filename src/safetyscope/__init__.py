"""safetyscope: find, measure and manipulate the components of a chat LLM that carry its refusal behaviour.

``import safetyscope`` stays light (no torch, no transformers): the public names below are resolved on
first use through a module-level ``__getattr__``.

>>> import safetyscope
>>> lm = safetyscope.load_model("default")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__: str = version("safetyscope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

# public name -> submodule that defines it (imported only when the name is first used)
_LAZY: dict[str, str] = {
    # models and mechanics
    "load_model": ".models.loading",
    "ModelLoadError": ".models.loading",
    "LoadedModel": ".models.adapter",
    "Site": ".sites",
    "capture": ".hooks",
    "hooks": ".hooks",
    "forward": ".hooks",
    "verbosity": ".progress",
    # prompts
    "PromptSet": ".prompts.types",
    "load_prompts": ".prompts.loaders",
    "builtin_prompts": ".prompts.builtin",
    # measurement
    "evaluate": ".measure.evaluate",
    # techniques: each returns a frozen result or artifact
    "fit_probes": ".methods.probes.api",
    "find_neurons": ".methods.neurons.api",
    "neuron_fragility": ".methods.neurons.api",
    "trace": ".methods.patching.api",
    "find_direction": ".methods.direction.api",
    "search_direction": ".methods.direction.api",
    "DirectionConfig": ".methods.direction.api",
    "refine_direction": ".methods.direction.refine",
    "map_circuit": ".methods.circuit.pipeline",
    "CircuitMap": ".methods.circuit.pipeline",
    "MapConfig": ".methods.circuit.pipeline",
    # artifacts
    "Direction": ".methods.direction.artifact",
    "NeuronSet": ".methods.neurons.artifact",
    "Probe": ".methods.probes.artifact",
    "load_artifact": ".artifacts.base",
    # defence
    "fit_monitor": ".methods.monitor.api",
    "Monitor": ".methods.monitor.artifact",
    "audit_checkpoint": ".methods.audit.api",
    "audit_runtime": ".methods.audit.api",
    "make_fingerprint": ".methods.audit.fingerprint",
    # targeted fine-tuning
    "finetune": ".methods.finetune.api",
}

__all__ = [
    "CircuitMap",
    "Direction",
    "DirectionConfig",
    "LoadedModel",
    "MapConfig",
    "ModelLoadError",
    "Monitor",
    "NeuronSet",
    "Probe",
    "PromptSet",
    "Site",
    "__version__",
    "audit_checkpoint",
    "audit_runtime",
    "builtin_prompts",
    "capture",
    "evaluate",
    "find_direction",
    "find_neurons",
    "finetune",
    "fit_monitor",
    "fit_probes",
    "forward",
    "hooks",
    "load_artifact",
    "load_model",
    "load_prompts",
    "make_fingerprint",
    "map_circuit",
    "neuron_fragility",
    "refine_direction",
    "search_direction",
    "trace",
    "verbosity",
]

if TYPE_CHECKING:
    from .artifacts.base import load_artifact
    from .hooks import capture, forward, hooks
    from .measure.evaluate import evaluate
    from .methods.direction.artifact import Direction
    from .methods.neurons.artifact import NeuronSet
    from .methods.probes.artifact import Probe
    from .models.adapter import LoadedModel
    from .models.loading import ModelLoadError, load_model
    from .progress import verbosity
    from .prompts.builtin import builtin_prompts
    from .prompts.loaders import load_prompts
    from .prompts.types import PromptSet
    from .sites import Site


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

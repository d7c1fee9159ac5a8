"""Frozen results (safetensors + JSON) with reversible ``apply`` and explicit ``export``."""

from .base import Artifact, ArtifactError, Stack, known_kinds, load_artifact, register
from .checkpoint import Checkpoint

__all__ = ["Artifact", "ArtifactError", "Checkpoint", "Stack", "known_kinds", "load_artifact", "register"]

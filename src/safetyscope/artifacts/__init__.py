"""Frozen results (safetensors + JSON) with reversible ``apply`` and explicit ``export``."""

from .base import Artifact, ArtifactError, Stack, known_kinds, load_artifact, register

__all__ = ["Artifact", "ArtifactError", "Stack", "known_kinds", "load_artifact", "register"]

"""Frozen, serialisable results that can be applied to a model as reversible interventions.

An artifact is a directory: ``artifact.json`` (kind, format version, metadata) plus
``tensors.safetensors``. Never pickle. ``apply(lm)`` is a context manager whose hooks are removed
on exit; ``export(lm, out_dir)`` (where supported) edits a *copy* of the weights and saves a normal
Hugging Face checkpoint. ``safetyscope eval --intervention DIR`` loads any registered kind, and also
such an exported checkpoint (no ``artifact.json``; see :mod:`.checkpoint`), whose ``apply`` swaps its
weights in for the duration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from ..errors import SafetyscopeError
from ..io import atomic_dir, load_tensors, read_json, save_tensors, write_json

FORMAT_VERSION = 1
_REGISTRY: dict[str, type[Artifact]] = {}
A = TypeVar("A", bound="Artifact")


class ArtifactError(SafetyscopeError, ValueError):
    """A missing, malformed or unknown artifact."""


def register(cls: type[A]) -> type[A]:
    """Class decorator: make a kind loadable by :func:`load_artifact`."""
    _REGISTRY[cls.kind] = cls
    return cls


class Artifact(ABC):
    kind: ClassVar[str]
    # False for kinds whose saved directory holds only artifact.json (a pointer); else tensors.safetensors is required
    stores_tensors: ClassVar[bool] = True

    @abstractmethod
    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON metadata, tensors) that fully describe the artifact."""

    @classmethod
    @abstractmethod
    def from_state(cls: type[A], meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> A: ...

    @abstractmethod
    def apply(self, lm: Any) -> AbstractContextManager[None]:
        """Reversible intervention on a LoadedModel (hooks removed on exit)."""

    def validate(self, lm: Any) -> None:
        """Raise a one-line error if the artifact does not fit ``lm`` (called before any measurement)."""
        return None

    def export(self, lm: Any, out_dir: str | Path) -> Path:
        raise ArtifactError(f"{self.kind} artifacts cannot be exported as weights; use apply() (hooks) instead")

    def save(self, path: str | Path) -> Path:
        meta, tensors = self.to_state()
        with atomic_dir(path) as tmp:
            save_tensors(tmp / "tensors.safetensors", tensors)
            write_json(tmp / "artifact.json", {"kind": self.kind, "format": FORMAT_VERSION, **meta})
        return Path(path)

    @classmethod
    def load(cls: type[A], path: str | Path) -> A:
        art = load_artifact(path)
        if not isinstance(art, cls):
            raise ArtifactError(f"{path} holds a {art.kind!r} artifact, not {cls.kind!r}")
        return art


def load_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    meta_path = path / "artifact.json"
    if not meta_path.is_file():
        if (path / "config.json").is_file():  # an edited Hugging Face checkpoint (config.json + model*.safetensors)
            _import_builtin_kinds()  # the checkpoint kind checks the directory itself (one-line errors)
            return _REGISTRY["checkpoint"].from_state({"path": str(path)}, {})
        raise ArtifactError(f"{path} is not an artifact directory (no artifact.json) nor a Hugging Face checkpoint "
                            "(config.json + model*.safetensors); pass a directory saved or exported by safetyscope")
    try:
        meta = read_json(meta_path)
    except ValueError as exc:
        raise ArtifactError(f"{meta_path} is not valid JSON ({exc}); re-create the artifact") from None
    kind = meta.pop("kind", None)
    meta.pop("format", None)
    _import_builtin_kinds()
    if kind not in _REGISTRY:
        raise ArtifactError(f"{path}: unknown artifact kind {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[kind]
    return cls.from_state(meta, _artifact_tensors(path) if cls.stores_tensors else {})


def _artifact_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an artifact directory; one-line errors for a missing or unreadable file."""
    file = path / "tensors.safetensors"
    if not file.is_file():
        raise ArtifactError(f"{file} is missing (the artifact is incomplete); re-create the artifact, "
                            "or copy the whole directory again")
    try:
        return load_tensors(file)
    except Exception as exc:  # a truncated or foreign file (safetensors raises its own error types)
        raise ArtifactError(f"{file} is not a readable safetensors file ({str(exc)[:80]}); re-create the artifact") from None


def known_kinds() -> list[str]:
    _import_builtin_kinds()
    return sorted(_REGISTRY)


# The artifact kinds shipped with safetyscope: each lives beside the technique that makes it, and
# registers when its module is imported. Data, not discovery: a new kind adds a row.
BUILTIN_KINDS: dict[str, str] = {
    "direction": "safetyscope.methods.direction.artifact",
    "neuron_set": "safetyscope.methods.neurons.artifact",
    "probe": "safetyscope.methods.probes.artifact",
    "monitor": "safetyscope.methods.monitor.artifact",
    "checkpoint": "safetyscope.artifacts.checkpoint",  # also loads directories without artifact.json
}


def _import_builtin_kinds() -> None:
    """Import the artifact modules shipped with safetyscope so their kinds register."""
    import importlib

    for module in BUILTIN_KINDS.values():
        importlib.import_module(module)


class Stack(Artifact):
    """Several artifacts applied together (not saved; built by callers)."""

    kind = "stack"

    def __init__(self, parts: list[Artifact]):
        self.parts = parts

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        raise ArtifactError("a stack is not saved; save its parts")

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Stack:
        raise ArtifactError("a stack is not loaded; load its parts")

    def validate(self, lm: Any) -> None:
        for part in self.parts:
            part.validate(lm)

    def apply(self, lm: Any) -> AbstractContextManager[None]:
        from contextlib import ExitStack, contextmanager

        @contextmanager
        def run() -> Iterator[None]:
            with ExitStack() as stack:
                for part in self.parts:
                    stack.enter_context(part.apply(lm))
                yield

        return run()

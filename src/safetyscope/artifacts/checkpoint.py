"""An edited Hugging Face checkpoint as a reversible intervention on the model it was exported from.

``safetyscope direction export`` and the neuron weight export write a normal checkpoint directory
(``config.json`` + ``model*.safetensors``). :class:`Checkpoint` lets such a directory take the
intervention slot of ``safetyscope eval MODEL --intervention DIR``: ``apply(lm)`` swaps the
checkpoint's tensors into ``lm.model`` in place of its parameters, so every measurement compares the
edited weights with the unmodified MODEL that stays loaded as the reference.

Rules:

* safetensors only (never pickle); sharded checkpoints (``model-0000k-of-0000n.safetensors``) work;
* before anything is swapped, the checkpoint's ``model_type``, tensor names and shapes are checked
  against the model (names and shapes are read from the safetensors headers, no data is loaded);
  a mismatch is a one-line :class:`ArtifactError` naming the fix;
* every parameter must be covered: a parameter the checkpoint omits is accepted only when it is tied
  to one it has (a tied unembedding; ``save_pretrained`` writes the shared matrix once);
* tensors are cast to the dtype and moved to the device of the parameter they replace; tying in the
  live model is followed (an omitted alias gets the same new tensor) or broken for the duration
  (the checkpoint brings its own unembedding, e.g. after ``direction export`` untied it);
* on exit (also on errors) the original parameter objects are put back, so the model is
  bit-identical to before and its ties are restored. While applied, the checkpoint's tensors and the
  originals both live on the device (twice the weight memory).

The checkpoint's tokenizer, generation config and any other files are not used.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_dir, read_json, write_json
from .base import FORMAT_VERSION, Artifact, ArtifactError, register

_WEIGHT_GLOB = "model*.safetensors"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
_EDIT_NOTES = ("safetyscope_direction.json", "safetyscope_edit.json")


def weight_files(path: str | Path) -> list[Path]:
    """The ``model*.safetensors`` files of a checkpoint directory (sorted; empty if none)."""
    p = Path(path)
    return sorted(f for f in p.glob(_WEIGHT_GLOB) if f.is_file()) if p.is_dir() else []


def stored_checkpoint(meta: Mapping[str, object]) -> Path | None:
    """The local safetensors checkpoint directory a model was loaded from (``LoadedModel.meta["source"]``), or None
    (a hub id, a .gguf file, pickled weights, a model built in memory)."""
    source = meta.get("source")
    if not isinstance(source, str) or not Path(source).is_dir() or not weight_files(source):
        return None
    return Path(source)


def is_checkpoint_dir(path: str | Path) -> bool:
    """True for a Hugging Face checkpoint directory: ``config.json`` plus ``model*.safetensors``.

    Raises :class:`ArtifactError` for a checkpoint that only has pickled weights.
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    if weight_files(p):
        return True
    if any((p / name).is_file() for name in _PICKLE_NAMES):
        raise ArtifactError(f"{p} holds only pickled weights (pytorch_model.bin), which safetyscope never loads; "
                            "re-save it with save_pretrained(dir, safe_serialization=True)")
    return False


def _headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{tensor name: (file, shape)} from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    if name in out:
                        raise ArtifactError(f"tensor {name!r} is in both {out[name][0].name} and {f.name}; "
                                            "re-export the checkpoint")
                    out[name] = (f, tuple(handle.get_slice(name).get_shape()))
        except ArtifactError:
            raise
        except Exception as exc:  # a truncated or foreign file
            raise ArtifactError(f"{f} is not a readable safetensors file ({exc}); re-export the checkpoint") from None
    return out


def _slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, str]]:
    """{name: (owning module, attribute, "param" | "buffer")} for every parameter alias and buffer."""
    out: dict[str, tuple[nn.Module, str, str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in module._parameters.items():
            if p is not None:
                out[prefix + attr] = (module, attr, "param")
        for attr, b in module._buffers.items():
            if b is not None:
                out[prefix + attr] = (module, attr, "buffer")
    return out


def _current(slot: tuple[nn.Module, str, str]) -> torch.Tensor:
    module, attr, kind = slot
    t = (module._parameters if kind == "param" else module._buffers)[attr]
    assert t is not None
    return t


def _embedding_names(model: Any) -> tuple[str | None, str | None]:
    """(input embedding weight name, output embedding weight name) of a HF model, where it has them."""
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    in_name = f"{names[id(inp)]}.weight" if inp is not None and id(inp) in names else None
    out_name = f"{names[id(out)]}.weight" if out is not None and id(out) in names else None
    return in_name, out_name


@register
class Checkpoint(Artifact):
    """A Hugging Face checkpoint directory applied by swapping its tensors into the model's parameters."""

    kind = "checkpoint"
    stores_tensors = False  # a saved checkpoint artifact is a pointer (artifact.json) to the directory

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_checkpoint_dir(self.path):
            raise ArtifactError(f"{self.path} is not a Hugging Face checkpoint (config.json + model*.safetensors); "
                                "pass a directory written by `safetyscope direction export` or save_pretrained")
        try:
            self.config: dict[str, Any] = read_json(self.path / "config.json")
        except ValueError as exc:
            raise ArtifactError(f"{self.path / 'config.json'} is not valid JSON ({exc}); re-export the checkpoint") from None
        self.note: dict[str, Any] = {}
        for name in _EDIT_NOTES:  # what safetyscope wrote next to the weights (source model, edit kind)
            if (self.path / name).is_file():
                with suppress(ValueError):
                    self.note = {"file": name, **read_json(self.path / name)}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    # ---- a saved artifact is a pointer to the directory ------------------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"path": str(self.path.resolve())}, {}

    def save(self, path: str | Path) -> Path:
        """Write a small pointer artifact (``artifact.json`` naming this directory; no tensors)."""
        meta, _ = self.to_state()
        with atomic_dir(path) as tmp:
            write_json(tmp / "artifact.json", {"kind": self.kind, "format": FORMAT_VERSION, **meta})
        return Path(path)

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Checkpoint:
        if "path" not in meta:
            raise ArtifactError("checkpoint artifact without a 'path'; pass the checkpoint directory itself")
        return cls(meta["path"])

    # ---- validation ------------------------------------------------------------------------------
    def _fix(self) -> str:
        source = self.note.get("source_model")
        base = f"the model it was exported from ({source})" if source else "the model it was exported from"
        return f"evaluate it against {base}: safetyscope eval BASE_MODEL --intervention {self.path}"

    def plan(self, model: nn.Module) -> tuple[dict[str, tuple[Path, tuple[int, ...]]], dict[str, str]]:
        """Check the checkpoint against ``model``; returns (its tensors' headers, {omitted alias: source name}).

        Raises :class:`ArtifactError` (one line, with the fix) on another architecture or size.
        """
        ck_type = self.config.get("model_type")
        live_type = getattr(getattr(model, "config", None), "model_type", None)
        if ck_type and live_type and ck_type != live_type:
            raise ArtifactError(f"{self.path} is a {ck_type} checkpoint but the model is {live_type}; {self._fix()}")
        headers = _headers(weight_files(self.path))
        slots = _slots(model)
        unknown = sorted(set(headers) - set(slots))
        if unknown:
            raise ArtifactError(f"{self.path} does not fit this model: it has {len(unknown)} tensor(s) the model lacks "
                                f"(e.g. {unknown[0]!r}); {self._fix()}")
        bad = [(n, shape, tuple(_current(slots[n]).shape)) for n, (_, shape) in sorted(headers.items())
               if shape != tuple(_current(slots[n]).shape)]
        if bad:
            name, ck, live = bad[0]
            raise ArtifactError(f"{self.path} does not fit this model: {name} is {list(ck)} in the checkpoint but "
                                f"{list(live)} in the model ({len(bad)} mismatched tensor(s)); {self._fix()}")
        aliases = self._aliases(model, headers)
        return headers, aliases

    @staticmethod
    def _aliases(model: nn.Module, headers: dict[str, Any]) -> dict[str, str]:
        """{parameter name the checkpoint omits: checkpoint name whose tensor it takes}; raises for gaps."""
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        aliases: dict[str, str] = {}
        missing: list[str] = []
        for names in groups.values():
            present = [n for n in names if n in headers]
            for n in names:
                if n not in headers:
                    if present:
                        aliases[n] = present[0]  # tied in the live model: share the new tensor
                    else:
                        missing.append(n)
        in_name, out_name = _embedding_names(model)
        if out_name in missing and in_name in headers:  # a tied checkpoint applied to an untied model
            assert out_name is not None and in_name is not None
            if tuple(headers[in_name][1]) == tuple(_current(_slots(model)[out_name]).shape):
                missing.remove(out_name)
                aliases[out_name] = in_name
        if missing:
            raise ArtifactError(f"the checkpoint lacks {len(missing)} of the model's parameters (e.g. {missing[0]!r}), "
                                "so it is not a full checkpoint of this model; re-export it with save_pretrained")
        return aliases

    def validate(self, lm: Any) -> None:
        self.plan(lm.model)

    # ---- the intervention --------------------------------------------------------------------------
    def apply(self, lm: Any) -> AbstractContextManager[None]:
        return self._swapped(lm.model)

    @contextmanager
    def _swapped(self, model: nn.Module) -> Iterator[None]:
        from safetensors import safe_open

        headers, aliases = self.plan(model)  # everything is checked before the model is touched
        slots = _slots(model)
        saved: list[tuple[nn.Module, str, str, torch.Tensor]] = []
        new: dict[str, torch.Tensor] = {}

        def put(name: str, value: torch.Tensor) -> None:
            module, attr, kind = slots[name]
            store = module._parameters if kind == "param" else module._buffers
            saved.append((module, attr, kind, store[attr]))  # type: ignore[arg-type]
            store[attr] = value  # type: ignore[assignment]

        try:
            by_file: dict[Path, list[str]] = {}
            for name, (f, _) in headers.items():
                by_file.setdefault(f, []).append(name)
            with torch.no_grad():
                for f, names in by_file.items():
                    with safe_open(str(f), framework="pt") as handle:
                        for name in names:
                            orig = _current(slots[name])  # same shape (checked in plan)
                            t = handle.get_tensor(name).to(device=orig.device, dtype=orig.dtype)
                            if slots[name][2] == "param":
                                t = nn.Parameter(t, requires_grad=orig.requires_grad)
                            new[name] = t
                            put(name, t)
                for name, source in aliases.items():
                    put(name, new[source])
            yield
        finally:
            for module, attr, kind, orig in reversed(saved):
                (module._parameters if kind == "param" else module._buffers)[attr] = orig  # type: ignore[assignment]

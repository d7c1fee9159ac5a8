"""Where the audited tensors come from, and what each one does in the architecture.

A :class:`TensorSource` reads one tensor at a time, either from a checkpoint directory's
``model*.safetensors`` files (never pickle; names, shapes and dtypes come from the headers, so two
checkpoints are compared without holding both in memory) or from a loaded model's state dict.

:func:`roles` names each parameter's role from the architecture table (``embed``, ``writers``,
``mlp_in``, ``mlp_out_proj``, ``unembed`` in ``models/architectures.toml``), never from the model's
name: which axis is the residual stream (d_model) and which axis indexes MLP neurons.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from ...artifacts.base import ArtifactError
from ...artifacts.checkpoint import is_checkpoint_dir, weight_files
from ...io import read_json
from ...models.adapter import LoadedModel
from ...models.arch import ArchTable, Dims, table_for

Role = Literal["embed", "writer", "mlp_in", "mlp_out", "attn_in", "unembed", "other"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


class AuditInputError(ValueError):
    """A checkpoint or reference that cannot be audited; the message names the fix."""


@dataclass(frozen=True)
class TensorRole:
    """A parameter's role. ``resid_axis``: the axis of length d_model that reads or writes the residual
    stream (None when it has none); ``neuron_axis``: the axis indexing MLP neurons (mlp_in / mlp_out)."""

    role: Role
    layer: int | None
    resid_axis: int | None
    neuron_axis: int | None = None


class TensorSource:
    """Tensors by name from a checkpoint directory or a loaded model (float32 on the CPU on read)."""

    def __init__(self, label: str, config: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, torch.dtype], files: dict[str, Path] | None = None,
                 state: dict[str, torch.Tensor] | None = None):
        self.label = label
        self.config = config
        self.shapes = shapes
        self.dtypes = dtypes
        self._files = files or {}
        self._state = state
        self.table: ArchTable = table_for(str(config.get("model_type")))
        self.dims = Dims.from_config(self.table, SimpleNamespace(**config))

    @classmethod
    def from_dir(cls, path: str | Path) -> TensorSource:
        """Read headers only; raises :class:`AuditInputError` for pickle-only, missing or truncated files."""
        from safetensors import safe_open

        p = Path(path)
        if not p.exists():
            raise AuditInputError(f"checkpoint {p} not found; give a Hugging Face checkpoint directory")
        try:
            ok = is_checkpoint_dir(p)
        except ArtifactError as exc:  # pickle-only
            raise AuditInputError(str(exc)) from None
        if not ok:
            raise AuditInputError(f"{p} is not a Hugging Face checkpoint (config.json + model*.safetensors); "
                                  "pass a directory written by save_pretrained(dir, safe_serialization=True)")
        try:
            config = read_json(p / "config.json")
        except ValueError as exc:
            raise AuditInputError(f"{p / 'config.json'} is not valid JSON ({exc}); re-save the checkpoint") from None
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, torch.dtype] = {}
        files: dict[str, Path] = {}
        for f in weight_files(p):
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                        sl = handle.get_slice(name)
                        shapes[name] = tuple(sl.get_shape())
                        dtypes[name] = _ST_DTYPES.get(sl.get_dtype(), torch.float32)
                        files[name] = f
            except Exception as exc:  # a truncated or foreign file
                raise AuditInputError(f"{f} is not a readable safetensors file ({type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else ''}); re-download or re-save it") from None
        return cls(str(p), config, shapes, dtypes, files=files)

    @classmethod
    def from_model(cls, lm: LoadedModel) -> TensorSource:
        state = {k: v.detach() for k, v in lm.model.state_dict().items()}
        config = lm.model.config.to_dict()
        return cls(lm.name, config, {k: tuple(v.shape) for k, v in state.items()},
                   {k: v.dtype for k, v in state.items()}, state=state)

    def names(self) -> list[str]:
        return sorted(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        """The tensor in float32 on the CPU."""
        if self._state is not None:
            return self._state[name].to("cpu", torch.float32)
        from safetensors import safe_open

        try:
            with safe_open(str(self._files[name]), framework="pt") as handle:
                return handle.get_tensor(name).to(torch.float32)
        except Exception as exc:
            raise AuditInputError(f"{self._files[name]}: tensor {name!r} cannot be read ({type(exc).__name__}); "
                                  "the file is truncated or corrupt: re-download or re-save it") from None

    def tied_alias(self, name: str) -> str | None:
        """For an unembedding the checkpoint omits because it is tied to the embedding: the embedding's name."""
        unembed, embed = f"{self.table.unembed}.weight", f"{self.table.embed}.weight"
        tied = bool(self.config.get("tie_word_embeddings", True))
        return embed if tied and name == unembed and name not in self.shapes and embed in self.shapes else None


def _template_names(table: ArchTable, templates: tuple[str, ...], n_layers: int) -> dict[str, int]:
    return {f"{table.expand(t, layer)}.weight": layer for t in templates if t for layer in range(n_layers)}


def roles(table: ArchTable, dims: Dims, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorRole]:
    """The role of every 2-D parameter named in ``shapes`` (others: ``other``), from the architecture table."""
    n = dims.n_layers
    writers = _template_names(table, table.writers, n)
    mlp_in = _template_names(table, table.mlp_in, n)
    mlp_out = _template_names(table, (table.mlp_out_proj,), n)
    attn_in = _template_names(table, table.attn_in, n)
    out: dict[str, TensorRole] = {}
    lin_resid_out, lin_resid_in = (1, 0) if table.conv1d else (0, 1)  # Linear: [out, in]; Conv1D: [in, out]
    for name, shape in shapes.items():
        if len(shape) != 2:
            out[name] = TensorRole("other", None, None)
        elif name == f"{table.embed}.weight":
            out[name] = TensorRole("embed", None, 1)  # [vocab, d_model]
        elif name == f"{table.unembed}.weight":
            out[name] = TensorRole("unembed", None, 1)  # [vocab, d_model]
        elif name in writers:
            neuron = lin_resid_in if name in mlp_out else None
            out[name] = TensorRole("mlp_out" if name in mlp_out else "writer", writers[name], lin_resid_out, neuron)
        elif name in mlp_in:
            out[name] = TensorRole("mlp_in", mlp_in[name], lin_resid_in, lin_resid_out)
        elif name in mlp_out:
            out[name] = TensorRole("mlp_out", mlp_out[name], lin_resid_out, lin_resid_in)
        elif name in attn_in:  # q/k/v (or a fused qkv): reads the residual stream
            out[name] = TensorRole("attn_in", attn_in[name], lin_resid_in)
        else:
            out[name] = TensorRole("other", None, None)
    for name, role in out.items():
        if role.resid_axis is not None and shapes[name][role.resid_axis] != dims.d_model:
            raise AuditInputError(f"{name} has shape {list(shapes[name])}, whose axis {role.resid_axis} is not d_model "
                                  f"{dims.d_model}; fix the {table.family} architecture table (--arch-table)")
    return out


def writes_residual(role: TensorRole) -> bool:
    """Embeddings and the table's residual writers (attention and MLP output projections)."""
    return role.role in ("embed", "writer") or (role.role == "mlp_out" and role.resid_axis is not None)

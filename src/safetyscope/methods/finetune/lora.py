"""A hand-rolled LoRA baseline (no peft dependency): low-rank updates on every attention and MLP projection.

``W x`` becomes ``W x + (alpha / rank) B A x`` with ``A`` [rank, in] random (seeded, scaled by
1/sqrt(in)) and ``B`` [out, rank] zero, through forward hooks removed on exit; the model's own
parameters stay frozen. :meth:`Lora.merged` returns the merged weights ``W + (alpha / rank) B A``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...models.adapter import LoadedModel


def lora_targets(lm: LoadedModel) -> list[str]:
    """Module paths of every attention / MLP projection the architecture table names, in block order."""
    t = lm.table
    out: list[str] = []
    for layer in range(lm.n_layers):
        for tpl in (*t.attn_in, t.attn_out_proj, *t.mlp_in, t.mlp_out_proj):
            if tpl:
                out.append(t.expand(tpl, layer))
    return out


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{type(m).__name__} has no weight tensor; fix the architecture table")
    return w


@dataclass
class Lora:
    lm: LoadedModel
    modules: dict[str, nn.Module]
    a: dict[str, torch.Tensor]  # [rank, in]
    b: dict[str, torch.Tensor]  # [out, rank]
    scale: float

    @property
    def params(self) -> list[torch.Tensor]:
        return [t for name in self.modules for t in (self.a[name], self.b[name])]

    @property
    def n_trainable(self) -> int:
        return sum(t.numel() for t in self.params)

    def merged(self) -> dict[str, torch.Tensor]:
        """parameter name -> merged weight (detached, on the weight's device)."""
        out = {}
        with torch.no_grad():
            for name, m in self.modules.items():
                delta = self.scale * (self.b[name] @ self.a[name])  # [out, in]
                w = _weight(m)
                out[f"{name}.weight"] = (w + (delta.T if self.lm.table.conv1d else delta).to(w.dtype)).detach().clone()
        return out


@contextmanager
def lora(lm: LoadedModel, rank: int = 8, alpha: float = 16.0, seed: int = 0) -> Iterator[Lora]:
    """LoRA adapters on every projection of ``lm`` while the block runs (hooks removed on exit)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, not {rank}")
    g = torch.Generator().manual_seed(seed)
    mods: dict[str, nn.Module] = {p: lm.model.get_submodule(p) for p in lora_targets(lm)}
    a, b = {}, {}
    for name, m in mods.items():
        w = _weight(m)
        d_in, d_out = (w.shape[0], w.shape[1]) if lm.table.conv1d else (w.shape[1], w.shape[0])
        a[name] = (torch.randn(rank, d_in, generator=g) / d_in**0.5).to(w.device, w.dtype).requires_grad_(True)
        b[name] = torch.zeros(d_out, rank, device=w.device, dtype=w.dtype, requires_grad=True)
    state = Lora(lm, mods, a, b, alpha / rank)
    handles = []

    def make(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]  # [batch, pos, in]
            return output + (x @ a[name].T @ b[name].T) * state.scale

        return hook

    try:
        for name, m in mods.items():
            handles.append(m.register_forward_hook(make(name)))
        yield state
    finally:
        for h in handles:
            h.remove()

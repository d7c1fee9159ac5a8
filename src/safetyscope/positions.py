"""Token batches and position selection (done inside hooks, so only selected positions are kept).

Positions:
  ``last``              the last token (the end of the chat template, where the reply starts)
  ``post_instruction``  every template token after the user's message (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``)
  ``mean``              mean over the prompt's real (non-pad) tokens
  ``all``               every position (pads included; use ``Batch.attention_mask``)
  ``-1,-3`` / [-1, -3]  explicit negative offsets from the end (left padding makes these aligned)
Selected activations always have shape ``[batch, k, *site_shape]`` (k = 1 for last and mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .errors import SafetyscopeError

NAMED_POSITIONS = ("last", "post_instruction", "mean", "all")
PositionSpec = str | Sequence[int]


class PositionError(SafetyscopeError, ValueError):
    """An unknown position name or offset."""


@dataclass(frozen=True)
class Batch:
    """A left-padded batch of chat-formatted prompts."""

    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    n_post: int  # post-instruction template tokens at the end of every row
    texts: tuple[str, ...] = ()
    index: tuple[int, ...] = ()  # positions of these prompts in the caller's list
    extra: dict = field(default_factory=dict)

    @property
    def position_ids(self) -> torch.Tensor:  # [batch, pos]
        """Positions counted from each row's first real token (needed for absolute-position models)."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device))

    def select(self, rows: Sequence[int]) -> Batch:
        """A sub-batch (rows keep the left padding of the full batch)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return replace(
            self,
            input_ids=self.input_ids[idx.to(self.input_ids.device)],
            attention_mask=self.attention_mask[idx.to(self.attention_mask.device)],
            texts=tuple(self.texts[i] for i in rows) if self.texts else (),
            index=tuple(self.index[i] for i in rows) if self.index else (),
        )


def parse_positions(spec: PositionSpec) -> str | tuple[int, ...]:
    if isinstance(spec, str):
        if spec in NAMED_POSITIONS:
            return spec
        try:
            spec = [int(p) for p in spec.split(",")]
        except ValueError:
            raise PositionError(
                f"unknown position {spec!r}; use {', '.join(NAMED_POSITIONS)} or negative offsets like -1,-2"
            ) from None
    offsets = tuple(int(p) for p in spec)
    if not offsets or any(p >= 0 for p in offsets):
        raise PositionError(f"explicit positions must be negative offsets from the end (e.g. -1,-2), got {offsets}")
    return offsets


def offsets_for(spec: str | tuple[int, ...], batch: Batch) -> tuple[int, ...] | None:
    """The negative offsets a spec selects in this batch, or None for ``mean``/``all``."""
    if spec == "last":
        return (-1,)
    if spec == "post_instruction":
        return tuple(range(-batch.n_post, 0))
    if isinstance(spec, tuple):
        if -min(spec) > batch.seq_len:
            raise PositionError(f"offset {min(spec)} is beyond the sequence length {batch.seq_len}")
        return spec
    return None


def select_positions(x: torch.Tensor, spec: str | tuple[int, ...], batch: Batch) -> torch.Tensor:
    """x: [batch, pos, *rest] -> [batch, k, *rest] for the positions a spec selects."""
    offsets = offsets_for(spec, batch)
    if offsets is not None:
        idx = torch.tensor([x.shape[1] + o for o in offsets], device=x.device)
        return x.index_select(1, idx)
    if spec == "all":
        return x
    mask = batch.attention_mask.to(x.device).bool()  # [batch, pos]
    mask = mask.view(*mask.shape, *([1] * (x.dim() - 2)))
    total = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1, keepdim=True)
    return total / mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)

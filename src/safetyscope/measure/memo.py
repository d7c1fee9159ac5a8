"""The unmodified model's first-token logits, kept per prompt for the steps of one session that need them again.

A direction search filters its prompts by the model's first reply token, scores candidates against the
unmodified harmless logits, and refinement then needs the same logits as its KL reference: on the default
model that is three forward passes over the same prompts. A :class:`LogitsMemo` passed to those steps
(``search_direction(..., memo=m)``, ``refine_direction(..., memo=m)``) runs each prompt once.

The memo is explicit (nothing is kept unless one is passed) and guarded: it belongs to one loaded model,
every entry is keyed by the model's weights (storage and in-place version of every parameter and buffer, as
:func:`safetyscope.prefix.weights_key`), the system prompt and the prompt, and :func:`last_logits` reads or
fills it only while no hook that could change the logits is on the model (an intervention, an undeclared
hook). Entries are float32 CPU tensors [vocab]: prompts x vocab x 4 bytes of host memory for the memo's life
(a search on the default model's 256 + 64 built-in prompts: about 190 MB).
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Sequence

import torch

from ..models.adapter import LoadedModel
from ..prefix import active_policies, weights_key


class LogitsMemo:
    """First-token logits of the unmodified model per (weights, system prompt, prompt); see the module docstring."""

    def __init__(self, lm: LoadedModel):
        self._model = weakref.ref(lm.model)
        self._rows: dict[tuple[Hashable, str | None, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def usable(self, lm: LoadedModel) -> bool:
        """True when ``lm`` is this memo's model and no hook on it may change its logits."""
        model: torch.nn.Module = lm.model
        if self._model() is not model:
            raise ValueError("this LogitsMemo was made for another model; make one per loaded model")
        policies = active_policies(model)
        return policies is not None and all(p.kind == "neutral" for p in policies)

    def get(self, lm: LoadedModel, prompts: Sequence[str], system: str | None) -> list[torch.Tensor | None]:
        """The kept logits [vocab] of each prompt (None where there are none)."""
        state = weights_key(lm.model)
        return [self._rows.get((state, system, p)) for p in prompts]

    def lookup(self, lm: LoadedModel, prompts: Sequence[str], system: str | None) -> torch.Tensor | None:
        """[n, vocab]: every prompt's kept logits, or None unless all are kept and the memo is usable now."""
        rows = self.get(lm, prompts, system) if self.usable(lm) else [None]
        return None if any(r is None for r in rows) else torch.stack([r for r in rows if r is not None])

    def put(self, lm: LoadedModel, prompts: Sequence[str], system: str | None, logits: torch.Tensor) -> None:
        """Keep ``logits`` [n, vocab] of the unmodified model for ``prompts`` (the caller vouches for "unmodified")."""
        state = weights_key(lm.model)
        rows = logits.detach().float().cpu()
        for p, row in zip(prompts, rows):
            self._rows[(state, system, p)] = row.clone()


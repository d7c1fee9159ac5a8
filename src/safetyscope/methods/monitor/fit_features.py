"""The monitor's features: ``resid_pre`` of every block at the instruction's last token and at the
post-instruction template tokens, plus the first reply token's logit refusal score, in one forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...hooks import capture, forward
from ...measure.metrics import refusal_score
from ...models.adapter import LoadedModel
from ...positions import Batch
from ...prompts.chat import post_instruction_length
from ...runner import batched
from ...sites import Site


@dataclass(frozen=True)
class Features:
    """Per prompt: ``resid_pre`` of each block at the instruction's last token and the post-instruction tokens."""

    x: np.ndarray  # [n_prompts, n_layers, 1 + n_post, d_model] float32 (offset -(n_post+1) .. -1)
    refusal: np.ndarray  # [n_prompts] logit refusal score of the first reply token
    layers: tuple[int, ...]

    cache: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def at(self, position: str) -> np.ndarray:
        """[n, n_layers, d_model] float64 at ``inst`` (instruction's last token) or ``post`` (mean of the template);
        computed once per position (treat it as read-only)."""
        if position not in self.cache:
            x = self.x[:, :, 0] if position == "inst" else self.x[:, :, 1:].astype(np.float64).mean(2)
            self.cache[position] = np.asarray(x, dtype=np.float64)
        return self.cache[position]


def collect(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], *, batch_size: int, system: str | None,
            token_ids: Sequence[int]) -> Features:
    """Features of ``texts`` (one forward pass per batch; every block from the same pass)."""
    n_post = post_instruction_length(lm.tokenizer, system)
    sites = [Site("resid_pre", int(layer)) for layer in layers]
    offsets = tuple(range(-(n_post + 1), 0))
    x = np.empty((len(texts), len(sites), len(offsets), lm.dims.d_model), dtype=np.float32)
    ref = np.empty(len(texts), dtype=np.float64)

    def step(batch: Batch) -> tuple[dict[Site, torch.Tensor], torch.Tensor]:
        with torch.inference_mode(), capture(lm, sites, offsets, to_cpu=True) as cap:
            logits = forward(lm, batch, last_only=True)[:, -1].float().cpu()  # [batch, vocab]
        cap.check_finite()
        return dict(cap.values), refusal_score(logits, token_ids, dtype=torch.float64)

    for batch, (values, scores) in batched(lm, list(texts), step, batch_size=batch_size, system=system,
                                           description="monitor features"):
        rows = list(batch.index)
        for j, s in enumerate(sites):
            x[rows, j] = values[s].float().numpy()  # [batch, 1 + n_post, d_model]
        ref[rows] = scores.numpy()
    return Features(x, ref, tuple(int(v) for v in layers))

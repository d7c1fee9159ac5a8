"""Retain by distillation: keep the starting model's next-token distribution on the retain rows.

The default retain loss is cross-entropy on the retain replies, which are the model's own greedy
replies. Minimising it makes the model *more* certain of what it already says: the retain rows pull
the distribution sharper, which costs perplexity on other text even when every retain reply stays the
same. ``retain_loss="kl"`` replaces it by KL(start || current) at every real position of the retain
rows (prompt and reply tokens), against the starting model's top-``k`` next-token probabilities (the
rest of the vocabulary as one bucket), recorded once before training. The retain rows then hold the
model to where it started instead of pulling it somewhere new.

The top-``k`` record is exact on its support and keeps the tail's total mass, so the loss is the KL
between the two distributions coarsened to ``k + 1`` outcomes: never negative, zero when the model has
not changed, and a lower bound of the full KL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TOPK = 32  # next-token outcomes recorded per position (plus the tail)


@dataclass(frozen=True)
class Reference:
    """The starting model's top-``k`` next-token log-probabilities at every real position of one row."""

    ids: torch.Tensor   # [len, k] token ids
    logp: torch.Tensor  # [len, k] their log-probabilities (float32)


def record(logits: torch.Tensor, lengths: Sequence[int], k: int = TOPK) -> list[Reference]:
    """References of left-padded rows: logits [batch, pos, vocab], ``lengths[i]`` real tokens at the right of row i."""
    out = []
    for i, n in enumerate(lengths):
        logp = torch.log_softmax(logits[i, logits.shape[1] - n:].float(), dim=-1)  # [len, vocab]
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        out.append(Reference(top.indices.cpu(), top.values.cpu()))
    return out


def _log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp))) over the last axis, kept finite when the recorded mass is ~1."""
    total = torch.logsumexp(logp, dim=-1).clamp(max=-1e-6)  # log of the recorded mass, < 0
    return torch.log(-torch.expm1(total))


def kl_to_reference(logits: torch.Tensor, refs: Sequence[Reference]) -> torch.Tensor:
    """Mean over the rows' real positions of KL(reference || model) on the top-k support plus the tail.

    ``logits`` [batch, pos, vocab] of left-padded rows; ``refs[i]`` covers the last ``len`` positions of row i.
    """
    terms = []
    for i, ref in enumerate(refs):
        n = ref.ids.shape[0]
        q = torch.log_softmax(logits[i, logits.shape[1] - n:].float(), dim=-1)   # [len, vocab]
        p_log = ref.logp.to(q.device)                                            # [len, k]
        q_log = q.gather(-1, ref.ids.to(q.device))                               # [len, k]
        head = (p_log.exp() * (p_log - q_log)).sum(-1)                            # [len]
        p_tail, q_tail = _log1mexp(p_log), _log1mexp(q_log)                       # [len]
        terms.append(head + p_tail.exp() * (p_tail - q_tail))
    return torch.cat(terms).mean()

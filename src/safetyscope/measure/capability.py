"""Capability damage: KL divergence to the unmodified model and cross-entropy / perplexity on text.

*KL on replies.* The reference (unmodified) model answers each prompt greedily; that reply is then
teacher-forced through the reference and through the modified model (the intervention applied), and
``KL(P_ref || P_mod)`` of the next-token distributions is read at every position that predicts a reply
token: the first one is the first response position (the end of the chat template), the last one
predicts the reply's stop token (when the reply stopped before the token cap). Reported: the mean KL
at the first response token, and the mean over all reply tokens (token-weighted), plus per-prompt values.

Teacher forcing mirrors generation exactly: the prompt runs first (with the prompt :class:`Batch`
published to the hooks, as in ``generate``), then the reply tokens run on the KV cache in chunks
shorter than the prompt, so position-specific edits (which check ``x.shape[1] == batch.seq_len``)
fire on the prompt only, and position-agnostic edits fire on every token, as they do while generating.

*Cross-entropy.* Plain text (no chat template) in token rows: the built-in capability passages
(:func:`safetyscope.prompts.capability_texts`, one row each) or a user text file cut into windows.
The reference and the modified model see the same rows in the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from ..hooks import forward, last_position, running
from ..models.adapter import LoadedModel
from ..positions import Batch
from ..prefix import cache_keyword
from ..prompts.chat import pad_token_id
from ..runner import batched, sharded_backoff
from .compare import Intervention, enter
from .generation import continue_batch, stop_ids
from .metrics import kl_divergence, perplexity, token_cross_entropy

__all__ = [
    "CrossEntropy", "KLResult", "capability_rows", "compare_cross_entropy", "cross_entropy", "decode_reply",
    "file_rows", "generate_batch_ids", "generate_batch_with_logits", "generate_ids", "generate_with_logits",
    "reply_cross_entropy", "reply_kl", "teacher_forced_logits",
]

# ---- the reference model's own replies, as token ids ----------------------------------------------
def _trim(row: Sequence[int], stops: set[int]) -> list[int]:
    """Generated ids up to and including the first stop token."""
    out: list[int] = []
    for tid in row:
        out.append(int(tid))
        if int(tid) in stops:
            break
    return out


def generate_batch_with_logits(lm: LoadedModel, batch: Batch, max_new_tokens: int = 64) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy reply ids for one prompt batch and the logits of the first step, ``[batch, vocab]``.

    Reply ids keep the stop token when reached and drop the pads; the first-step logits are the
    next-token logits at the first response position (what the logit refusal score reads), so the
    score comes with the generation at no extra forward pass.
    """
    first: list[torch.Tensor] = []
    new = continue_batch(lm, batch, max_new_tokens, first=first).tolist()  # [batch, <= max_new_tokens]; NaN checked
    return [_trim(row, set(stop_ids(lm))) for row in new], first[0]


def generate_batch_ids(lm: LoadedModel, batch: Batch, max_new_tokens: int = 64) -> list[list[int]]:
    """Greedy reply ids for one prompt batch (stop token kept when reached, pads dropped)."""
    return generate_batch_with_logits(lm, batch, max_new_tokens)[0]


def generate_with_logits(
    lm: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8, system: str | None = None
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy reply ids per prompt (prompts' order) and first-step logits ``[n_prompts, vocab]`` (CPU).

    Apply interventions around the call. ``decode_reply(lm, ids)`` is the text ``generate`` returns.
    """
    rows: list[list[int]] = [[] for _ in prompts]
    first: dict[int, torch.Tensor] = {}
    for batch, (ids, logits) in batched(lm, prompts, lambda b: generate_batch_with_logits(lm, b, max_new_tokens),
                                        batch_size=batch_size, system=system, description="generating"):
        for j, i in enumerate(batch.index):
            rows[i], first[i] = ids[j], logits[j]
    return rows, torch.stack([first[i] for i in range(len(prompts))])


def generate_ids(
    lm: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8, system: str | None = None
) -> list[list[int]]:
    """Greedy reply token ids per prompt, in the prompts' order (apply interventions around the call)."""
    return generate_with_logits(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)[0]


def decode_reply(lm: LoadedModel, ids: Sequence[int]) -> str:
    return str(lm.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()


# ---- teacher forcing ------------------------------------------------------------------------------
def teacher_forced_logits(lm: LoadedModel, batch: Batch, replies: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at every position that predicts a reply token, as during generation.

    Returns ``(logits [batch, T, vocab] float32 on CPU, mask [batch, T] bool)`` with ``T`` the longest
    reply; ``logits[:, t]`` is the distribution over reply token ``t`` (``t = 0``: the first response
    position). Rows with an empty reply get only the first position (a reply always has >= 1 token).
    """
    if len(replies) != len(batch):
        raise ValueError(f"{len(replies)} replies for a batch of {len(batch)} prompts")
    batch = batch.to(lm.input_device)
    dev = batch.input_ids.device
    width = max(1, max(len(r) for r in replies))
    pad = pad_token_id(lm.tokenizer)
    reply = torch.full((len(batch), width), pad, dtype=torch.long, device=dev)  # [batch, T]
    rmask = torch.zeros((len(batch), width), dtype=torch.long, device=dev)    # [batch, T]
    for i, r in enumerate(replies):
        if r:
            reply[i, : len(r)] = torch.tensor(list(r), dtype=torch.long, device=dev)
            rmask[i, : len(r)] = 1
    mask_out = rmask.bool().cpu()
    mask_out[:, 0] = True
    model = cast(Any, lm.model)
    with running(batch), torch.inference_mode():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=True, logits_to_keep=last_position())
        pieces = [out.logits[:, -1:].float().cpu()]                          # [batch, 1, vocab]
        key = cache_keyword(lm.model)  # the KV cache's keyword, also the output field that returns it
        cache, attn = out[key], batch.attention_mask
        n_real = batch.attention_mask.sum(1, keepdim=True)                   # [batch, 1]
        chunk = max(1, batch.seq_len - 1)  # shorter than the prompt: position-specific edits stay off
        for start in range(0, width - 1, chunk):  # feed r_0 .. r_{T-2}; they predict r_1 .. r_{T-1}
            stop = min(start + chunk, width - 1)
            attn = torch.cat([attn, rmask[:, start:stop]], 1)
            pos = n_real + torch.arange(start, stop, device=dev)              # [batch, chunk]
            out = model(input_ids=reply[:, start:stop], attention_mask=attn, position_ids=pos,
                        use_cache=True, **{key: cache})
            cache = out[key]
            pieces.append(out.logits.float().cpu())                          # [batch, chunk, vocab]
    return torch.cat(pieces, 1), mask_out


# ---- KL on the reference model's replies -----------------------------------------------------------
@dataclass
class KLResult:
    """KL(P_ref || P_mod) in nats on the reference model's greedy replies."""

    first_token: float              # mean over prompts, at the first response position
    reply_tokens: float             # mean over all reply tokens of all prompts (token-weighted)
    per_prompt_first: list[float]
    per_prompt_reply: list[float]   # mean over each prompt's reply tokens
    n_prompts: int
    n_tokens: int
    replies: list[list[int]] = field(default_factory=list, repr=False)  # the reference reply ids

    def summary(self) -> dict[str, float | int]:
        return {"first_token": self.first_token, "reply_tokens": self.reply_tokens,
                "max_prompt_reply": max(self.per_prompt_reply, default=math.nan),
                "n_prompts": self.n_prompts, "n_tokens": self.n_tokens}


def reply_kl(
    lm: LoadedModel,
    prompts: Sequence[str],
    intervention: Intervention | None,
    *,
    replies: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system: str | None = None,
) -> KLResult:
    """KL between the unmodified model and the model under ``intervention`` on its own replies.

    ``replies``: reference reply ids per prompt (from :func:`generate_ids` without intervention);
    generated here when omitted. The intervention is entered once per batch.
    """
    firsts: dict[int, float] = {}
    sums: dict[int, tuple[float, int]] = {}
    refs: dict[int, list[int]] = {}

    def step(batch: Batch) -> list[tuple[float, tuple[float, int], list[int]]]:
        ids = ([list(replies[i]) for i in batch.index] if replies is not None
               else generate_batch_ids(lm, batch, max_new_tokens))
        ref, mask = teacher_forced_logits(lm, batch, ids)                    # [batch, T, vocab], [batch, T]
        with enter(lm, intervention):
            new, _ = teacher_forced_logits(lm, batch, ids)
        rows = []
        for row in range(len(batch.index)):  # row by row: keeps the float32 temporaries small
            kl = kl_divergence(ref[row], new[row], mask[row])                 # [T]
            rows.append((float(kl[0]), (float(kl.sum()), int(mask[row].sum())), list(ids[row])))
        return rows

    # results are returned, not stored by ``step``: under torchrun other ranks' batches arrive gathered
    for batch, out in batched(lm, prompts, step, batch_size=batch_size, system=system, description="KL on replies"):
        for i, (first, nll_count, ref_ids) in zip(batch.index, out):
            firsts[i], sums[i], refs[i] = first, nll_count, ref_ids
    order = range(len(prompts))
    total, count = sum(sums[i][0] for i in order), sum(sums[i][1] for i in order)
    return KLResult(
        first_token=sum(firsts[i] for i in order) / len(prompts),
        reply_tokens=total / count,
        per_prompt_first=[firsts[i] for i in order],
        per_prompt_reply=[sums[i][0] / sums[i][1] for i in order],
        n_prompts=len(prompts), n_tokens=count, replies=[refs[i] for i in order],
    )


# ---- cross-entropy / perplexity on plain text -------------------------------------------------------
@dataclass(frozen=True)
class CrossEntropy:
    """Summed next-token negative log-likelihood (nats) over ``n_tokens`` predictions."""

    sum_nll: float
    n_tokens: int

    @property
    def ce(self) -> float:
        return self.sum_nll / self.n_tokens if self.n_tokens else math.nan

    @property
    def ppl(self) -> float:
        return perplexity(self.sum_nll, self.n_tokens) if self.n_tokens else math.nan

    def __add__(self, other: CrossEntropy) -> CrossEntropy:
        return CrossEntropy(self.sum_nll + other.sum_nll, self.n_tokens + other.n_tokens)

    def summary(self) -> dict[str, float | int]:
        return {"ce": self.ce, "ppl": self.ppl, "n_tokens": self.n_tokens}


def reply_cross_entropy(lm: LoadedModel, batch: Batch, replies: Sequence[Sequence[int]]) -> CrossEntropy:
    """Summed NLL of each prompt's reply tokens, teacher forced after the prompt as during generation
    (apply interventions around the call; an empty reply counts no token)."""
    logits, _ = teacher_forced_logits(lm, batch, replies)                    # [batch, T, vocab]
    width = logits.shape[1]
    target = torch.zeros((len(replies), width), dtype=torch.long)            # [batch, T]
    real = torch.zeros((len(replies), width), dtype=torch.bool)              # [batch, T]
    for i, r in enumerate(replies):
        if r:
            target[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            real[i, : len(r)] = True
    if not real.any():
        return CrossEntropy(0.0, 0)
    nll = torch.nn.functional.cross_entropy(logits[real], target[real], reduction="sum")
    return CrossEntropy(float(nll), int(real.sum()))


def _max_tokens(lm: LoadedModel, max_tokens: int | None) -> int:
    return min(int(max_tokens or 512), int(lm.dims.max_positions or 512))


def capability_rows(lm: LoadedModel, texts: Sequence[str] | None = None, *, max_tokens: int | None = None) -> list[list[int]]:
    """Token rows of the built-in capability passages (or ``texts``), one per passage, truncated."""
    if texts is None:
        from ..prompts import capability_texts

        texts = capability_texts()
    limit = _max_tokens(lm, max_tokens)
    rows = [list(lm.tokenizer(t)["input_ids"])[:limit] for t in texts]
    return [r for r in rows if len(r) >= 2]


def file_rows(lm: LoadedModel, path: str | Path, *, max_tokens: int | None = None) -> list[list[int]]:
    """A UTF-8 text file tokenized once and cut into consecutive windows of ``max_tokens`` (512)."""
    from ..prompts.loaders import read_text

    text = read_text(Path(path))
    ids = list(lm.tokenizer(text)["input_ids"])
    if len(ids) < 2:
        raise ValueError(f"{path} has fewer than 2 tokens; give a text file with some prose or code")
    limit = _max_tokens(lm, max_tokens)
    rows = [ids[i : i + limit] for i in range(0, len(ids), limit)]
    return [r for r in rows if len(r) >= 2]


def _row_batch(lm: LoadedModel, rows: Sequence[Sequence[int]], idx: Sequence[int]) -> Batch:
    """A left-padded batch of raw token rows (no chat template; ``n_post = 0``)."""
    pad = pad_token_id(lm.tokenizer)
    width = max(len(rows[i]) for i in idx)
    ids = torch.full((len(idx), width), pad, dtype=torch.long)               # [batch, pos]
    mask = torch.zeros((len(idx), width), dtype=torch.long)                  # [batch, pos]
    for j, i in enumerate(idx):
        ids[j, width - len(rows[i]):] = torch.tensor(list(rows[i]), dtype=torch.long)
        mask[j, width - len(rows[i]):] = 1
    return Batch(input_ids=ids, attention_mask=mask, n_post=0, index=tuple(idx))


def _batch_ce(lm: LoadedModel, batch: Batch) -> CrossEntropy:
    with torch.inference_mode():
        logits = forward(lm, batch)                                           # [batch, pos, vocab]
    s, n = token_cross_entropy(logits, batch.input_ids, batch.attention_mask)
    return CrossEntropy(s, n)


def compare_cross_entropy(
    lm: LoadedModel, rows: Sequence[Sequence[int]], intervention: Intervention | None, *, batch_size: int = 8
) -> tuple[CrossEntropy, CrossEntropy]:
    """(reference, modified) cross-entropy on the same token rows; one pass each per batch.

    Without an intervention the model runs once and both entries are the same object.
    """
    if not rows:
        raise ValueError("no text to score: give at least one passage of two or more tokens")
    ref, new = CrossEntropy(0.0, 0), CrossEntropy(0.0, 0)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch

    def run(idx: list[int]) -> tuple[CrossEntropy, CrossEntropy]:
        batch = _row_batch(lm, rows, idx)
        r = _batch_ce(lm, batch)
        if intervention is None:
            return r, r
        with enter(lm, intervention):
            return r, _batch_ce(lm, batch)

    for _idx, (r, n) in sharded_backoff(order, batch_size, run, hint="text row; use shorter windows (max_tokens)"):
        ref, new = ref + r, new + n
    return (ref, ref) if intervention is None else (ref, new)


def cross_entropy(lm: LoadedModel, rows: Sequence[Sequence[int]], *, batch_size: int = 8) -> CrossEntropy:
    """Cross-entropy of the model as it is (apply interventions around the call) on token rows."""
    return compare_cross_entropy(lm, rows, None, batch_size=batch_size)[0]

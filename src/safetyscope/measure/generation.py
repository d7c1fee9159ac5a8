"""Model-driving measurement: batched greedy generation and the one-pass logit refusal score.

Interventions are applied by the caller (``with artifact.apply(lm): generate(...)``); these
functions publish each batch to the hooks, so position-aware interventions work here too.
Generation stops at EOS, the model's end-of-turn tokens and any extra single-token stop strings
registered with :func:`add_stop_tokens` (a non-special stop token stays in the decoded reply).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from ..hooks import check_logits, forward, prefix_cache, running
from ..models.adapter import LoadedModel
from ..positions import Batch
from ..prefix import cache_keyword, plan
from ..prompts.chat import pad_token_id
from ..runner import batched
from .memo import LogitsMemo
from .metrics import refusal_score
from .refusal_tokens import refusal_token_ids


def stop_token_ids(tokenizer: Any, stops: Sequence[str]) -> list[int]:
    """Token ids of extra stop strings; each must be one token of ``tokenizer`` (a vocab entry or one id)."""
    vocab = tokenizer.get_vocab()
    out: list[int] = []
    for s in stops:
        if s in vocab:
            out.append(int(vocab[s]))
            continue
        ids = tokenizer.encode(s, add_special_tokens=False) if s else []
        if len(ids) != 1:
            raise ValueError(f"stop string {s!r} is {len(ids)} tokens for this tokenizer, not one; give a single "
                             "token such as the chat template's end-of-turn token")
        out.append(int(ids[0]))
    return out


def add_stop_tokens(lm: LoadedModel, stops: Sequence[str]) -> list[int]:
    """Make every generation on ``lm`` also stop at ``stops`` (single tokens; kept in ``lm.meta``)."""
    ids = stop_token_ids(lm.tokenizer, stops)
    lm.meta["stop_token_ids"] = sorted(set(lm.meta.get("stop_token_ids", [])) | set(ids))
    return ids


def stop_ids(lm: LoadedModel) -> list[int]:
    """EOS, the generation config's EOS ids, common end-of-turn tokens and ``add_stop_tokens`` extras."""
    tok = lm.tokenizer
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    ids.update(int(i) for i in lm.meta.get("stop_token_ids", ()))
    gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(gen_eos)
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tok.convert_tokens_to_ids(name) if name in tok.get_vocab() else None
        if isinstance(tid, int):
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@dataclass(frozen=True)
class Generated:
    """Replies and, per prompt, the next-token logits the first reply token was chosen from (the prefill's
    last position: what :func:`last_logits` computes, read from the generation's own forward pass)."""

    replies: list[str]
    first_logits: torch.Tensor  # [n_prompts, vocab] float32 on the CPU


def continue_batch(lm: LoadedModel, batch: Batch, max_new_tokens: int = 64, do_sample: bool = False, *,
                   first: list[torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
    """Greedy (unless asked) continuation of one batch: the new token ids ``[batch, <= max_new_tokens]``
    (rows that stopped early are padded). ``first``: a list the prefill's last-position logits
    ([batch, vocab] float32, CPU) are appended to.

    The shared prefix is prefilled once where that is exact (:mod:`safetyscope.prefix`); hooks then see the
    suffix Batch during the rest of the generation.
    """
    batch = batch.to(lm.input_device)
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "do_sample": do_sample,
        "temperature": None if not do_sample else kwargs.pop("temperature", 1.0), "top_p": None, "top_k": None,
        "eos_token_id": stop_ids(lm), "pad_token_id": pad_token_id(lm.tokenizer), **kwargs,
    }
    split = plan(lm.model, batch, last_only=True)
    with torch.inference_mode():
        if split is None:
            with running(batch), _first_logits(lm, first):
                out = cast(Any, lm.model).generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                   **settings)
            start = batch.seq_len
        else:
            cache = prefix_cache(lm, split)
            ids = torch.cat([split.prefix.input_ids[split.rows.to(batch.input_ids.device)], split.suffix.input_ids], 1)
            with running(split.suffix), _first_logits(lm, first):
                out = cast(Any, lm.model).generate(input_ids=ids, attention_mask=split.attention_mask,
                                                   **{cache_keyword(lm.model): cache},
                                                   **settings)
            start = ids.shape[1]
    return out[:, start:]


def generate_batch(lm: LoadedModel, batch: Batch, max_new_tokens: int = 64, do_sample: bool = False, *,
                   first: list[torch.Tensor] | None = None, **kwargs: Any) -> list[str]:
    """:func:`continue_batch`, decoded: one reply per row."""
    new = continue_batch(lm, batch, max_new_tokens, do_sample, first=first, **kwargs)
    return [lm.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


@contextmanager
def _first_logits(lm: LoadedModel, into: list[torch.Tensor] | None) -> Iterator[None]:
    """Append the last-position logits of the first model call inside the block to ``into`` (None: no hook)."""
    if into is None:
        yield
        return
    seen: list[bool] = []

    def keep(_m: Any, _args: Any, output: Any) -> None:
        if not seen:
            seen.append(True)
            logits = output.logits if hasattr(output, "logits") else output[0]  # [batch, pos, vocab]
            check_logits(logits)  # NaN/inf: the same one-line error as a forward pass
            into.append(logits[:, -1].detach().float().cpu())

    handle = lm.model.register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system: str | None = None,
    do_sample: bool = False,
) -> list[str]:
    """Replies to ``prompts`` in their original order (greedy decoding unless ``do_sample``).

    Batches hold ``max(batch_size, lm.meta["gen_batch_size"])`` prompts: each decoding step reads every
    weight once whatever the batch, so on memory-bound hardware (CPUs, small models) larger batches are
    nearly free; out-of-memory halves them.
    """
    return _generate(lm, prompts, max_new_tokens, batch_size, system, do_sample, keep_first=False).replies


def generate_scored(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system: str | None = None,
    do_sample: bool = False,
) -> Generated:
    """:func:`generate` plus each prompt's first-token logits from the same forward pass (equal to
    :func:`last_logits` within float tolerance: the batches differ), so a refusal score or a first-token KL
    of the generated condition costs no second pass."""
    return _generate(lm, prompts, max_new_tokens, batch_size, system, do_sample, keep_first=True)


def _generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, batch_size: int, system: str | None,
              do_sample: bool, *, keep_first: bool) -> Generated:
    replies: list[str] = [""] * len(prompts)
    rows: dict[int, torch.Tensor] = {}

    def step(b: Batch) -> tuple[list[str], torch.Tensor | None]:
        first: list[torch.Tensor] | None = [] if keep_first else None
        outs = generate_batch(lm, b, max_new_tokens, do_sample, first=first)
        return outs, (first[0] if first else None)

    for batch, (outs, logits) in batched(
        lm,
        prompts,
        step,
        batch_size=max(int(batch_size), int(lm.meta.get("gen_batch_size") or 0)),
        system=system,
        description="generating",
    ):
        for j, (i, reply) in enumerate(zip(batch.index, outs)):
            replies[i] = reply
            if logits is not None:
                rows[i] = logits[j]
    first = torch.stack([rows[i] for i in range(len(prompts))]) if keep_first and prompts else torch.empty(0)
    return Generated(replies, first)


def last_logits(lm: LoadedModel, prompts: Sequence[str], *, batch_size: int = 16, system: str | None = None,
                memo: LogitsMemo | None = None) -> torch.Tensor:
    """Next-token logits at the first response position, [n_prompts, vocab] float32 on CPU.

    ``memo``: read the prompts it holds from it and keep the others in it (only while no hook that may change
    the logits is on the model; see :mod:`safetyscope.measure.memo`)."""
    use = memo is not None and memo.usable(lm)
    kept = memo.get(lm, prompts, system) if memo is not None and use else [None] * len(prompts)
    todo = [i for i, row in enumerate(kept) if row is None]
    rows: dict[int, torch.Tensor] = {i: row for i, row in enumerate(kept) if row is not None}

    def step(batch: Batch) -> torch.Tensor:
        with torch.inference_mode():
            return forward(lm, batch, last_only=True)[:, -1].float().cpu()

    if todo:
        for batch, logits in batched(lm, [prompts[i] for i in todo], step, batch_size=batch_size, system=system,
                                     description="scoring"):
            for j, row in zip(batch.index, logits):
                rows[todo[j]] = row
        if memo is not None and use:
            memo.put(lm, [prompts[i] for i in todo], system, torch.stack([rows[i] for i in todo]))
    return torch.stack([rows[i] for i in range(len(prompts))])


def refusal_scores(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    token_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """Logit refusal score (log-odds of refusal-opening tokens) per prompt, [n_prompts]; no generation."""
    ids = list(token_ids) if token_ids is not None else refusal_token_ids(lm.tokenizer)
    return refusal_score(last_logits(lm, prompts, batch_size=batch_size, system=system), ids)
